"""Model FLOPs utilisation: the FLOPs a training step must do, over what the devices could do.

A decoder-only transformer trains with about `6 N` FLOPs per token for its `N` matrix parameters
(forward 2N, backward 4N) plus the attention scores and their weighted sum, `12 L d T` for `L`
layers `d` wide over a context of `T` (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's
`estimate_mfu`). Recomputation under remat is not counted: MFU measures useful work.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp

# Dense bfloat16 peak FLOP/s per device from the vendors' datasheets (no sparsity), matched
# against `device.device_kind` by prefix, longest first.
PEAK_FLOPS = {
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def count_parameters(model) -> int:
    """The number of values in the model's arrays, the `N` above (embeddings included)."""
    return sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def flops_per_token(n_params: int, n_layers: int, d_model: int, context: int) -> float:
    """Training FLOPs per token: `6 N + 12 L d T` (see the module docstring)."""
    return 6 * n_params + 12 * n_layers * d_model * context


def known_peak_flops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak from `PEAK_FLOPS`, or None for a device not in the table."""
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if device.device_kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


def measured_matmul_flops(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of the best of `repeats` square matmuls on the default device: the stand-in peak
    for a CPU, whose datasheet peak depends on the cores and vector units a process gets."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - clock)
    return 2 * size**3 / best


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float,
        n_devices: int) -> float:
    """The fraction of the devices' peak that the model's own FLOPs use."""
    return tokens_per_sec * flops_per_token / (peak_per_device * n_devices)
