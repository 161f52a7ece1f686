"""What a run trains and checkpoints: every array, or, for a LoRA run (`lora.rank > 0`), the
adapters alone over its `--init-from` run's frozen weights, checkpointed with that base's name
and content hash."""

from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx

from gptzoo.errors import GptzooError
from gptzoo.lora.adapters import adapter_of, split_adapter
from gptzoo.lora.run import BASE_KEY, adapted, base_reference
from gptzoo.trainer.flops import count_parameters
from gptzoo.trainer.step import trainable_arrays


@dataclass
class Trainable:
    """`partition(model) -> (trained, frozen)`; `base`: a LoRA run's base reference, or None."""

    partition: Callable = trainable_arrays
    base: dict | None = None

    def checkpointed(self, model):
        """The part of `model` its checkpoints hold: the adapters of a LoRA run, else all."""
        return model if self.base is None else adapter_of(model)

    def restored(self, model, saved):
        """`model` with its checkpointed part replaced by `saved` (restored from a checkpoint)."""
        return saved if self.base is None else eqx.combine(saved, split_adapter(model)[1])

    def meta(self) -> dict:
        """What every checkpoint's record adds: the base a LoRA run adapts."""
        return {} if self.base is None else {BASE_KEY: self.base}

    def describe(self, model) -> str:
        if self.base is None:
            return ""
        return (f" ({count_parameters(adapter_of(model)):,} of them in LoRA adapters, the only "
                "ones trained)")


def trainable(recipe, model, initial, *, key) -> tuple[eqx.Module, Trainable]:
    """`model` (already holding `initial`'s weights, if any) with `recipe.lora`'s adapters when
    `lora.rank > 0`, and what trains. LoRA needs a base run to adapt: `initial`."""
    if not recipe.lora.rank:
        return model, Trainable()
    if initial is None:
        raise GptzooError(f"lora.rank={recipe.lora.rank} trains adapters over a run's frozen "
                          "weights; pass --init-from RUN_DIR (a trained or imported run)")
    base = base_reference(initial.run_dir, initial.model)
    return adapted(model, recipe, key=key), Trainable(split_adapter, base)
