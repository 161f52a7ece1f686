import dataclasses

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptzoo.nn._typecheck import typecheck


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """LLaMA 3.1's frequency scaling for long contexts: wavelengths longer than
    `original_context / low_freq_factor` are stretched by `factor`, those shorter than
    `original_context / high_freq_factor` kept, and the band between interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        wavelength = 2 * np.pi / theta
        # 0 below the band (long wavelengths, scaled), 1 above it (kept), linear in between.
        smooth = (self.original_context / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smooth = np.clip(smooth, 0.0, 1.0)
        return (1 - smooth) * theta / self.factor + smooth * theta


class Rotary(eqx.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021): a position hook for attention.

    Channel pair i of q and k at position m is rotated by the angle `m * theta_i`,
    `theta_i = base^(-2i / rotary_dim)`, so `q_m . k_n` depends on positions only through `m - n`.
    Only the first `rotary_dim = int(fraction * head_dim)` channels rotate; the rest pass through
    (GPT-J/NeoX partial rotary). `interleaved=True` pairs channels `(0, 1), (2, 3), ...` (GPT-J);
    False pairs `(i, i + rotary_dim / 2)` (GPT-NeoX, LLaMA). Angles come from the positions
    themselves, so any length works. `scaling` (e.g. `Llama3Scaling()`) maps the frequencies
    `theta` to the ones used.
    """

    head_dim: int = eqx.field(static=True)
    base: float = eqx.field(static=True)
    fraction: float = eqx.field(static=True)
    interleaved: bool = eqx.field(static=True)
    scaling: Llama3Scaling | None = eqx.field(static=True)

    def __init__(self, head_dim: int, *, base: float = 10000.0, fraction: float = 1.0,
                 interleaved: bool = False, scaling: Llama3Scaling | None = None):
        self.head_dim = head_dim
        self.base = base
        self.fraction = fraction
        self.interleaved = interleaved
        self.scaling = scaling

    @property
    def rotary_dim(self) -> int:
        return int(self.fraction * self.head_dim)

    def __check_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"Rotary fraction={self.fraction} must lie in (0, 1]; pass e.g. 0.25")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"Rotary rotary_dim = int(fraction * head_dim) = int({self.fraction} * "
                f"{self.head_dim}) = {self.rotary_dim} must be a positive even number of channels; "
                "choose a fraction that gives one"
            )

    def _rotate(
        self, x: Float[Array, "*batch seq heads head_dim"], positions: Int[Array, " seq"]
    ) -> Float[Array, "*batch seq heads head_dim"]:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"Rotary built for head_dim={self.head_dim} got heads of "
                             f"{x.shape[-1]} channels; build it with the attention's head_dim")
        half = self.rotary_dim // 2
        theta = self.base ** (-2 * np.arange(half) / self.rotary_dim)
        theta = theta if self.scaling is None else self.scaling(theta)
        # Angles in float32 whatever x's dtype: m * theta_0 = m must stay exact at large m.
        angles = positions.astype(jnp.float32)[:, None] * theta.astype(np.float32)
        cos, sin = (f(angles)[:, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if self.interleaved else jnp.split(rot, 2, -1)
        y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        if self.interleaved:
            rot = jnp.stack([y1, y2], axis=-1).reshape(rot.shape)
        else:
            rot = jnp.concatenate([y1, y2], axis=-1)
        return jnp.concatenate([rot, rest], axis=-1)

    @typecheck
    def __call__(
        self, q: Float[Array, "*batch q heads head_dim"],
        k: Float[Array, "*batch k kv_heads head_dim"],
        q_positions: Int[Array, " q"], k_positions: Int[Array, " k"],
    ) -> tuple[Float[Array, "*batch q heads head_dim"], Float[Array, "*batch k kv_heads head_dim"],
               None]:
        return self._rotate(q, q_positions), self._rotate(k, k_positions), None
