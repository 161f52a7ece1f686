"""The model section of a recipe: the sizes every model shares, and what a family's config adds.

A recipe with its own `build_model` may use `ModelConfig` (or extend it with fields of its own);
a built-in family's config extends `ArchitectureConfig`, and the family's builder takes it.
"""

import dataclasses
from typing import Self


@dataclasses.dataclass
class ModelConfig:
    """The fields of a model section every model shares; each is a `--set model.FIELD` key."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    block_size: int = 128  # the context length, also the training window
    dropout: float = 0.0
    use_bias: bool = True
    tie_head: bool = True  # the output head shares the token embedding
    scan_layers: bool = True  # identical blocks stacked and run with lax.scan


@dataclasses.dataclass
class ArchitectureConfig(ModelConfig):
    """A built-in family's config (`gptzoo.models.registry`). `vocab_size=None` takes the
    tokenizer's size; an imported model keeps its own (often padded past the tokenizer's).

    Sizes left `None` to take a default (a head width, a hidden width) stay `None` in the recipe,
    so that overriding `d_model` moves them along; `resolved()` works them out, in one place.
    """

    vocab_size: int | None = None

    def resolved(self) -> Self:
        """A copy with every size left to its default worked out: what the builder and the
        Hugging Face mapping read. A family with derived sizes overrides it."""
        return dataclasses.replace(self)
