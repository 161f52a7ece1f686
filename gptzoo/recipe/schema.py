"""A recipe: its sections, how a key is read and set, and the checks it must pass."""

import dataclasses
import difflib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptzoo.data.batch_schedule import checked_schedule
from gptzoo.errors import GptzooError
from gptzoo.lora.config import LoRAConfig, compile_targets
from gptzoo.models import build_architecture
from gptzoo.recipe.overrides import coerce
from gptzoo.recipe.sections import (
    CHECKS,
    SECTIONS,
    DataConfig,
    MeshConfig,
    OptimizerConfig,
    TrainerConfig,
)


@dataclasses.dataclass
class Recipe:
    name: str
    source: Path
    build_model: Callable[..., Any] | None
    model: Any
    data: DataConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    architecture: str | None = None  # a built-in, built from `model` without build_model
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def build(self, vocab_size: int, *, key) -> Any:
        """The recipe's model from its (overridden) model section."""
        try:
            if self.architecture is not None:
                return build_architecture(self.architecture, self.model, vocab_size, key=key)
            return self.build_model(self.model, vocab_size, key=key)
        except (ValueError, TypeError) as e:
            raise GptzooError(f"recipe {self.source.name}: cannot build the model: {e}") from e

    def keys(self) -> list[str]:
        return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(self, s))]

    def get(self, key: str) -> Any:
        section, field = self._split(key)
        return getattr(getattr(self, section), field)

    def set(self, key: str, value: Any) -> None:
        """Set `section.field` to `value`: a string from the command line, or a JSON value."""
        section, field = self._split(key)
        config = getattr(self, section)
        setattr(config, field, coerce(key, value, typing.get_type_hints(type(config))[field]))

    def to_dict(self) -> dict[str, Any]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def validate(self) -> None:
        for key, ok, what in CHECKS:
            if key in self.keys() and not ok(self.get(key)):
                raise GptzooError(f"{key}={self.get(key)!r} must be {what}; "
                                  f"fix it with --set {key}=...")
        checked_schedule(self.trainer.batch_size, self.trainer.batch_schedule,
                         self.trainer.grad_accum_steps)
        compile_targets(self.lora.targets)

    def _split(self, key: str) -> tuple[str, str]:
        if key not in self.keys():
            close = difflib.get_close_matches(key, self.keys(), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else "run `gptzoo keys RECIPE` to list them"
            raise GptzooError(f"unknown recipe key {key!r} in {self.source.name}; {hint}")
        section, field = key.split(".", 1)
        return section, field
