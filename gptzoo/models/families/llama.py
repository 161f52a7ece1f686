"""LLaMA (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU and grouped-query attention;
with Mistral and Qwen2, which share its layout, in its Hugging Face format."""

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Self

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from gptzoo.errors import GptzooError
from gptzoo.models.config import ArchitectureConfig
from gptzoo.models.gpt import GPT, decoder
from gptzoo.models.hf_format import DEFAULT_MAX_BLOCK_SIZE, HFFormat, Param, param, unsupported
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
    - `norm_eps`: RMSNorm's epsilon.
    - `qkv_bias`: biases on q/k/v (None: `use_bias`); True with `use_bias=False` is Qwen2's
        layout.
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

    def resolved(self) -> Self:
        """Every `None` size and bias switch worked out."""
        return dataclasses.replace(
            self, n_kv_heads=self.n_kv_heads or self.n_heads,
            head_dim=self.head_dim or self.d_model // self.n_heads,
            d_hidden=self.d_hidden or llama_hidden_dim(self.d_model, 4, self.multiple_of),
            qkv_bias=self.use_bias if self.qkv_bias is None else self.qkv_bias)


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
                      use_bias=c.use_bias, out_init_std=out_std, key=k)

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
                dropout=c.dropout, use_bias=c.use_bias, qkv_bias=c.qkv_bias,
                out_init_std=out_std, key=attn_key),
            mlp_norm=RMSNorm(c.d_model, eps=c.norm_eps),
            mlp=mlp(out_std, mlp_key),
        )

    return decoder(vocab_size, block=one_block, n_layers=c.n_layers, d_model=c.d_model,
                   block_size=c.block_size, final_norm=RMSNorm(c.d_model, eps=c.norm_eps),
                   positions=None, tie_head=c.tie_head, dropout=c.dropout,
                   scan_layers=c.scan_layers, key=key, **decoder_args)


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


ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def read_hf_config(cfg: dict, path: Path, block_size: int | None) -> LlamaConfig:
    """`LlamaConfig` of a LLaMA, Mistral or Qwen2 `config.json`. `block_size` caps the context
    (default: `max_position_embeddings`, at most `DEFAULT_MAX_BLOCK_SIZE`)."""
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported(path, "hidden_act", cfg["hidden_act"], "silu")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported(path, "partial_rotary_factor", cfg["partial_rotary_factor"], "1.0")
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"
    attention_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    if not qwen2 and attention_bias != mlp_bias:
        unsupported(path, "attention_bias/mlp_bias", f"{attention_bias}/{mlp_bias}",
                    "equal values (biases everywhere or nowhere)")
    d_model, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rotary_base, rope_scaling = _rope(cfg, path)
    context = cfg.get("max_position_embeddings", 2048)
    # Mistral's (and Qwen2's, when switched on) sliding window: attention there reaches only
    # `sliding_window` positions back, so the context is clamped to it, which equals the model
    # as long as no input is longer than the window.
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", not qwen2):
        context = min(context, cfg["sliding_window"])
    return LlamaConfig(
        n_layers=cfg["num_hidden_layers"], n_heads=n_heads, d_model=d_model,
        block_size=block_size or min(context, DEFAULT_MAX_BLOCK_SIZE),
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or d_model // n_heads, d_hidden=cfg["intermediate_size"],
        rotary_base=rotary_base, rope_scaling=rope_scaling,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), use_bias=False if qwen2 else attention_bias,
        qkv_bias=True if qwen2 else None, tie_head=cfg.get("tie_word_embeddings", False),
        vocab_size=cfg["vocab_size"])


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from either config dialect: transformers 4.x
    (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters` holding both)."""
    params = cfg.get("rope_parameters")  # transformers 5.x
    if params is None:  # transformers 4.x
        params = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 1e4)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        unsupported(path, "rope type", rope_type, ", ".join(ROPE_TYPES))
    if rope_type == "default":
        return float(params["rope_theta"]), None
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise GptzooError(f"{path}: llama3 rope scaling lacks {', '.join(missing)}; add them")
    return float(params["rope_theta"]), {"rope_type": "llama3",
                                         **{k: params[k] for k in _LLAMA3_KEYS}}


def write_hf_config(c: LlamaConfig, vocab_size: int) -> dict:
    """The `config.json` of a LLaMA (or, with q/k/v biases alone, a Qwen2), in the transformers
    5.x dialect."""
    if c.use_bias and not c.qkv_bias:
        raise ValueError("biases everywhere but on q/k/v (model.qkv_bias=false) has no "
                         "transformers equivalent; export a run without that setting")
    qwen2 = c.qkv_bias and not c.use_bias
    rope = {"rope_type": "default", "rope_theta": c.rotary_base}
    if c.rope_scaling is not None:
        rope = {**c.rope_scaling, "rope_theta": c.rotary_base}
    return {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama", "vocab_size": vocab_size,
            "hidden_size": c.d_model, "intermediate_size": c.d_hidden,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "hidden_act": "silu", "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps, "rope_parameters": rope,
            "attention_bias": c.use_bias, "mlp_bias": c.use_bias,
            "tie_word_embeddings": c.tie_head, "dtype": "float32",
            "bos_token_id": None, "eos_token_id": None}


def hf_params(c: LlamaConfig) -> list[Param]:
    """q/k/v fused into our `qkv`, gate/up into `gate_up`; HF's Linear weights transposed."""
    q_width, kv_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    params = [param("token_embedding.weight", "model.embed_tokens.weight")]
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        qkv = (attn + "q_proj", attn + "k_proj", attn + "v_proj")
        widths = (q_width, kv_width, kv_width)
        gate_up = (mlp + "gate_proj", mlp + "up_proj")
        params += [
            param(ours + "attn_norm.scale", theirs + "input_layernorm.weight"),
            param(ours + "attention.qkv.weight", tuple(n + ".weight" for n in qkv), widths, True),
            param(ours + "attention.out.weight", attn + "o_proj.weight", transpose=True),
            param(ours + "mlp_norm.scale", theirs + "post_attention_layernorm.weight"),
            param(ours + "mlp.gate_up.weight", tuple(n + ".weight" for n in gate_up),
                  (c.d_hidden, c.d_hidden), True),
            param(ours + "mlp.down.weight", mlp + "down_proj.weight", transpose=True),
        ]
        if c.qkv_bias:
            params.append(param(ours + "attention.qkv.bias", tuple(n + ".bias" for n in qkv),
                                widths))
        if c.use_bias:
            params += [param(ours + "attention.out.bias", attn + "o_proj.bias"),
                       param(ours + "mlp.gate_up.bias", tuple(n + ".bias" for n in gate_up),
                             (c.d_hidden, c.d_hidden)),
                       param(ours + "mlp.down.bias", mlp + "down_proj.bias")]
    params.append(param("final_norm.scale", "model.norm.weight"))
    if not c.tie_head:
        params.append(param("head.weight", "lm_head.weight", transpose=True))
    return params


FAMILY = register(Family(
    name="llama", config=LlamaConfig, build=build,
    hf=HFFormat(classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
                read_config=read_hf_config, write_config=write_hf_config, params=hf_params,
                buffers=("rotary_emb.inv_freq",)),
))
