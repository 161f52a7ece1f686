"""`gptzoo export-hf RUN --peft` and `gptzoo import-hf BASE --adapter PEFT_DIR`: a LoRA run's
adapters as PEFT's files, and PEFT's files as a LoRA run over the imported base."""

import re
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.hf.config import read_config
from gptzoo.hf.convert import (
    TOKENIZER_FILES,
    _copy,
    exportable_recipe,
    hf_config,
    import_hf,
    write_tokenizer,
)
from gptzoo.hf.peft import (
    PREFIX,
    adapter_arrays,
    adapter_config,
    peft_tensors,
    read_adapter_config,
    target_modules,
    write_adapter,
)
from gptzoo.hf.weights import open_safetensors, open_tensors
from gptzoo.lora.adapters import adapter_of, projection_paths
from gptzoo.lora.config import PROJECTIONS, LoRAConfig
from gptzoo.lora.run import BASE_KEY, adapted, content_hash, recorded_base
from gptzoo.models import build_architecture
from gptzoo.models.names import (
    is_shape,
    per_layer_leaves,
    replace_per_layer,
    shape_differences,
    shapes,
)
from gptzoo.recipe import load_run_recipe, save_recipe
from gptzoo.trainer.checkpoint import Checkpoints
from gptzoo.trainer.run_dir import load

BASE_FOLDER = "base"  # import-hf --adapter: the imported base run, inside the adapter's run


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """Write a LoRA run's adapters as a PEFT adapter folder (and its tokenizer)."""
    run_dir, out = Path(run_dir), Path(out)
    recipe, family = exportable_recipe(run_dir)
    if not recipe.lora.rank:
        raise GptzooError(f"{run_dir} has no LoRA adapters (lora.rank=0): --peft writes a LoRA "
                          "run's adapters; drop --peft to export the whole model")
    model, tokenizer = load(run_dir, merge=False)
    hf_config(run_dir, recipe, family, tokenizer)  # PEFT adapts a model transformers can hold
    arrays = {k: np.asarray(v) for k, v in per_layer_leaves(adapter_of(model)).items()}
    tensors, adapted_modules, conv1d = peft_tensors(recipe.architecture, recipe.model, arrays,
                                                    run_dir)
    targets = target_modules(recipe.architecture, recipe.model, adapted_modules)
    write_adapter(out, tensors, adapter_config(recipe.lora, targets, conv1d, _hf_base(run_dir)))
    write_tokenizer(tokenizer, run_dir, out)
    return out


def _hf_base(run_dir: Path) -> str | None:
    """The Hugging Face folder the base run was imported from (PEFT's
    `base_model_name_or_path`), when it was imported and is not itself adapted."""
    base_dir = recorded_base(run_dir)
    checkpoints = Checkpoints(base_dir)
    try:
        meta = checkpoints.meta(checkpoints.latest_step())
    finally:
        checkpoints.close()
    return None if BASE_KEY in meta else meta.get("imported_from")


def import_peft(hf_dir: str | Path, adapter_dir: str | Path, out: str | Path,
                block_size: int | None = None) -> Path:
    """Import the Hugging Face model `hf_dir` into `out/base` and PEFT's LoRA adapter
    `adapter_dir` over it into the LoRA run `out`. The adapter is checked against the model
    before anything is written, and `out/base` is removed again if what follows fails.
    `lora_dropout` becomes the run's `lora.dropout` where it adapts only attention and MLP
    projections (gptzoo's dropout acts on those alone), else 0; it does not change the
    adapter's outputs."""
    hf_dir, adapter_dir, out = Path(hf_dir), Path(adapter_dir), Path(out)
    config = read_adapter_config(adapter_dir)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise GptzooError(f"{out} already holds checkpoints; pass a new --out folder")
    hf = read_config(hf_dir, block_size)
    plain = eqx.filter_eval_shape(build_architecture, hf.architecture, hf.config,
                                  hf.config.vocab_size, key=jax.random.PRNGKey(0))
    with open_safetensors(adapter_dir / "adapter_model.safetensors") as f:
        stored = _without_base_copies({k: f.get_tensor(k) for k in f.keys()}, hf_dir,
                                      adapter_dir)
    tensors = {k: np.asarray(v, np.float32) for k, v in stored.items()}
    arrays = adapter_arrays(hf.architecture, hf.config, shapes(per_layer_leaves(plain, is_shape)),
                            tensors, config["r"], adapter_dir)
    adapted_paths = {n[:-len(".lora_a")] for n in arrays if n.endswith(".lora_a")}
    targets, scanned = _targets(plain, adapted_paths)
    dropout = config.get("lora_dropout") or 0.0
    if not all(re.search(PROJECTIONS, path) for path in adapted_paths):
        dropout = 0.0
    settings = LoRAConfig(rank=config["r"], alpha=config.get("lora_alpha", 8),
                          rslora=bool(config.get("use_rslora")), dropout=dropout, targets=targets)
    made_base = not (out / BASE_FOLDER).exists()
    import_hf(hf_dir, out / BASE_FOLDER, block_size)
    try:
        _save_adapter_run(out, adapter_dir, settings, scanned, arrays)
    except BaseException:
        if made_base:
            shutil.rmtree(out / BASE_FOLDER, ignore_errors=True)
        raise
    return out


def _without_base_copies(tensors: dict[str, np.ndarray], hf_dir: Path,
                         adapter_dir: Path) -> dict[str, np.ndarray]:
    """`tensors` without the copies of base weights PEFT saves beside an adapted `lm_head`
    (`...lm_head.base_layer.weight`, for a vocabulary resized in fine-tuning), each checked equal
    to the model's own; the others are refused by `adapter_arrays`."""
    copies = {key: key.removeprefix(PREFIX).replace(".base_layer.weight", ".weight")
              for key in tensors if key.endswith(".base_layer.weight")}
    with open_tensors(hf_dir) as stored:
        copies = {key: name for key, name in copies.items() if name in stored}
        for key, name in copies.items():
            if not np.array_equal(tensors[key], stored[name].astype(tensors[key].dtype)):
                raise GptzooError(f"{adapter_dir}: {key} differs from {hf_dir}'s {name} (a "
                                  "vocabulary resized or trained in fine-tuning), which gptzoo "
                                  "does not import; pass the model the adapter was trained on")
    return {key: tensor for key, tensor in tensors.items() if key not in copies}


def _save_adapter_run(out: Path, adapter_dir: Path, settings: LoRAConfig, scanned: bool,
                      arrays: dict[str, np.ndarray]) -> None:
    """The LoRA run `out` over its imported base `out/base`: the base's recipe with `settings`,
    and the adapter `arrays` as its step 0, checked against what that recipe builds."""
    base, tokenizer = load(out / BASE_FOLDER)
    recipe = load_run_recipe(out / BASE_FOLDER)
    recipe.name = adapter_dir.name
    recipe.model.scan_layers &= scanned
    recipe.lora = settings
    template = adapter_of(eqx.filter_eval_shape(
        lambda: adapted(recipe.build(tokenizer.vocab_size, key=jax.random.PRNGKey(0)), recipe,
                        key=jax.random.PRNGKey(0))))
    differences = shape_differences(shapes(per_layer_leaves(template, is_shape)), shapes(arrays),
                                    str(adapter_dir), "the base model")
    if differences:
        raise GptzooError(f"{adapter_dir}: {differences[0]}; the adapter was made for another "
                          "model")
    adapters = replace_per_layer(template, {k: jnp.asarray(v) for k, v in arrays.items()})
    save_recipe(recipe, out)
    _copy(TOKENIZER_FILES, out / BASE_FOLDER, out)
    meta = {"tokenizer": tokenizer.to_dict(), "imported_from": str(adapter_dir.absolute()),
            "recipe": {"name": recipe.name, **recipe.to_dict()},
            BASE_KEY: {"path": BASE_FOLDER, "hash": content_hash(base)}}
    checkpoints = Checkpoints(out)
    checkpoints.save(0, adapters, {"none": jnp.int32(0)}, meta)
    checkpoints.close()


def _targets(model, adapted: set[str]) -> tuple[str, bool]:
    """A `lora.targets` expression selecting exactly the `adapted` projections of `model`, and
    whether a scanned stack can hold them: the projections' names without their layer
    (`(^|\\.)(attention\\.qkv|mlp\\.down)$`) when every layer has the same ones, else every path."""
    kinds = sorted({re.sub(r"^.*\.\d+\.", "", path) for path in adapted})
    by_kind = r"(^|\.)(" + "|".join(map(re.escape, kinds)) + r")$"
    if {p for p in projection_paths(model) if re.search(by_kind, p)} == adapted:
        return by_kind, True
    return "^(" + "|".join(map(re.escape, sorted(adapted))) + ")$", False
