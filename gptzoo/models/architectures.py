"""The built-in architectures: a name, a config dataclass of the builder's arguments, a builder.

A run directory of a built-in architecture is rebuilt from its JSON config alone (no Python file
from the run directory is executed), which is what makes imported weights safe to load.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxtyping import PRNGKeyArray

from gptzoo.models.gpt import GPT, gpt2
from gptzoo.models.llama import llama


@dataclasses.dataclass
class GPT2Config:
    """`gpt2`'s arguments. `vocab_size=None` takes the tokenizer's size."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    block_size: int = 128
    dropout: float = 0.0
    use_bias: bool = True
    tie_head: bool = True
    norm_eps: float = 1e-5
    approximate_gelu: bool = True
    init: str = "gpt2"
    scan_layers: bool = True  # identical blocks stacked and run with lax.scan
    vocab_size: int | None = None


@dataclasses.dataclass
class LlamaConfig:
    """`llama`'s arguments. `vocab_size=None` takes the tokenizer's size; an imported model keeps
    its own (often padded past the tokenizer's)."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    block_size: int = 128
    dropout: float = 0.0
    use_bias: bool = False
    tie_head: bool = False
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_hidden: int | None = None
    multiple_of: int = 256
    rotary_base: float = 10000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool | None = None
    scan_layers: bool = True  # identical blocks stacked and run with lax.scan
    vocab_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Architecture:
    config: type
    builder: Callable[..., GPT]


ARCHITECTURES = {"gpt2": Architecture(GPT2Config, gpt2), "llama": Architecture(LlamaConfig, llama)}


def build_architecture(name: str, config: Any, vocab_size: int, *, key: PRNGKeyArray) -> GPT:
    """The model of built-in architecture `name` from its config (a dataclass of its arguments).

    The config's `vocab_size`, when set, must hold the tokenizer's `vocab_size` tokens.
    """
    fields = dataclasses.asdict(config)
    own_vocab = fields.pop("vocab_size")
    if own_vocab is not None and own_vocab < vocab_size:
        raise ValueError(f"model.vocab_size={own_vocab} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; raise it or set it to None")
    return ARCHITECTURES[name].builder(own_vocab or vocab_size, **fields, key=key)
