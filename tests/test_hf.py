"""Published weights: small random GPT-2 and LLaMA-family models made locally with transformers
(CPU torch, nothing downloaded) are imported and must give transformers' logits and greedy
generations; export -> from_pretrained gives the same logits again; import -> export -> import is
bit-identical; bad folders fail with one line."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Imported, not skipped when missing: torch and transformers are in the test extra, and a CI
# machine that failed to install them must fail these tests rather than pass without them.
import torch
import transformers
from click.testing import CliRunner, Result
from conftest import SHAKESPEARE, gptzoo_cli
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptzoo.cli import main
from gptzoo.errors import GptzooError
from gptzoo.hf import export_hf, import_hf, read_config, write_config
from gptzoo.hf.weights import write_params
from gptzoo.models import GPT2Config, LlamaConfig, build_architecture, get_family
from gptzoo.models.names import named_leaves, per_layer_leaves
from gptzoo.sample import generate_tokens
from gptzoo.trainer import load

VOCAB = 300  # the tokenizer's: 256 bytes and 44 merges
TOLERANCE = 1e-4  # max |logit difference| in float32

# Small configs covering each feature: GPT-2 (tied head, exact GELU); LLaMA with grouped-query
# attention, rope_theta != 10,000, llama3 scaling, head_dim != hidden / heads, tied and untied
# heads; Qwen2's q/k/v biases; Mistral's sliding window, shorter than the tested sequences;
# Qwen3's QK-norm with head_dim != hidden / heads and attention biases (these two with weights 10x
# the default's, so attention is far from uniform). The `save` entry picks the file layout.
CONFIGS = {
    "gpt2": dict(cls="GPT2Config", save="safetensors", n_layer=2, n_embd=32, n_head=4,
                 n_positions=64, layer_norm_epsilon=1e-4),
    "gpt2_exact_gelu_bin": dict(cls="GPT2Config", save="bin", n_layer=2, n_embd=32, n_head=2,
                                n_positions=64, activation_function="gelu"),
    "llama_gqa_llama3": dict(
        cls="LlamaConfig", save="sharded", num_hidden_layers=2, hidden_size=48,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=80,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "llama_tied": dict(cls="LlamaConfig", save="safetensors", num_hidden_layers=2,
                       hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=64, max_position_embeddings=128,
                       tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 500.0}),
    "qwen2": dict(cls="Qwen2Config", save="safetensors", num_hidden_layers=2, hidden_size=32,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=128, tie_word_embeddings=False),
    "mistral_window": dict(cls="MistralConfig", save="safetensors", num_hidden_layers=2,
                           hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=128, sliding_window=5,
                           initializer_range=0.2),
    "qwen3": dict(cls="Qwen3Config", save="safetensors", num_hidden_layers=2, hidden_size=32,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  intermediate_size=64, max_position_embeddings=128, attention_bias=True,
                  tie_word_embeddings=False, initializer_range=0.2),
}


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens trained on a little Shakespeare."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()[:5000]], trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    return tokenizer


def perturb(model) -> None:
    """Move biases and norm weights away from their initial 0 and 1, so a missed one shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def make_hf(name: str, folder: Path, tokenizer: Callable[[], Tokenizer] = make_tokenizer):
    """The transformers model `name` of CONFIGS, saved in `folder` with `tokenizer()`'s
    tokenizer.json."""
    spec = dict(CONFIGS[name])
    cls, save = spec.pop("cls"), spec.pop("save")
    config = getattr(transformers, cls)(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None, **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(model)
    model.save_pretrained(folder, max_shard_size="20KB" if save == "sharded" else "5GB")
    if save == "bin":  # transformers 5 writes only safetensors: the older pickle by hand
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer().save(str(folder / "tokenizer.json"))
    return model


def import_once(tmp_path_factory, tokenizer: Callable[[], Tokenizer] = make_tokenizer):
    """`get(name)`: (transformers model, HF folder, run directory) of CONFIGS[name] with
    `tokenizer()`'s tokenizer.json, made and imported at the first call."""
    made = {}

    def get(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            hf = make_hf(name, root / "hf", tokenizer)
            import_hf(root / "hf", root / "run")
            made[name] = hf, root / "hf", root / "run"
        return made[name]

    return get


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`import_once` for a module: `imported(name)` is made once per module."""
    return import_once(tmp_path_factory)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def random_tokens(seed: int, shape=(3, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def max_diff(model, hf, tokens) -> float:
    ours = np.asarray(jax.vmap(model)(jnp.asarray(tokens, jnp.int32)))
    return float(np.abs(ours - hf_logits(hf, tokens)).max())


@pytest.mark.parametrize("name", CONFIGS)
def test_saved_layouts_are_the_ones_named(imported, name):
    _, folder, _ = imported(name)
    save = CONFIGS[name]["save"]
    files = {p.name for p in folder.iterdir()}
    assert {"bin": "pytorch_model.bin", "sharded": "model.safetensors.index.json",
            "safetensors": "model.safetensors"}[save] in files


@pytest.mark.parametrize("name", CONFIGS)
def test_imported_logits_match_transformers(imported, name):
    hf, _, run = imported(name)
    model, _ = load(run)
    diff = max_diff(model, hf, random_tokens(0, (4, 48)))
    print(f"{name}: max |logit difference| {diff:.2e}")
    assert diff <= TOLERANCE


# One of each family, for time: learned positions (the sampler crops) and rotary (it slides).
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_llama3"])
def test_greedy_generation_matches_transformers(imported, name):
    hf, _, run = imported(name)
    model, _ = load(run)
    prompt = random_tokens(7, (1, 6))
    with torch.no_grad():
        expected = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                               min_new_tokens=20)[0, 6:].numpy()
    got = np.concatenate(list(generate_tokens(model, [prompt[0]], max_new_tokens=20,
                                              temperature=0.0)), axis=1)[0]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers_with_the_same_logits(imported, name, tmp_path):
    hf, _, run = imported(name)
    export_hf(run, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = random_tokens(3)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf, tokens), atol=1e-5)
    assert (Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).to_str()
            == Tokenizer.from_file(str(run / "tokenizer.json")).to_str())


@pytest.mark.parametrize("name", CONFIGS)
def test_import_export_import_is_bit_identical(imported, name, tmp_path):
    _, _, run = imported(name)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    first, second = (named_leaves(load(r)[0]) for r in (run, tmp_path / "run"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), key)
    assert json.loads((run / "recipe.json").read_text())["model"] == json.loads(
        (tmp_path / "run" / "recipe.json").read_text())["model"]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_recipe_models_export_to_transformers(architecture, tmp_path):
    """A model built from a recipe's config (LLaMA's hidden width from multiple_of, no
    vocab_size) exports as transformers computes it: same logits from from_pretrained."""
    config = (GPT2Config(n_layers=2, n_heads=2, d_model=32, block_size=64)
              if architecture == "gpt2" else
              LlamaConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, block_size=64,
                          multiple_of=32, rotary_base=1000.0))
    model = build_architecture(architecture, config, VOCAB, key=jax.random.PRNGKey(0))
    tensors = write_params(get_family(architecture).hf_params(config),
                           {k: np.asarray(v) for k, v in per_layer_leaves(model).items()})
    (tmp_path / "config.json").write_text(json.dumps(write_config(architecture, config, VOCAB)))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(model, hf, random_tokens(2)) <= TOLERANCE


def test_both_config_dialects_read_alike(tmp_path):
    """transformers 4.x writes rope_theta and rope_scaling ("type" in older files, "rope_type"
    in newer), 5.x rope_parameters: all three give the same model."""
    v5 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "intermediate_size": 80, "vocab_size": VOCAB, "max_position_embeddings": 128,
          "rope_parameters": {**CONFIGS["llama_gqa_llama3"]["rope_parameters"]}}
    scaling = {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
    v4 = {**{k: v for k, v in v5.items() if k != "rope_parameters"}, "rope_theta": 50000.0,
          "rope_scaling": scaling}
    v4_old = {**v4, "rope_scaling": {("type" if k == "rope_type" else k): v
                                     for k, v in scaling.items()}}
    configs = []
    for i, dialect in enumerate((v5, v4, v4_old)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(dialect))
        configs.append(read_config(tmp_path / str(i)).config)
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rotary_base == 50000.0 and configs[0].rope_scaling["factor"] == 4.0


def bad_folder(tmp_path, **changes) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": VOCAB, **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, fragments", [
    ({"architectures": ["BertForMaskedLM"]}, ["architectures=['BertForMaskedLM']",
                                              "GPT2LMHeadModel, LlamaForCausalLM"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, ["rope type='yarn'",
                                                                     "default, llama3"]),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope type='dynamic'"]),
    ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "silu"]),
])
def test_unsupported_configs_fail_naming_what_is_supported(tmp_path, changes, fragments):
    with pytest.raises(GptzooError) as error:
        import_hf(bad_folder(tmp_path, **changes), tmp_path / "run")
    assert all(f in str(error.value) for f in fragments), error.value
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_missing_files_fail_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = gptzoo_cli("import-hf", tmp_path / "empty", "--out", tmp_path / "run")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "has no config.json" in result.stderr
    with pytest.raises(GptzooError, match="has no tokenizer.json"):
        import_hf(bad_folder(tmp_path), tmp_path / "run")
    make_tokenizer().save(str(tmp_path / "bad" / "tokenizer.json"))
    with pytest.raises(GptzooError, match="has no model.safetensors"):
        import_hf(tmp_path / "bad", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bfloat16_weights_import_exactly(tmp_path):
    """A bf16 checkpoint (most published LLaMAs) is widened to float32 without loss."""
    hf = make_hf("llama_tied", tmp_path / "hf").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, _ = load(tmp_path / "run")
    assert max_diff(model, hf.float(), random_tokens(1)) <= TOLERANCE


def test_the_default_recipes_char_run_exports(trained_run, tmp_path):
    """The README's first run (char tokens) loads in transformers with its ids and logits."""
    export_hf(trained_run, tmp_path / "hf")
    model, tokenizer = load(trained_run)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = SHAKESPEARE.read_text()[:64]
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids.tolist() and hf_tokenizer.decode(ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_diff(model, hf, ids[None, :32]) <= TOLERANCE


def test_a_missing_tensor_is_named(tmp_path):
    hf = make_hf("llama_tied", tmp_path / "hf")
    state = {k: v for k, v in hf.state_dict().items()
             if "layers.1.mlp.up_proj" not in k and k != "lm_head.weight"}  # tied: not saved
    from safetensors.torch import save_file
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GptzooError, match="lacks tensor model.layers.1.mlp.up_proj.weight"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def cli(*args) -> Result:
    """The command line, in this process (a fresh one costs seconds of imports)."""
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama_run(imported, tmp_path_factory):
    _, folder, _ = imported("llama_gqa_llama3")
    run = tmp_path_factory.mktemp("cli") / "run"
    result = cli("import-hf", folder, "--out", run, "--block-size", "64")
    assert result.exit_code == 0, result.output
    return run


def test_cli_import_sample_eval_export(llama_run, tmp_path, small_text):
    recipe = json.loads((llama_run / "recipe.json").read_text())
    assert recipe["architecture"] == "llama" and recipe["model"]["block_size"] == 64
    assert not (llama_run / "recipe.py").exists()  # nothing to execute when loading it
    sample = cli("sample", "--ckpt", llama_run, "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0")
    assert sample.exit_code == 0 and sample.stdout.startswith("ROMEO:"), sample.output
    assert len(sample.stdout) > len("ROMEO:\n")
    evaluated = cli("eval", "--ckpt", llama_run, "--data", small_text)
    assert float(evaluated.stdout.split("val loss ")[1].split()[0]) > 0, evaluated.output
    assert cli("export-hf", llama_run, "--out", tmp_path / "hf").exit_code == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"][
        "rope_type"] == "llama3"
    with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_init_from_takes_the_weights_and_tokenizer(llama_run, tmp_path, small_text):
    """Fine-tuning from the imported run's own recipe.json starts at its weights: with a
    negligible learning rate they are still the imported ones after a few steps."""
    overrides = {"data.path": small_text, "trainer.max_steps": 2, "trainer.batch_size": 2,
                 "trainer.eval_interval": 2, "trainer.eval_steps": 1, "trainer.log_interval": 1,
                 "trainer.checkpoint_interval": 2, "trainer.steps_per_call": 1,
                 "optimizer.lr": 1e-12, "optimizer.warmup_steps": 1}
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    result = cli("train", llama_run / "recipe.json", *args, "--init-from", llama_run,
                 "--run-dir", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    (before, tokenizer), (after, tuned_tokenizer) = load(llama_run), load(tmp_path / "tuned")
    assert tuned_tokenizer.to_dict() == tokenizer.to_dict()
    for name, array in named_leaves(before).items():
        np.testing.assert_allclose(named_leaves(after)[name], array, atol=1e-6, err_msg=name)


def test_init_from_a_different_shape_names_the_parameters(llama_run, tmp_path):
    result = cli("train", llama_run / "recipe.json", "--set", "model.d_hidden=96",
                 "--init-from", llama_run, "--run-dir", tmp_path / "tuned")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert ("checkpoint has blocks.0.mlp.down.weight (80, 48); the recipe builds (96, 48)"
            in result.stderr), result.stderr
    assert not (tmp_path / "tuned" / "checkpoints").exists()


def test_built_in_runs_load_without_executing_python(trained_run, tmp_path):
    """The char recipe names architecture "gpt2": its run rebuilds from recipe.json, never
    running the recipe.py beside it; a custom recipe's run still executes its recipe.py."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert json.loads((run / "recipe.json").read_text())["architecture"] == "gpt2"
    (run / "recipe.py").write_text("raise SystemExit('recipe.py was executed')\n")
    model, _ = load(run)
    assert len(model.blocks) == 1
    marker = tmp_path / "executed"
    (run / "recipe.py").write_text(
        "from pathlib import Path\nfrom gptzoo.models import gpt2\n"
        "from gptzoo.recipe import ModelConfig\n\n"
        f"Path({str(marker)!r}).touch()\n\n"
        "def build_model(model, vocab_size, *, key):\n"
        "    return gpt2(vocab_size, **vars(model), key=key)\n")
    custom = json.loads((run / "recipe.json").read_text())
    del custom["architecture"]
    for key in ("norm_eps", "approximate_gelu", "init", "vocab_size"):  # not ModelConfig's
        del custom["model"][key]
    (run / "recipe.json").write_text(json.dumps(custom))
    load(run)
    assert marker.exists()
