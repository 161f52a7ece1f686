"""GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, pre-norm blocks; and its
Hugging Face format (`GPT2LMHeadModel`)."""

import dataclasses
import json
import math
from pathlib import Path

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray

from gptzoo.models.config import ArchitectureConfig
from gptzoo.models.gpt import GPT, decoder
from gptzoo.models.hf_format import HFFormat, Param, param, unsupported
from gptzoo.models.registry import Family, register
from gptzoo.nn import MLP, Block, CausalSelfAttention, LayerNorm


@dataclasses.dataclass
class GPT2Config(ArchitectureConfig):
    """GPT-2's config: `ModelConfig`'s sizes, and

    - `norm_eps`: LayerNorm's epsilon.
    - `approximate_gelu`: GELU's tanh approximation (GPT-2's), or the exact erf form.
    - `init`: `"gpt2"` or `"small"` (see `gpt2`).
    """

    norm_eps: float = 1e-5
    approximate_gelu: bool = True
    init: str = "gpt2"


def gpt2(vocab_size: int, *, key: PRNGKeyArray, **fields) -> GPT:
    """GPT-2 of `vocab_size` tokens; `fields` are `GPT2Config`'s (`n_layers`, `n_heads`, ...).

    `init="gpt2"`: weights and embeddings N(0, 0.02), residual-stream outputs (attention and MLP
    output projections) N(0, 0.02 / sqrt(2 * n_layers)).
    `init="small"`: every weight matrix, residual outputs and an untied head included,
    N(0, sqrt(2 / (5 d_model))) (small init, Nguyen & Salazar 2019), and token and position
    embeddings uniform(-1e-4, 1e-4) (BlinkDL's small embedding init). Biases start at zero and norms
    at one either way. `scan_layers`: see `decoder`.
    """
    return build(GPT2Config(**fields).resolved(), vocab_size, key=key)


def build(c: GPT2Config, vocab_size: int, *, key: PRNGKeyArray) -> GPT:
    """GPT-2 from its resolved config (`Family.build`)."""
    if c.init == "gpt2":
        # GPT-2 scales the init of each residual-stream output by 1/sqrt(2 * n_layers).
        std, out_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
    elif c.init == "small":
        std = out_std = math.sqrt(2 / (5 * c.d_model))
    else:
        raise ValueError(f"init={c.init!r} is not an initialisation gpt2 knows; "
                         "choose 'gpt2' or 'small'")

    def norm() -> LayerNorm:
        return LayerNorm(c.d_model, use_bias=c.use_bias, eps=c.norm_eps)

    def block(k: PRNGKeyArray) -> Block:
        attn_key, mlp_key = jax.random.split(k)
        return Block(
            attn_norm=norm(),
            attention=CausalSelfAttention(
                c.d_model, c.n_heads, dropout=c.dropout, use_bias=c.use_bias, init_std=std,
                out_init_std=out_std, key=attn_key),
            mlp_norm=norm(),
            mlp=MLP(c.d_model, dropout=c.dropout, use_bias=c.use_bias,
                    approximate_gelu=c.approximate_gelu, init_std=std, out_init_std=out_std,
                    key=mlp_key),
        )

    model = decoder(vocab_size, block=block, n_layers=c.n_layers, d_model=c.d_model,
                    block_size=c.block_size, final_norm=norm(), tie_head=c.tie_head,
                    dropout=c.dropout, init_std=std, scan_layers=c.scan_layers, key=key)
    if c.init == "small":  # BlinkDL's small embeddings, drawn from the keys decoder used
        tok_key, pos_key = jax.random.split(key, c.n_layers + 3)[:2]
        model = eqx.tree_at(lambda m: (m.token_embedding.weight, m.position_embedding.weight),
                            model, (_small_table(tok_key, model.token_embedding.weight.shape),
                                    _small_table(pos_key, model.position_embedding.weight.shape)))
    return model


def _small_table(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    return jax.random.uniform(key, shape, minval=-1e-4, maxval=1e-4)


# GELU names of transformers' ACT2FN: the tanh approximation, or the exact erf form.
_GELU_APPROXIMATE = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True,
                     "gelu": False}


def read_hf_config(cfg: dict, path: Path, block_size: int | None) -> GPT2Config:
    """`GPT2Config` of a `config.json`; its learned positions fix the context (`block_size` is
    not used)."""
    d_model = cfg.get("n_embd", 768)
    activation = cfg.get("activation_function", "gelu_new")
    if activation not in _GELU_APPROXIMATE:
        unsupported(path, "activation_function", activation, ", ".join(_GELU_APPROXIMATE))
    if cfg.get("n_inner") not in (None, 4 * d_model):
        unsupported(path, "n_inner", cfg["n_inner"], f"null or 4 * n_embd = {4 * d_model}")
    for key, supported in (("scale_attn_by_inverse_layer_idx", False),
                           ("scale_attn_weights", True), ("add_cross_attention", False)):
        if cfg.get(key, supported) != supported:
            unsupported(path, key, cfg[key], json.dumps(supported))
    return GPT2Config(
        n_layers=cfg.get("n_layer", 12), n_heads=cfg.get("n_head", 12), d_model=d_model,
        block_size=cfg.get("n_positions", 1024), use_bias=True,
        tie_head=cfg.get("tie_word_embeddings", True),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        approximate_gelu=_GELU_APPROXIMATE[activation], vocab_size=cfg.get("vocab_size", 50257))


def write_hf_config(c: GPT2Config, vocab_size: int) -> dict:
    """The `config.json` of a GPT-2, in the transformers 5.x dialect."""
    if not c.use_bias:
        raise ValueError("GPT-2 without biases (model.use_bias=false) has no transformers "
                         "equivalent; export a run with biases")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": vocab_size, "n_positions": c.block_size, "n_embd": c.d_model,
            "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": None,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new" if c.approximate_gelu else "gelu",
            "tie_word_embeddings": c.tie_head, "dtype": "float32",
            "bos_token_id": None, "eos_token_id": None}


def hf_params(c: GPT2Config) -> list[Param]:
    """GPT-2's Conv1D weights are already (in, out), and `c_attn` is already q|k|v fused."""
    params = [param("token_embedding.weight", "transformer.wte.weight"),
              param("position_embedding.weight", "transformer.wpe.weight")]
    layers = [(f"blocks.{i}.", f"transformer.h.{i}.") for i in range(c.n_layers)]
    pairs = [(ours + our, theirs + their) for ours, theirs in layers
             for our, their in (("attn_norm", "ln_1"), ("attention.qkv", "attn.c_attn"),
                                ("attention.out", "attn.c_proj"), ("mlp_norm", "ln_2"),
                                ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj"))]
    pairs.append(("final_norm", "transformer.ln_f"))
    params += [param(f"{our}.{p}", f"{their}.{p}") for our, their in pairs
               for p in ("weight", "bias")]
    if not c.tie_head:
        params.append(param("head.weight", "lm_head.weight", transpose=True))
    return params


def _with_prefix(name: str) -> str:
    """Checkpoints saved from `GPT2Model` (OpenAI's `gpt2` among them) lack the `transformer.`
    prefix of `GPT2LMHeadModel`'s names."""
    bare = name.startswith(("h.", "wte.", "wpe.", "ln_f."))
    return "transformer." + name if bare else name


FAMILY = register(Family(
    name="gpt2", config=GPT2Config, build=build,
    hf=HFFormat(classes=("GPT2LMHeadModel",), read_config=read_hf_config,
                write_config=write_hf_config, params=hf_params,
                buffers=(".attn.bias", ".attn.masked_bias"), rename=_with_prefix),
))
