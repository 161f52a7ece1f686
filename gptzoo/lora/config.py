"""A recipe's `lora` section: which projections get adapters, of what rank and scale."""

import dataclasses
import math
import re

from gptzoo.errors import GptzooError

# The attention and MLP projections of the zoo's blocks (self- and cross-attention, plain, gated
# and spatially gated MLPs, also inside the memory-KV and talking-heads wrappers): the default
# targets, and the projections whose callers pass a dropout key (`lora.dropout` acts on no
# other).
PROJECTIONS = r"(attention\.(qkv|q|kv|out)|mlp\.(up|gate_up|down))$"


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA): with `rank` > 0 a fine-tuning (`--init-from RUN`) trains only
    an adapter on each projection whose module path (`blocks.3.attention.qkv`) the regular
    expression `targets` finds; the run's weights stay frozen. Its update is scaled by
    `alpha / rank`, or `alpha / sqrt(rank)` with `rslora`."""

    rank: int = 0  # 0: no adapters, every weight trains
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0  # on the adapters' inputs
    targets: str = PROJECTIONS  # the attention and MLP projections

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# The recipe's checks of the section: (key, predicate, what it must be).
LORA_CHECKS = [
    ("lora.rank", lambda v: v >= 0, "0 (off) or a positive rank"),
    ("lora.alpha", lambda v: v > 0, "positive"),
    ("lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
]


def compile_targets(targets: str) -> re.Pattern:
    """`lora.targets` compiled, or one line saying why it is not a regular expression."""
    try:
        return re.compile(targets)
    except re.error as e:
        raise GptzooError(f"lora.targets={targets!r} is not a regular expression ({e}); fix it "
                          "with --set lora.targets=... (e.g. 'attention\\.qkv$')") from e
