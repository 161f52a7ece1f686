"""`gptzoo sample` end to end on one tiny run of the real recipe: a batch of prompts (repeated
--prompt, --prompt-file) equals each prompt alone, --stop, --top-k/--top-p, --no-cache, and a
one-line error for bad sampling options. One sample runs in its own process, the rest in the
test's (the same command, without importing JAX again)."""

import pytest
from conftest import gptzoo_cli, gptzoo_in_process
from test_cli import assert_one_line_error

SEPARATOR = "\n---------------\n"
PROMPTS = ["ROMEO:", "JULIET:"]


def sample(run_dir, *args, cli=gptzoo_in_process) -> str:
    """stdout of `gptzoo sample`, without the newline that ends it."""
    result = cli("sample", "--ckpt", run_dir, *args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.endswith("\n")
    return out[:-1]


def prompt_args(prompts) -> list[str]:
    return [arg for prompt in prompts for arg in ("--prompt", prompt)]


@pytest.fixture(scope="module")
def batch(trained_run) -> str:
    return sample(trained_run, *prompt_args(PROMPTS), "--max-new-tokens", "80", "--seed", "3",
                  cli=gptzoo_cli)


def test_repeated_prompts_give_one_sample_each_equal_to_running_it_alone(trained_run, batch):
    texts = batch.split(SEPARATOR)
    assert len(texts) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, texts, strict=True):
        assert text.startswith(prompt) and len(text) == len(prompt) + 80
        alone = sample(trained_run, "--prompt", prompt, "--max-new-tokens", "80", "--seed", "3")
        assert alone == text


def test_prompt_file_lines_are_prompts(trained_run, batch, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(prompt + "\n" for prompt in PROMPTS))
    assert sample(trained_run, "--prompt-file", path, "--max-new-tokens", "80",
                  "--seed", "3") == batch


def test_stop_ends_each_sample_at_its_first_newline_after_the_prompt(trained_run):
    prompts = ["ROMEO:", "JULIET:\nO"]  # a newline in the prompt does not stop it
    args = (*prompt_args(prompts), "--max-new-tokens", "300", "--seed", "1")
    stopped = sample(trained_run, *args, "--stop", "\n").split(SEPARATOR)
    full = sample(trained_run, *args).split(SEPARATOR)
    for prompt, text, unstopped in zip(prompts, stopped, full, strict=True):
        continuation = unstopped[len(prompt):]
        assert "\n" in continuation, "300 characters without a newline: pick another seed"
        assert text == prompt + continuation[:continuation.index("\n") + 1]


@pytest.mark.parametrize("option", [("--top-p", "0.5"), ("--top-k", "3")],
                         ids=["top-p", "top-k"])
def test_top_p_and_top_k_sample(trained_run, option):
    out = sample(trained_run, "--prompt", "ROMEO:", "--max-new-tokens", "50", *option)
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 50


def test_no_cache_gives_the_cached_greedy_text(trained_run):
    # 100 new characters: past block_size=32, where the sampler crops and recomputes.
    args = ("--prompt", "ROMEO:", "--max-new-tokens", "100", "--temperature", "0")
    assert sample(trained_run, *args, "--no-cache") == sample(trained_run, *args)


@pytest.mark.parametrize("top_p", ["0", "1.5"])
def test_bad_top_p_is_a_one_line_error(trained_run, top_p):
    result = gptzoo_in_process("sample", "--ckpt", trained_run, "--top-p", top_p)
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, f"--top-p={float(top_p)}", "(0, 1]")


def test_missing_prompt_file_is_a_one_line_error(trained_run, tmp_path):
    result = gptzoo_in_process("sample", "--ckpt", trained_run, "--prompt-file",
                               tmp_path / "nope.txt")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, "--prompt-file", "nope.txt", "does not exist")


def test_num_samples_0_is_a_one_line_error(trained_run):
    result = gptzoo_in_process("sample", "--ckpt", trained_run, "--num-samples", "0")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, "--num-samples=0", "at least 1")


def test_slide_on_learned_positions_is_a_one_line_error(trained_run):
    result = gptzoo_in_process("sample", "--ckpt", trained_run, "--context", "slide")
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result, "--context slide", "learned positions", "shift or crop")
