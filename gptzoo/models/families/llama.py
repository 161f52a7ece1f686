"""LLaMA (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU and grouped-query attention;
with the variants that share its layout: Mistral's sliding window, Qwen2's q/k/v biases and
Qwen3's QK-norm, in their Hugging Face formats (`llama_hf`)."""

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Self

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from gptzoo.models.config import ArchitectureConfig
from gptzoo.models.families import llama_hf
from gptzoo.models.gpt import GPT, decoder
from gptzoo.models.hf_format import HFFormat
from gptzoo.models.registry import Family, register
from gptzoo.nn import GLUMLP, Block, CausalSelfAttention, Llama3Scaling, RMSNorm, Rotary
from gptzoo.nn.glu import llama_hidden_dim


@dataclasses.dataclass
class LlamaConfig(ArchitectureConfig):
    """LLaMA's config: `ModelConfig`'s sizes (no biases and an untied head by default), and

    - `n_kv_heads`: key/value heads, shared by groups of query heads (None: `n_heads`).
    - `head_dim`: channels per head (None: `d_model // n_heads`).
    - `d_hidden`: SwiGLU's hidden width (None: `llama_hidden_dim(d_model, 4, multiple_of)`).
    - `multiple_of`: the default hidden width is rounded up to a multiple of it.
    - `rotary_base`: the rotary base (`rope_theta`).
    - `rope_scaling`: LLaMA 3.1's frequency scaling, `{"rope_type": "llama3", "factor": ...,
        "low_freq_factor": ..., "high_freq_factor": ..., "original_max_position_embeddings":
        ...}`, or None.
    - `norm_eps`: RMSNorm's epsilon (the QK-norm's too).
    - `qkv_bias`: biases on q/k/v (None: `use_bias`); True with `use_bias=False` is Qwen2's
        layout.
    - `mlp_bias`: biases on the SwiGLU's projections (None: `use_bias`); False with
        `use_bias=True` is Qwen3's `attention_bias`.
    - `sliding_window`: each query sees this many most recent positions, its own included
        (Mistral); None sees all of `block_size`.
    - `qk_norm`: "head", an RMSNorm of each head's queries and keys before rotary (Qwen3);
        "projection", over the whole projections (OLMo 2's form); or None.
    """

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
    mlp_bias: bool | None = None
    sliding_window: int | None = None
    qk_norm: str | None = None

    def resolved(self) -> Self:
        """Every `None` size and bias switch worked out."""
        return dataclasses.replace(
            self, n_kv_heads=self.n_kv_heads or self.n_heads,
            head_dim=self.head_dim or self.d_model // self.n_heads,
            d_hidden=self.d_hidden or llama_hidden_dim(self.d_model, 4, self.multiple_of),
            qkv_bias=self.use_bias if self.qkv_bias is None else self.qkv_bias,
            mlp_bias=self.use_bias if self.mlp_bias is None else self.mlp_bias)


def llama(vocab_size: int, *, key: PRNGKeyArray, **fields) -> GPT:
    """LLaMA of `vocab_size` tokens; `fields` are `LlamaConfig`'s (`n_layers`, `n_kv_heads`, ...).

    Weights start at N(0, 0.02), residual-stream outputs at N(0, 0.02 / sqrt(2 * n_layers)) as
    in GPT-2. `scan_layers`: see `decoder`.
    """
    return build(LlamaConfig(**fields).resolved(), vocab_size, key=key)


def build(c: LlamaConfig, vocab_size: int, *, key: PRNGKeyArray) -> GPT:
    """LLaMA from its resolved config (`Family.build`)."""

    def mlp(out_std: float, k: PRNGKeyArray) -> GLUMLP:
        return GLUMLP(c.d_model, activation="silu", d_hidden=c.d_hidden, dropout=c.dropout,
                      use_bias=c.mlp_bias, out_init_std=out_std, key=k)

    return llama_decoder(c, vocab_size, mlp, key=key)


def llama_decoder(c: LlamaConfig, vocab_size: int,
                  mlp: Callable[[float, PRNGKeyArray], eqx.Module], *, block: type = Block,
                  key: PRNGKeyArray, **decoder_args) -> GPT:
    """LLaMA's layout (RMSNorm, rotary, grouped-query attention, pre-norm `block`s) around the
    feed-forwards `mlp(out_init_std, key)` makes: LLaMA's SwiGLU, or Mixtral's experts in
    `nn.MoEBlock`s. `decoder_args` go on to `decoder`."""
    out_std = 0.02 / math.sqrt(2 * c.n_layers)
    scaling = _scaling(c.rope_scaling)

    def one_block(k: PRNGKeyArray) -> eqx.Module:
        attn_key, mlp_key = jax.random.split(k)
        return block(
            attn_norm=RMSNorm(c.d_model, eps=c.norm_eps),
            attention=CausalSelfAttention(
                c.d_model, c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                positional=Rotary(c.head_dim, base=c.rotary_base, scaling=scaling),  # half-split
                window=c.sliding_window, qk_norm=c.qk_norm, qk_norm_eps=c.norm_eps,
                dropout=c.dropout, use_bias=c.use_bias, qkv_bias=c.qkv_bias,
                out_init_std=out_std, key=attn_key),
            mlp_norm=RMSNorm(c.d_model, eps=c.norm_eps),
            mlp=mlp(out_std, mlp_key),
        )

    return decoder(vocab_size, block=one_block, n_layers=c.n_layers, d_model=c.d_model,
                   block_size=c.block_size, final_norm=RMSNorm(c.d_model, eps=c.norm_eps),
                   positions=None, tie_head=c.tie_head, dropout=c.dropout,
                   scan_layers=c.scan_layers, window=c.sliding_window, key=key, **decoder_args)


def _scaling(rope_scaling: dict | None) -> Llama3Scaling | None:
    if rope_scaling is None:
        return None
    if rope_scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling of type {rope_scaling.get('rope_type')!r} is not "
                         "implemented; use 'llama3' or None")
    return Llama3Scaling(
        factor=rope_scaling["factor"], low_freq_factor=rope_scaling["low_freq_factor"],
        high_freq_factor=rope_scaling["high_freq_factor"],
        original_context=rope_scaling["original_max_position_embeddings"])


def read_hf_config(cfg: dict, path: Path, block_size: int | None) -> LlamaConfig:
    """`LlamaConfig` of a LLaMA, Mistral, Qwen2 or Qwen3 `config.json`
    (`llama_hf.config_fields`)."""
    return LlamaConfig(**llama_hf.config_fields(cfg, path, block_size))


FAMILY = register(Family(
    name="llama", config=LlamaConfig, build=build,
    hf=HFFormat(classes=llama_hf.CLASSES, read_config=read_hf_config,
                write_config=llama_hf.write_config, params=llama_hf.params,
                buffers=("rotary_emb.inv_freq",)),
))
