"""Mixtral (Jiang et al. 2024): LLaMA's attention, norms and rotary positions, with each block's
feed-forward a sparse mixture of SwiGLU experts (`nn.MoEMLP`), and the load-balancing loss added
to the training loss; in transformers' `MixtralForCausalLM` format, fused or per-expert."""

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from jaxtyping import PRNGKeyArray

from gptzoo.models.families import llama, llama_hf
from gptzoo.models.families.llama import LlamaConfig, llama_decoder
from gptzoo.models.gpt import MoEGPT
from gptzoo.models.hf_format import HFFormat, Merged, Param, param, unsupported
from gptzoo.models.registry import Family, register
from gptzoo.nn import MoEBlock, MoEMLP


@dataclasses.dataclass
class MixtralConfig(LlamaConfig):
    """Mixtral's config: `LlamaConfig`'s (attention, norms, rotary positions; `d_hidden` is each
    expert's hidden width; transformers' Mixtral has no biases, so export refuses them), and

    - `n_experts`: experts per layer (`num_local_experts`).
    - `experts_per_token`: how many experts each token goes through (`num_experts_per_tok`).
    - `router_aux_loss_coef`: the load-balancing loss's weight in the training loss (Mixtral
        8x7B: 0.02).
    - `expert_path`: how the experts run, `nn.MoEMLP`'s `path`: "auto", "blocks", "ragged" or
        "dense" (each computes the same).
    """

    n_experts: int = 8
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.02
    expert_path: str = "auto"


def mixtral(vocab_size: int, *, key: PRNGKeyArray, **fields) -> MoEGPT:
    """Mixtral of `vocab_size` tokens; `fields` are `MixtralConfig`'s (`n_experts`, ...)."""
    return build(MixtralConfig(**fields).resolved(), vocab_size, key=key)


def build(c: MixtralConfig, vocab_size: int, *, key: PRNGKeyArray) -> MoEGPT:
    """Mixtral from its resolved config (`Family.build`): LLaMA's layout in `nn.MoEBlock`s."""

    def experts(out_std: float, k: PRNGKeyArray) -> MoEMLP:
        return MoEMLP(c.d_model, n_experts=c.n_experts, top_k=c.experts_per_token,
                      d_hidden=c.d_hidden, path=c.expert_path, dropout=c.dropout,
                      out_init_std=out_std, key=k)

    return llama_decoder(c, vocab_size, experts, block=MoEBlock,
                         aux_loss_coef=c.router_aux_loss_coef, key=key)


# What MixtralConfig takes for a key its config.json leaves out, where that is not LLaMA's.
CLASS_DEFAULTS = {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
                  "num_local_experts": 8, "num_experts_per_tok": 2,
                  "router_aux_loss_coef": 0.001}


def read_hf_config(cfg: dict, path: Path, block_size: int | None) -> MixtralConfig:
    """`MixtralConfig` of a `MixtralForCausalLM` `config.json`: LLaMA's fields as
    `llama.read_hf_config` reads them, and the experts'."""
    cfg = {**CLASS_DEFAULTS, **cfg}
    if cfg.get("sliding_window") is not None:
        unsupported(path, "sliding_window", cfg["sliding_window"],
                    "null (attention over the whole context)")
    if cfg.get("router_jitter_noise", 0.0):
        unsupported(path, "router_jitter_noise", cfg["router_jitter_noise"], "0.0")
    base = llama.read_hf_config(cfg, path, block_size)
    return MixtralConfig(**vars(base), n_experts=cfg["num_local_experts"],
                         experts_per_token=cfg["num_experts_per_tok"],
                         router_aux_loss_coef=cfg["router_aux_loss_coef"])


def write_hf_config(c: MixtralConfig, vocab_size: int) -> dict:
    """The `config.json` of a Mixtral, in the transformers 5.x dialect."""
    if c.use_bias or c.qkv_bias:
        raise ValueError("transformers' MixtralForCausalLM has no biases; export a run with "
                         "model.use_bias=false and model.qkv_bias=false")
    if c.sliding_window is not None or c.qk_norm is not None:
        raise ValueError("gptzoo's export of MixtralForCausalLM holds neither a sliding window "
                         "nor QK-norm (as its import reads none); export a run with "
                         "model.sliding_window=null and model.qk_norm=null")
    common = {k: v for k, v in llama_hf.write_config(c, vocab_size).items()
              if k not in ("attention_bias", "mlp_bias")}
    return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_local_experts": c.n_experts, "num_experts_per_tok": c.experts_per_token,
            "router_aux_loss_coef": c.router_aux_loss_coef, "router_jitter_noise": 0.0,
            "output_router_logits": False, "sliding_window": None}


def hf_params(c: MixtralConfig) -> list[Param]:
    """LLaMA's table but for the feed-forward: each layer's router and experts in transformers
    5's fused layout, `(out, in)` in the last two axes with the experts first."""
    params = [p for p in llama_hf.params(c) if ".mlp." not in p.ours]
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
        params += [param(ours + "router.weight", theirs + "gate.weight", transpose=True),
                   param(ours + "experts.gate_up", theirs + "experts.gate_up_proj",
                         transpose=True),
                   param(ours + "experts.down", theirs + "experts.down_proj", transpose=True)]
    return params


def _renamed(name: str) -> str:
    """The older layout's `block_sparse_moe` is transformers 5's `mlp`."""
    return name.replace(".block_sparse_moe.", ".mlp.")


_PER_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.w[123]\.weight")


def fused_experts(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The older per-expert layout (`experts.N.w1`, `w3`, `w2`, each `(out, in)`) seen as
    transformers 5's fused tensors, as its `conversion_mapping` loads it: every expert's w1 (gate)
    and w3 (up) stacked and concatenated into `gate_up_proj` `(E, 2 hidden, d_model)`, its w2
    stacked into `down_proj` `(E, d_model, hidden)`."""
    n_experts: dict[str, int] = {}
    for name in tensors:
        match = _PER_EXPERT.fullmatch(name)
        if match:
            n_experts[match[1]] = max(n_experts.get(match[1], 0), int(match[2]) + 1)
    merges = {}
    for prefix, n in n_experts.items():
        def names(w: str, prefix=prefix, n=n) -> tuple[str, ...]:
            return tuple(f"{prefix}.{e}.{w}.weight" for e in range(n))

        merges[prefix + ".gate_up_proj"] = ((*names("w1"), *names("w3")), lambda *t, n=n: (
            np.concatenate([np.stack(t[:n]), np.stack(t[n:])], axis=1)))
        merges[prefix + ".down_proj"] = (names("w2"), lambda *t: np.stack(t))
    return Merged(tensors, merges)


FAMILY = register(Family(
    name="mixtral", config=MixtralConfig, build=build,
    hf=HFFormat(classes=("MixtralForCausalLM",), read_config=read_hf_config,
                write_config=write_hf_config, params=hf_params,
                buffers=("rotary_emb.inv_freq",), rename=_renamed, convert=fused_experts),
))
