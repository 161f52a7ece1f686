"""The llama family's Hugging Face format: `config.json` of LLaMA, Mistral, Qwen2 and Qwen3 both
ways, and the table of their tensor names. A variant is the LLaMA layout plus one part: Mistral's
sliding window, Qwen2's q/k/v biases, Qwen3's QK-norm per head."""

from pathlib import Path

from gptzoo.errors import GptzooError
from gptzoo.models.hf_format import DEFAULT_MAX_BLOCK_SIZE, Param, param, unsupported

CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = dict(zip(CLASSES, ("llama", "mistral", "qwen2", "qwen3"), strict=True))
# The biases each class other than LLaMA can hold, for the error that refuses the others.
CLASS_BIASES = {"Qwen3ForCausalLM": "on q/k/v and the output together, none in the MLP",
                "Qwen2ForCausalLM": "on q/k/v alone", "MistralForCausalLM": "none"}
# What each class takes for a key its config.json leaves out, where that is not LLaMA's
# default (transformers 5's config classes; Qwen's window applies only with use_sliding_window).
CLASS_DEFAULTS = {"MistralForCausalLM": {"sliding_window": 4096, "num_key_value_heads": 8},
                  "Qwen2ForCausalLM": {"sliding_window": 4096, "num_key_value_heads": 32},
                  "Qwen3ForCausalLM": {"sliding_window": 4096, "num_key_value_heads": 32,
                                       "head_dim": 128}}
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def config_fields(cfg: dict, path: Path, block_size: int | None) -> dict:
    """`LlamaConfig`'s fields from a `config.json`. `block_size` caps the context (default:
    `max_position_embeddings`, at most `DEFAULT_MAX_BLOCK_SIZE`); a sliding window is the
    attention's own, and leaves the context alone."""
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported(path, "hidden_act", cfg["hidden_act"], "silu")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported(path, "partial_rotary_factor", cfg["partial_rotary_factor"], "1.0")
    hf_class = cfg["architectures"][0]
    cfg = {**CLASS_DEFAULTS.get(hf_class, {}), **cfg}
    d_model, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rotary_base, rope_scaling = _rope(cfg, path)
    context = cfg.get("max_position_embeddings", 2048)
    return dict(
        n_layers=cfg["num_hidden_layers"], n_heads=n_heads, d_model=d_model,
        block_size=block_size or min(context, DEFAULT_MAX_BLOCK_SIZE),
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or d_model // n_heads, d_hidden=cfg["intermediate_size"],
        rotary_base=rotary_base, rope_scaling=rope_scaling,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_head=cfg.get("tie_word_embeddings", False),
        vocab_size=cfg["vocab_size"], **_biases(cfg, hf_class),
        sliding_window=_sliding_window(cfg, path, hf_class),
        qk_norm="head" if hf_class == "Qwen3ForCausalLM" else None)


def _biases(cfg: dict, hf_class: str) -> dict:
    """`use_bias`, `qkv_bias` and `mlp_bias` as each class reads its bias keys: Qwen2 biases q/k/v
    whatever its config says, Mistral nothing, Qwen3 attention alone, LLaMA either part."""
    if hf_class == "Qwen2ForCausalLM":
        return dict(use_bias=False, qkv_bias=True, mlp_bias=False)
    if hf_class == "MistralForCausalLM":
        return dict(use_bias=False, qkv_bias=None, mlp_bias=False)
    mlp_bias = hf_class == "LlamaForCausalLM" and cfg.get("mlp_bias", False)
    return dict(use_bias=cfg.get("attention_bias", False), qkv_bias=None, mlp_bias=mlp_bias)


def _sliding_window(cfg: dict, path: Path, hf_class: str) -> int | None:
    """The window of every layer, as transformers 5 reads it: Mistral's `sliding_window` covers
    all layers; Qwen's, only with `use_sliding_window`, the layers `layer_types` names (without
    it, those from `max_window_layers` on). A window in some layers only is refused."""
    if hf_class == "MistralForCausalLM":
        return cfg.get("sliding_window")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    if hf_class == "LlamaForCausalLM" or window is None:
        return None
    n_layers, first = cfg["num_hidden_layers"], cfg.get("max_window_layers", 28)
    types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                       for i in range(n_layers)]
    sliding = types.count("sliding_attention")
    if 0 < sliding < n_layers:
        raise GptzooError(f"{path}: layer_types/max_window_layers slide {sliding} of {n_layers} "
                          "layers, which is not supported; gptzoo supports a sliding window in "
                          "every layer or in none (use_sliding_window=false)")
    return window if sliding else None


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from either config dialect: transformers 4.x
    (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters` holding both)."""
    params = cfg.get("rope_parameters")  # transformers 5.x
    if params is None:  # transformers 4.x
        params = cfg.get("rope_scaling") or {}
    params = {"rope_theta": cfg.get("rope_theta", 1e4), **params}
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


def write_config(c, vocab_size: int) -> dict:
    """The `config.json` of a resolved `LlamaConfig` `c`, in the transformers 5.x dialect, as
    the class that holds its layout (`hf_class_of`)."""
    hf_class = hf_class_of(c)
    rope = {"rope_type": "default", "rope_theta": c.rotary_base}
    if c.rope_scaling is not None:
        rope = {**c.rope_scaling, "rope_theta": c.rotary_base}
    return {"architectures": [hf_class], "model_type": MODEL_TYPES[hf_class],
            "vocab_size": vocab_size, "hidden_size": c.d_model,
            "intermediate_size": c.d_hidden, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps, "rope_parameters": rope,
            "tie_word_embeddings": c.tie_head, "dtype": "float32", "bos_token_id": None,
            "eos_token_id": None, **_class_fields(c, hf_class)}


def hf_class_of(c) -> str:
    """The transformers class of a resolved `LlamaConfig`: Qwen3 for QK-norm per head, Qwen2 for
    q/k/v biases alone, Mistral for a sliding window, else LLaMA; a `ValueError` for a layout no
    class holds."""
    if c.qk_norm == "projection":
        raise ValueError("qk_norm='projection' (OLMo 2's form) has no transformers equivalent in "
                         "LLaMA's layout; export a run with qk_norm 'head' (Qwen3) or None")
    if c.use_bias and not c.qkv_bias:
        raise ValueError("biases everywhere but on q/k/v (model.qkv_bias=false) has no "
                         "transformers equivalent; export a run without that setting")
    if c.qk_norm == "head":
        hf_class, held = "Qwen3ForCausalLM", not c.mlp_bias and c.qkv_bias == c.use_bias
    elif c.qkv_bias and not c.use_bias:
        hf_class, held = "Qwen2ForCausalLM", not c.mlp_bias
    elif c.sliding_window is not None:
        hf_class, held = "MistralForCausalLM", not (c.qkv_bias or c.mlp_bias)
    else:
        return "LlamaForCausalLM"
    if not held:
        raise ValueError(f"{hf_class}, the class of this model's layout, holds biases "
                         f"{CLASS_BIASES[hf_class]}, not use_bias={c.use_bias}, qkv_bias="
                         f"{c.qkv_bias}, mlp_bias={c.mlp_bias}; export a run with those biases")
    return hf_class


def _class_fields(c, hf_class: str) -> dict:
    """The keys only `hf_class` reads: its biases and its sliding window."""
    if hf_class == "LlamaForCausalLM":
        return {"attention_bias": c.use_bias, "mlp_bias": c.mlp_bias}
    if hf_class == "MistralForCausalLM":
        return {"sliding_window": c.sliding_window}
    # Qwen slides the layers from max_window_layers on: 0, every layer.
    window = {"use_sliding_window": c.sliding_window is not None,
              "sliding_window": c.sliding_window, "max_window_layers": 0}
    return window | ({"attention_bias": c.use_bias} if hf_class == "Qwen3ForCausalLM" else {})


def params(c) -> list[Param]:
    """q/k/v fused into our `qkv`, gate/up into `gate_up`; HF's Linear weights transposed."""
    q_width, kv_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    table = [param("token_embedding.weight", "model.embed_tokens.weight")]
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        qkv = (attn + "q_proj", attn + "k_proj", attn + "v_proj")
        widths = (q_width, kv_width, kv_width)
        gate_up = (mlp + "gate_proj", mlp + "up_proj")
        table += [
            param(ours + "attn_norm.scale", theirs + "input_layernorm.weight"),
            param(ours + "attention.qkv.weight", tuple(n + ".weight" for n in qkv), widths, True),
            param(ours + "attention.out.weight", attn + "o_proj.weight", transpose=True),
            param(ours + "mlp_norm.scale", theirs + "post_attention_layernorm.weight"),
            param(ours + "mlp.gate_up.weight", tuple(n + ".weight" for n in gate_up),
                  (c.d_hidden, c.d_hidden), True),
            param(ours + "mlp.down.weight", mlp + "down_proj.weight", transpose=True),
        ]
        if c.qk_norm is not None:
            table += [param(ours + "attention.q_norm.scale", attn + "q_norm.weight"),
                      param(ours + "attention.k_norm.scale", attn + "k_norm.weight")]
        if c.qkv_bias:
            table.append(param(ours + "attention.qkv.bias", tuple(n + ".bias" for n in qkv),
                               widths))
        if c.use_bias:
            table.append(param(ours + "attention.out.bias", attn + "o_proj.bias"))
        if c.mlp_bias:
            table += [param(ours + "mlp.gate_up.bias", tuple(n + ".bias" for n in gate_up),
                            (c.d_hidden, c.d_hidden)),
                      param(ours + "mlp.down.bias", mlp + "down_proj.bias")]
    table.append(param("final_norm.scale", "model.norm.weight"))
    if not c.tie_head:
        table.append(param("head.weight", "lm_head.weight", transpose=True))
    return table
