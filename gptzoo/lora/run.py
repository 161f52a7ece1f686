"""A LoRA run directory: its recipe has `lora.rank > 0`, and its checkpoints hold the adapters
alone and name the run they adapt, the base, by path and content hash (`lora_base` in each
checkpoint's record). Loading it loads the base, checks that its weights are the ones the
adapters were trained on, and adds the adapters, merged into the weights or kept apart."""

import hashlib
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.lora.adapters import adapter_of, add_lora, merge_lora
from gptzoo.models.names import (
    is_shape,
    named_leaves,
    path_name,
    per_layer_leaves,
    replace_arrays,
    replace_per_layer,
    shape_differences,
    shapes,
)
from gptzoo.nn import Stack

BASE_KEY = "lora_base"  # {"path": base run directory, absolute or relative to the run's, "hash"}


def lora_splits(recipe) -> dict[str, tuple[int, ...]]:
    """The fused projections of a built-in architecture that get one adapter per part: those
    that Hugging Face's model of the family holds as several (LLaMA's q/k/v and gate/up, not
    GPT-2's `c_attn`), so that every adapter is one of PEFT's. None for a custom recipe."""
    from gptzoo.hf.peft import fused_splits, has_hf_family

    if not has_hf_family(recipe.architecture):
        return {}
    return fused_splits(recipe.architecture, recipe.model)


def adapted(model, recipe, *, key):
    """`model` with the adapters of `recipe.lora`."""
    return add_lora(model, recipe.lora, lora_splits(recipe), key=key)


def content_hash(model) -> str:
    """A digest of `model`'s arrays by per-layer name, shape, dtype and bytes, the same whether
    it scans its layers or not. A stack's layers are read as views, never copied."""
    digest = hashlib.sha256()
    for name, array in sorted(_per_layer_arrays(model), key=lambda item: item[0]):
        digest.update(f"{name} {array.shape} {array.dtype};".encode())
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()[:16]


def _per_layer_arrays(model):
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda x: isinstance(x, Stack))
    for path, node in flat:
        if isinstance(node, Stack):
            for name, array in named_leaves(node.layers).items():
                host = np.asarray(array)
                for i in range(node.n_layers):
                    yield f"{path_name(path)}.{i}.{name}", host[i]
        elif eqx.is_array(node):
            yield path_name(path), np.asarray(node)


def base_reference(base_dir: Path, base_model) -> dict:
    return {"path": str(Path(base_dir).absolute()), "hash": content_hash(base_model)}


def base_dir_of(reference: dict, run_dir: Path) -> Path:
    return Path(run_dir) / reference["path"]  # an absolute path stays as it is


def recorded_base(run_dir: Path) -> Path | None:
    """The base run that `run_dir`'s newest checkpoint names, if it names one."""
    from gptzoo.trainer.checkpoint import Checkpoints

    if not (run_dir / "checkpoints").is_dir():
        return None
    checkpoints = Checkpoints(run_dir)
    try:
        step = checkpoints.latest_step()
        reference = None if step is None else checkpoints.meta(step).get(BASE_KEY)
    finally:
        checkpoints.close()
    return None if reference is None else base_dir_of(reference, run_dir)


def check_base(reference: dict, base_model, run_dir: Path) -> None:
    """One line unless `base_model` hashes as the base the adapters were trained on."""
    found = content_hash(base_model)
    if found != reference["hash"]:
        raise GptzooError(
            f"{run_dir}'s adapters were trained on base run {base_dir_of(reference, run_dir)} "
            f"with weights {reference['hash']}, and its weights are now {found}: the base run "
            "changed; restore the run the adapters were trained on")


def check_resumable_base(saved: dict, current: dict, run_dir: Path) -> None:
    """One line unless a resumed run's checkpoint record `saved` names the same base (by hash)
    as the run set up now, `current`: adapters go on the weights they were trained on."""
    if saved.get(BASE_KEY, {}).get("hash") != current.get(BASE_KEY, {}).get("hash"):
        raise GptzooError(f"--resume over another base: the checkpoint's adapters in {run_dir} "
                          f"were trained on {saved.get(BASE_KEY)}, --init-from gives "
                          f"{current.get(BASE_KEY)}; resume with the base they were trained on")


def load_base(reference: dict, run_dir: Path):
    """The model of the base run `reference` names, checked against its hash."""
    from gptzoo.trainer.run_dir import load

    base_dir = base_dir_of(reference, run_dir)
    if not (base_dir / "checkpoints").is_dir():
        raise GptzooError(f"{run_dir}'s adapters adapt the base run {base_dir}, which is not "
                          "there (moved or deleted); put it back at that path")
    base, _ = load(base_dir)
    check_base(reference, base, run_dir)
    return base


def load_adapted(run_dir: Path, recipe, checkpoints, step: int, meta: dict, vocab_size: int,
                 merge: bool = True):
    """The model of LoRA run `run_dir` at `step`: its base's weights plus the adapters read from
    `checkpoints`, merged (a plain model) or kept apart as `LoRALinear`s."""
    base = load_base(meta[BASE_KEY], run_dir)
    plain = eqx.filter_eval_shape(recipe.build, vocab_size, key=jax.random.PRNGKey(0))
    base = _in_layout(plain, base, run_dir)
    template = eqx.filter_eval_shape(lambda m: adapted(m, recipe, key=jax.random.PRNGKey(0)),
                                     plain)
    adapters = checkpoints.restore(step, adapter_of(template))
    model = replace_arrays(template, {**named_leaves(base), **named_leaves(adapters)})
    return merge_lora(model) if merge else model


def _in_layout(template, base, run_dir: Path):
    """`base`'s weights in `template`'s layout (its recipe may scan layers the other way)."""
    if shapes(named_leaves(base)) == shapes(named_leaves(template, is_shape)):
        return base
    ours, theirs = per_layer_leaves(template, is_shape), per_layer_leaves(base)
    differences = shape_differences(shapes(ours), shapes(theirs), "the base run", "the recipe")
    if differences:
        raise GptzooError(f"{run_dir}'s base run does not fit its recipe: {differences[0]}; "
                          "use the base run the adapters were trained on")
    return replace_per_layer(template, theirs)
