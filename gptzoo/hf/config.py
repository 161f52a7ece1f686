"""Hugging Face `config.json` <-> a built-in architecture's config (`GPT2Config`, `LlamaConfig`).

Both config dialects are read: transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters` holding `rope_theta` and `rope_type`). Whatever is not implemented fails with
one line naming it and what is supported.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptzoo.errors import GptzooError
from gptzoo.models import GPT2Config, LlamaConfig
from gptzoo.nn import llama_hidden_dim

GPT2_CLASSES = ("GPT2LMHeadModel",)
LLAMA_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED = ", ".join(GPT2_CLASSES + LLAMA_CLASSES)
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
# GELU names of transformers' ACT2FN: the tanh approximation, or the exact erf form.
_GELU_APPROXIMATE = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True,
                     "gelu": False}
# Rotary models allocate their KV cache and training window at block_size, not the whole context.
DEFAULT_MAX_BLOCK_SIZE = 4096


@dataclass
class HFModel:
    """What a `config.json` describes: our architecture name and config, and its HF class."""

    architecture: str  # "gpt2" or "llama"
    config: GPT2Config | LlamaConfig
    hf_class: str


def read_config(hf_dir: Path, block_size: int | None = None) -> HFModel:
    """Parse `hf_dir/config.json`. `block_size` caps the context of rotary models (default: the
    config's `max_position_embeddings`, at most `DEFAULT_MAX_BLOCK_SIZE`)."""
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise GptzooError(f"{hf_dir} is not a folder; pass a Hugging Face model folder holding "
                          "config.json and model.safetensors")
    if not path.is_file():
        raise GptzooError(f"{hf_dir} has no config.json; pass a Hugging Face model folder "
                          f"({SUPPORTED})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptzooError(f"{path} is not valid JSON ({e}); re-download or re-save it") from e
    classes = cfg.get("architectures") or []
    if len(classes) != 1 or classes[0] not in GPT2_CLASSES + LLAMA_CLASSES:
        raise GptzooError(f"{path}: architectures={classes} is not supported; gptzoo imports "
                          f"{SUPPORTED}")
    if classes[0] in GPT2_CLASSES:
        return HFModel("gpt2", _gpt2_config(cfg, path), classes[0])
    return HFModel("llama", _llama_config(cfg, path, block_size), classes[0])


def _gpt2_config(cfg: dict, path: Path) -> GPT2Config:
    d_model = cfg.get("n_embd", 768)
    activation = cfg.get("activation_function", "gelu_new")
    if activation not in _GELU_APPROXIMATE:
        _unsupported(path, "activation_function", activation, ", ".join(_GELU_APPROXIMATE))
    if cfg.get("n_inner") not in (None, 4 * d_model):
        _unsupported(path, "n_inner", cfg["n_inner"], f"null or 4 * n_embd = {4 * d_model}")
    for key, supported in (("scale_attn_by_inverse_layer_idx", False),
                           ("scale_attn_weights", True), ("add_cross_attention", False)):
        if cfg.get(key, supported) != supported:
            _unsupported(path, key, cfg[key], json.dumps(supported))
    return GPT2Config(
        n_layers=cfg.get("n_layer", 12), n_heads=cfg.get("n_head", 12), d_model=d_model,
        block_size=cfg.get("n_positions", 1024), use_bias=True,
        tie_head=cfg.get("tie_word_embeddings", True),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        approximate_gelu=_GELU_APPROXIMATE[activation], vocab_size=cfg.get("vocab_size", 50257))


def _llama_config(cfg: dict, path: Path, block_size: int | None) -> LlamaConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        _unsupported(path, "hidden_act", cfg["hidden_act"], "silu")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        _unsupported(path, "partial_rotary_factor", cfg["partial_rotary_factor"], "1.0")
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"
    attention_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    if not qwen2 and attention_bias != mlp_bias:
        _unsupported(path, "attention_bias/mlp_bias", f"{attention_bias}/{mlp_bias}",
                     "equal values (biases everywhere or nowhere)")
    d_model, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rotary_base, rope_scaling = _rope(cfg, path)
    context = cfg.get("max_position_embeddings", 2048)
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", not qwen2):
        context = min(context, cfg["sliding_window"])  # attention never reaches further back
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
    """(rope_theta, llama3 scaling or None) from either config dialect."""
    params = cfg.get("rope_parameters")  # transformers 5.x
    if params is None:  # transformers 4.x
        params = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 1e4)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        _unsupported(path, "rope type", rope_type, ", ".join(ROPE_TYPES))
    if rope_type == "default":
        return float(params["rope_theta"]), None
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise GptzooError(f"{path}: llama3 rope scaling lacks {', '.join(missing)}; add them")
    return float(params["rope_theta"]), {"rope_type": "llama3",
                                         **{k: params[k] for k in _LLAMA3_KEYS}}


def _unsupported(path: Path, key: str, value: Any, supported: str):
    raise GptzooError(f"{path}: {key}={value!r} is not supported; gptzoo supports {supported}")


def write_config(architecture: str, config: GPT2Config | LlamaConfig, vocab_size: int) -> dict:
    """The `config.json` of a run's model, in the transformers 5.x dialect."""
    if architecture == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": vocab_size, "n_positions": config.block_size,
                "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads,
                "n_inner": None, "layer_norm_epsilon": config.norm_eps,
                "activation_function": "gelu_new" if config.approximate_gelu else "gelu",
                "tie_word_embeddings": config.tie_head, "dtype": "float32",
                "bos_token_id": None, "eos_token_id": None}
    qwen2 = bool(config.qkv_bias) and not config.use_bias
    rope = {"rope_type": "default", "rope_theta": config.rotary_base}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_theta": config.rotary_base}
    head_dim = config.head_dim or config.d_model // config.n_heads
    d_hidden = config.d_hidden or llama_hidden_dim(config.d_model, 4, config.multiple_of)
    return {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama", "vocab_size": vocab_size,
            "hidden_size": config.d_model, "intermediate_size": d_hidden,
            "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads or config.n_heads, "head_dim": head_dim,
            "hidden_act": "silu", "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.norm_eps, "rope_parameters": rope,
            "attention_bias": config.use_bias, "mlp_bias": config.use_bias,
            "tie_word_embeddings": config.tie_head, "dtype": "float32",
            "bos_token_id": None, "eos_token_id": None}
