"""`gptzoo import-hf` and `gptzoo export-hf`: a Hugging Face model folder <-> a run directory."""

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from gptzoo.data import HFTokenizer
from gptzoo.errors import GptzooError
from gptzoo.hf.config import read_config, write_config
from gptzoo.hf.weights import open_tensors, read_params, write_params
from gptzoo.models.names import (
    is_shape,
    per_layer_leaves,
    replace_per_layer,
    shape_differences,
    shapes,
)
from gptzoo.models.registry import ARCHITECTURES, Family, build_architecture
from gptzoo.recipe import (
    DataConfig,
    OptimizerConfig,
    Recipe,
    TrainerConfig,
    load_run_recipe,
    save_recipe,
)
from gptzoo.trainer.checkpoint import Checkpoints
from gptzoo.trainer.run_dir import load

# The files of a HF tokenizer that travel with the weights, both ways.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")


def import_hf(hf_dir: str | Path, out: str | Path, block_size: int | None = None) -> Path:
    """Write the model of a Hugging Face folder as a run directory that `gptzoo sample`,
    `eval` and `train --init-from` read. Tensors are read one at a time, and nothing is written
    until all of them have been read and checked."""
    hf_dir, out = Path(hf_dir), Path(out)
    hf = read_config(hf_dir, block_size)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise GptzooError(f"{out} already holds checkpoints; pass a new --out folder")
    tokenizer = read_tokenizer(hf_dir, hf.config.vocab_size)
    family = ARCHITECTURES[hf.architecture]
    template = eqx.filter_eval_shape(build_architecture, hf.architecture, hf.config,
                                     hf.config.vocab_size, key=jax.random.PRNGKey(0))
    with open_tensors(hf_dir, family.hf.rename) as tensors:
        arrays = read_params(family.hf_params(hf.config), family.hf.convert(tensors), hf_dir,
                             tied=hf.config.tie_head, buffers=family.hf.buffers)
        model = fill(template, arrays, hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    _copy(TOKENIZER_FILES, hf_dir, out)
    # Training from this run's recipe.json tokenizes with the imported tokenizer.
    data = DataConfig(tokenizer=str((out / "tokenizer.json").absolute()))
    recipe = Recipe(name=hf_dir.name, source=hf_dir / "config.json", build_model=None,
                    model=hf.config, architecture=hf.architecture, data=data,
                    optimizer=OptimizerConfig(), trainer=TrainerConfig())
    save_recipe(recipe, out)
    checkpoints = Checkpoints(out)
    # No optimizer state: fine-tuning (--init-from) starts a fresh one. Orbax refuses an empty
    # item, so a named scalar stands in.
    meta = {"tokenizer": tokenizer.to_dict(), "imported_from": str(hf_dir.absolute()),
            "recipe": {"name": recipe.name, **recipe.to_dict()}}
    checkpoints.save(0, model, {"none": jnp.int32(0)}, meta)
    checkpoints.close()
    return out


def read_tokenizer(hf_dir: Path, vocab_size: int) -> HFTokenizer:
    if not (hf_dir / "tokenizer.json").is_file():
        raise GptzooError(f"{hf_dir} has no tokenizer.json; save the tokenizer with "
                          "save_pretrained (a fast tokenizer) next to the weights")
    tokenizer = HFTokenizer.from_file(hf_dir / "tokenizer.json")
    if tokenizer.vocab_size > vocab_size:
        raise GptzooError(f"{hf_dir}: tokenizer.json has {tokenizer.vocab_size} tokens, more than "
                          f"the model's vocab_size={vocab_size}; pass the tokenizer these "
                          "weights were trained with")
    return tokenizer


def fill(template, arrays: dict[str, np.ndarray], where: Path):
    """`template` (a model of shapes) with every array taken from `arrays` by module path."""
    expected = per_layer_leaves(template, is_shape)
    differences = shape_differences(shapes(expected), shapes(arrays), f"{where}", "config.json")
    if differences:
        raise GptzooError(f"{where}: {differences[0]} ({len(differences)} differences); the "
                          "weights do not match config.json")
    # Each NumPy array is dropped as it moves to JAX: never two copies of the model.
    return replace_per_layer(template, {k: jnp.asarray(arrays.pop(k), jnp.float32)
                                     for k in list(arrays)})


def _exported_family(architecture: str | None, run_dir: Path) -> Family:
    """The family of a run that export-hf can write: a built-in one with a Hugging Face format."""
    family = ARCHITECTURES.get(architecture) if architecture else None
    if family is None or family.hf is None:
        exportable = ", ".join(f.name for f in ARCHITECTURES.values() if f.hf is not None)
        what = (f"the {architecture} family has no Hugging Face format" if family else
                "it was trained from a custom recipe")
        raise GptzooError(f"{run_dir}: {what}; export-hf writes runs of the architectures "
                          f"{exportable}")
    return family


def _copy(names: tuple[str, ...], source: Path, destination: Path) -> None:
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


def exportable_recipe(run_dir: Path) -> tuple[Recipe, Family]:
    """The recipe of a run whose family has a Hugging Face format, and that family; else one line
    saying why not."""
    recipe = load_run_recipe(run_dir)
    return recipe, _exported_family(recipe.architecture, run_dir)


def hf_config(run_dir: Path, recipe: Recipe, family: Family, tokenizer) -> dict:
    """The run's `config.json`, or one line saying why transformers cannot hold its model."""
    vocab_size = recipe.model.vocab_size or tokenizer.vocab_size  # as build_architecture built
    try:
        return write_config(family.name, recipe.model, vocab_size)
    except ValueError as e:
        raise GptzooError(f"{run_dir}: {e}") from e


def write_tokenizer(tokenizer, run_dir: Path, out: Path) -> None:
    """`out/tokenizer.json` in Hugging Face's form (a char or bytes tokenizer's too: see their
    `to_hf`) and the run's other tokenizer files. A char or bytes one also gets a
    `tokenizer_config.json` naming the generic fast class, so that `AutoTokenizer` reads its
    tokenizer.json as it is rather than as the model family's own tokenizer."""
    tokenizer.to_hf().save(str(out / "tokenizer.json"))
    _copy(TOKENIZER_FILES[1:], run_dir, out)  # an imported model's other tokenizer files
    if not isinstance(tokenizer, HFTokenizer):
        settings = {"tokenizer_class": "PreTrainedTokenizerFast",
                    "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """Write a run of a family with a Hugging Face format (gpt2, llama) as a folder
    `transformers` loads with `AutoModelForCausalLM.from_pretrained`; a LoRA run's adapters are
    merged into the weights."""
    run_dir, out = Path(run_dir), Path(out)
    recipe, family = exportable_recipe(run_dir)
    model, tokenizer = load(run_dir)
    config = hf_config(run_dir, recipe, family, tokenizer)
    arrays = {k: np.asarray(v) for k, v in per_layer_leaves(model).items()}
    tensors = write_params(family.hf_params(recipe.model), arrays)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(tokenizer, run_dir, out)
    return out
