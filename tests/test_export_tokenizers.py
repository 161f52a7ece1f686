"""Every tokenizer exports: a char or bytes run written by `export-hf` loads in transformers,
whose `AutoTokenizer` gives gptzoo's ids and text back (newlines, runs of spaces and non-ASCII
included) and whose model gives gptzoo's logits."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import SHAKESPEARE

from gptzoo.data import ByteTokenizer, CharTokenizer
from gptzoo.hf import export_hf
from gptzoo.models import GPT2Config, LlamaConfig, build_architecture
from gptzoo.recipe import DataConfig, OptimizerConfig, Recipe, TrainerConfig, save_recipe
from gptzoo.trainer.checkpoint import Checkpoints

TEXT = "First Citizen:\nBefore we  proceed,\r\n\théllo — 日本 😀\n\n"
CONFIGS = {"char": ("gpt2", GPT2Config(n_layers=1, n_heads=2, d_model=32, block_size=32)),
           "bytes": ("llama", LlamaConfig(n_layers=1, n_heads=2, d_model=32, block_size=32,
                                          multiple_of=16))}


def write_run(run_dir, tokenizer, architecture: str, config):
    """A run directory of a random model, as `gptzoo train` leaves one."""
    recipe = Recipe(name=run_dir.name, source=run_dir / "recipe.json", build_model=None,
                    model=config, architecture=architecture, data=DataConfig(),
                    optimizer=OptimizerConfig(), trainer=TrainerConfig())
    model = build_architecture(architecture, config, tokenizer.vocab_size,
                               key=jax.random.PRNGKey(0))
    save_recipe(recipe, run_dir)
    tokenizer.save(run_dir)
    checkpoints = Checkpoints(run_dir)
    checkpoints.save(1, model, {"none": jnp.int32(0)},
                     {"tokenizer": tokenizer.to_dict(),
                      "recipe": {"name": recipe.name, **recipe.to_dict()}})
    checkpoints.close()
    return model


@pytest.mark.parametrize("kind", CONFIGS)
def test_char_and_bytes_runs_export_with_gptzoos_ids_text_and_logits(tmp_path, kind):
    tokenizer = (CharTokenizer(SHAKESPEARE.read_text()[:2000] + TEXT) if kind == "char"
                 else ByteTokenizer())
    model = write_run(tmp_path / "run", tokenizer, *CONFIGS[kind])
    export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer.encode(TEXT)
    assert theirs(TEXT)["input_ids"] == ids.tolist()
    assert theirs.decode(ids) == TEXT
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = hf(torch.tensor(ids[None, :32])).logits.numpy()[0]
    ours = eqx.filter_jit(model)(jnp.asarray(ids[:32]))
    assert np.abs(np.asarray(ours) - expected).max() <= 1e-4


def test_a_cut_byte_sequence_decodes_as_gptzoo_does(tmp_path):
    """A sample may stop inside a multi-byte character: both show U+FFFD there."""
    write_run(tmp_path / "run", ByteTokenizer(), *CONFIGS["bytes"])
    export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    cut = ByteTokenizer().encode("añ")[:-1]
    assert theirs.decode(cut) == ByteTokenizer().decode(cut) == "a\ufffd"
