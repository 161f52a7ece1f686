"""Published weights from the command line and its failures: bad folders, unsupported configs and
missing tensors fail with one line naming what is wrong; `gptzoo import-hf` then sample, eval and
export-hf; `--init-from` an imported run takes its weights and tokenizer; built-in runs load
without executing Python."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import gptzoo_cli
from hf_models import VOCAB, make_hf, make_tokenizer
from hf_models import imported as imported  # the fixture, where pytest finds it
from safetensors import safe_open

from gptzoo.cli import main
from gptzoo.errors import GptzooError
from gptzoo.hf import import_hf
from gptzoo.models.names import named_leaves
from gptzoo.trainer import load


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
