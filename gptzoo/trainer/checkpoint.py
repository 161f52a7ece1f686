"""Orbax checkpoints of a run: model parameters, optimizer state and a JSON record of the rest
(step, PRNG key, tokenizer, resolved recipe). The data position is the step itself: batches are
drawn from `fold_in(key, step)`."""

from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import orbax.checkpoint as ocp

from gptzoo.errors import GptzooError


def _is_array(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _arrays(tree) -> list:
    return jax.tree.leaves(eqx.filter(tree, _is_array))


def _abstract(tree) -> list:
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or default)
            for a in _arrays(tree)]


def _fill(template, leaves: list):
    params, static = eqx.partition(template, _is_array)
    treedef = jax.tree.structure(params)
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int = 3):
        self.directory = (run_dir / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False,
            ),
            item_names=("model", "opt_state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, opt_state, meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(_arrays(model)),
            opt_state=ocp.args.StandardSave(_arrays(opt_state)),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        ))
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict[str, Any]:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, step: int, model, opt_state=None):
        """Fill the arrays of `model` (and `opt_state`) templates, which may be abstract."""
        items = {"model": ocp.args.StandardRestore(_abstract(model))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
        restored = self._restore(step, **items)
        model = _fill(model, restored["model"])
        return model if opt_state is None else (model, _fill(opt_state, restored["opt_state"]))

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many kinds; all mean unreadable here
            raise GptzooError(
                f"checkpoint {self.directory / str(step)} is unreadable or corrupt "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                "delete that step's folder to fall back to an earlier checkpoint"
            ) from e

    def close(self) -> None:
        self.manager.close()


def param_shapes(model) -> list[list[int]]:
    return [list(a.shape) for a in _arrays(model)]


def load(run_dir: str | Path):
    """The model and tokenizer of a run directory's latest checkpoint (no training state)."""
    from gptzoo.data import tokenizer_from_dict
    from gptzoo.recipe import load_run_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptzooError(f"run directory {run_dir} does not exist; pass the --run-dir of a "
                          "`gptzoo train` run, e.g. runs/char_shakespeare")
    if not (run_dir / "checkpoints").is_dir():
        raise GptzooError(f"{run_dir} holds no checkpoints; train it first with gptzoo train")
    recipe = load_run_recipe(run_dir)
    checkpoints = Checkpoints(run_dir)
    step = checkpoints.latest_step()
    if step is None:
        raise GptzooError(f"{run_dir} holds no checkpoints; train it first with gptzoo train")
    tokenizer = tokenizer_from_dict(checkpoints.meta(step)["tokenizer"])
    template = eqx.filter_eval_shape(recipe.build, tokenizer.vocab_size, key=jax.random.PRNGKey(0))
    model = checkpoints.restore(step, template)
    checkpoints.close()
    return model, tokenizer
