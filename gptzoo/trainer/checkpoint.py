"""Orbax checkpoints of a run: model parameters and optimizer state as arrays keyed by their module
paths (`blocks.3.attention.qkv.weight`), and a JSON record of the rest (step, PRNG key, tokenizer,
resolved recipe, every array's shape). The data position is the step itself: batches are drawn
from `fold_in(key, step)`.

A checkpoint is complete or absent: orbax writes each step into `<step>.orbax-checkpoint-tmp`
and renames it to `<step>` only once every file is written, and lists only renamed folders, so a
process killed mid-save leaves a temporary folder that the next save of that step removes. A
complete folder that later became unreadable is skipped in favour of the newest readable one.
"""

import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from gptzoo.errors import GptzooError
from gptzoo.models.names import named_leaves, replace_arrays, shape_differences, shapes
from gptzoo.nn.leaves import is_array_or_shape
from gptzoo.nn.stack import same_layout, stacked, unstacked
from gptzoo.workarounds import orbax_arrays_without_sharding_file

T = TypeVar("T")
orbax_arrays_without_sharding_file()  # restores name their shardings: see `_abstract`
_SAVE_MARGIN_BYTES = 1_000_000  # orbax's metadata and the JSON record, with room to spare
_PARTIAL_SETTLE_TRIES, _PARTIAL_SETTLE_SECONDS = 20, 0.1  # at most ~2 s after a failed save
BEST = "best"  # RUN_DIR/best: see BestCheckpoint


class UnreadableCheckpoint(GptzooError):
    """A checkpoint's files cannot be read back (as opposed to not fitting the recipe)."""


def named_arrays(tree) -> dict[str, Any]:
    """The arrays of a module or optimizer state keyed by path, e.g. `blocks.0.mlp.fc.weight`."""
    return named_leaves(tree, is_array_or_shape)


def _abstract(tree) -> dict[str, jax.ShapeDtypeStruct]:
    """Restore targets keeping the templates' shardings: a model and state sharded on the current
    mesh (as the trainer builds them) are read back split the same way, whichever mesh wrote the
    checkpoint."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {name: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=getattr(a, "sharding", None) or default)
            for name, a in named_arrays(tree).items()}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Checkpoints:
    """The `checkpoints/` folder of a run directory, keeping the newest `keep` steps."""

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
        """The newest complete step (readable or not: see `restore_newest`)."""
        return self.manager.latest_step()

    def save(self, step: int, model, opt_state, meta: dict[str, Any]) -> None:
        """Save `step` unless it already is; a save that cannot fit on the disk, or fails writing,
        leaves the earlier checkpoints as they were and raises a one-line error."""
        if step in self.manager.all_steps():
            return
        arrays = {"model": named_arrays(model), "opt_state": named_arrays(opt_state)}
        needed = sum(a.nbytes for tree in arrays.values() for a in tree.values())
        free = shutil.disk_usage(self.directory).free
        if free < needed + _SAVE_MARGIN_BYTES:  # refuse before orbax writes half a checkpoint
            self._failed(step, f"it needs about {needed / 1e6:,.1f} MB, {free / 1e6:,.1f} MB free")
        item_shapes = {item: shapes(tree) for item, tree in arrays.items()}
        try:
            self.manager.save(step, force=True, args=ocp.args.Composite(
                model=ocp.args.StandardSave(arrays["model"]),
                opt_state=ocp.args.StandardSave(arrays["opt_state"]),
                meta=ocp.args.JsonSave({**meta, "step": step, "shapes": item_shapes}),
            ))
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax wraps OSErrors in many kinds
            try:  # let orbax's writer threads stop before removing what they wrote
                self.manager.wait_until_finished()
            except Exception:  # noqa: BLE001, S110 - the first error is the one reported
                pass
            self._remove_partial(step)
            self.manager.reload()
            self._failed(step, _reason(e), e)

    def _remove_partial(self, step: int) -> None:
        """Remove what a failed save of `step` wrote. When one array's write fails, tensorstore's
        threads may still finish the others and recreate the folder after it is removed, so it
        is removed until it stays gone for a moment (a leftover would not be trusted anyway:
        orbax lists only renamed folders)."""
        for _ in range(_PARTIAL_SETTLE_TRIES):
            partials = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            if not partials:
                time.sleep(_PARTIAL_SETTLE_SECONDS)
                if not any(self.directory.glob(f"{step}.orbax-checkpoint-tmp*")):
                    return
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)

    def _failed(self, step: int, reason: str, cause: Exception | None = None):
        earlier = self.manager.latest_step()
        kept = f"step {earlier} is intact" if earlier is not None else "no earlier checkpoint"
        raise GptzooError(f"could not save checkpoint step {step} in {self.directory} ({reason}); "
                          f"{kept}; free disk space, then continue with --resume") from cause

    def meta(self, step: int) -> dict[str, Any]:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def differences(self, step: int, model, opt_state=None) -> list[str]:
        """How `step`'s arrays differ from those of `model` (and `opt_state`, whose names get an
        `opt_state.` prefix) by name and shape, e.g. `["checkpoint has blocks.0.mlp.fc.weight
        (128, 512); the recipe builds (128, 384)"]`; empty when they fit."""
        saved_shapes = self.meta(step).get("shapes")
        if saved_shapes is None:
            raise UnreadableCheckpoint(
                f"checkpoint {self.directory / str(step)} predates arrays keyed by name; "
                "retrain it with this version of gptzoo")
        saved, built = saved_shapes["model"], shapes(named_arrays(model))
        if opt_state is not None:
            saved = {**saved, **{f"opt_state.{k}": v for k, v in saved_shapes["opt_state"].items()}}
            built = {**built, **{f"opt_state.{k}": v
                                 for k, v in shapes(named_arrays(opt_state)).items()}}
        return shape_differences(built, saved, "checkpoint", "the recipe")

    def restore(self, step: int, model, opt_state=None):
        """Fill the arrays of `model` (and `opt_state`) templates, which may be abstract, by name;
        a checkpoint whose names or shapes differ is refused with the differences. One written
        in the other layout (layers stacked or not: `scan_layers`) is restored into that layout
        and converted."""
        template, converted = (model, opt_state), self._saved_layout(step, model, opt_state)
        if converted is not None:
            model, opt_state = converted
        differences = self.differences(step, model, opt_state)
        if differences:
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise GptzooError(
                f"checkpoint {self.directory / str(step)} does not fit the recipe: "
                f"{'; '.join(differences[:3])}{more}; use the recipe it was trained with")
        items = {"model": ocp.args.StandardRestore(_abstract(model))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
        restored = self._restore(step, **items)
        model = replace_arrays(model, restored["model"])
        if opt_state is not None:
            opt_state = replace_arrays(opt_state, restored["opt_state"])
        if converted is not None:
            model, opt_state = same_layout(template, (model, opt_state))
        return model if opt_state is None else (model, opt_state)

    def _saved_layout(self, step: int, model, opt_state):
        """`(model, opt_state)` per layer or stacked when `step`'s arrays are in that layout and
        not in the given one; else None."""
        if not self.differences(step, model, opt_state):
            return None
        for layout in (unstacked, stacked):
            candidate = layout((model, opt_state))
            if not self.differences(step, *candidate):
                return candidate
        return None

    def restore_newest(self, restore: Callable[[int], T], discard_unreadable: bool = False,
                       warn: Callable[[str], None] = _warn) -> tuple[int, T] | None:
        """`(step, restore(step))` for the newest step that `restore` can read, warning about
        each newer one it skips; None when there is no checkpoint. `discard_unreadable` deletes
        the skipped ones, so that a resumed run can save those steps again."""
        skipped: list[UnreadableCheckpoint] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                result = restore(step)
            except UnreadableCheckpoint as e:
                skipped.append(e)
                continue
            for e in skipped:
                warn(f"{e}; fell back to step {step}")
            if discard_unreadable and skipped:
                for bad in self.manager.all_steps():
                    if bad > step:
                        self.manager.delete(bad)
            return step, result
        if skipped:
            raise skipped[0]
        return None

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many kinds; all mean unreadable here
            raise UnreadableCheckpoint(
                f"checkpoint {self.directory / str(step)} is unreadable or corrupt ({_reason(e)})"
            ) from e

    def close(self) -> None:
        self.manager.close()


class BestCheckpoint:
    """`RUN_DIR/best`, a run directory of its own (recipe, tokenizer and one checkpoint) holding
    the step of the lowest validation loss so far, saved at each evaluation that lowers it (as
    nanoGPT's `always_save_checkpoint=False` keeps its `ckpt.pt`): `gptzoo sample`, `eval` and
    `export-hf` and `--init-from` read `RUN_DIR/best` as they read any run directory, so a run
    that overfits still yields the model from before it did."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None] = _warn):
        self.run_dir = run_dir / BEST
        self.checkpoints = Checkpoints(self.run_dir, keep=1)
        self.step, self.val_loss = None, math.inf  # a resumed run's, read from its checkpoint
        try:
            found = self.checkpoints.restore_newest(self.checkpoints.meta, warn=warn)
        except UnreadableCheckpoint as e:
            warn(f"{e}; the next evaluation's step replaces it")
            found = None
        if found is not None:
            self.step, self.val_loss = found[0], found[1]["val_loss"]

    def offer(self, step: int, val_loss: float, model, opt_state, meta: dict[str, Any]) -> None:
        """Save `step` if `val_loss` is the lowest so far (a NaN never is)."""
        if val_loss < self.val_loss:
            self.checkpoints.save(step, model, opt_state, {**meta, "val_loss": val_loss})
            self.step, self.val_loss = step, val_loss

    def close(self) -> None:
        self.checkpoints.close()


def _reason(e: BaseException) -> str:
    """The operating system's words when an OS error is behind `e` (tensorstore only quotes its
    code), else `e`'s first line."""
    cause = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if code := re.search(r"os_error_code='(\d+)'", str(cause)):
            return os.strerror(int(code.group(1)))
        cause = cause.__cause__
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {first}"
