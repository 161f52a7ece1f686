"""PEFT's LoRA adapter files (`adapter_config.json`, `adapter_model.safetensors`) <-> a LoRA run.

PEFT keys an adapter by its Hugging Face module: `base_model.model.<module>.lora_A.weight`
`(r, in)` and `.lora_B.weight` `(out, r)`, scaled by `lora_alpha / r` (`/ sqrt(r)` with
`use_rslora`), whether the module is a `torch.nn.Linear` or GPT-2's `Conv1D` (which
`fan_in_fan_out` flags). Ours are `(in, r)` and `(r, out)`. A projection gptzoo fuses and
transformers does not (LLaMA's q/k/v, gate/up) carries one adapter per part (`LoRALinear`'s
`splits`), each one of PEFT's: both directions are transposes and slices, exact.

The module names come from the family's parameter table (`Family.hf_params`).
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gptzoo.errors import GptzooError
from gptzoo.models.hf_format import Param
from gptzoo.models.registry import ARCHITECTURES, get_family

PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_WEIGHT = ".weight"


def has_hf_family(architecture: str | None) -> bool:
    """Whether `architecture` is a registered family with a Hugging Face format."""
    family = ARCHITECTURES.get(architecture) if architecture else None
    return family is not None and family.hf is not None


def _modules(architecture: str, config) -> dict[str, Param]:
    """Our module paths (`blocks.0.attention.qkv`) whose weight is one or more HF modules'."""
    return {p.ours[:-len(_WEIGHT)]: p for p in get_family(architecture).hf_params(config)
            if p.ours.endswith(_WEIGHT)}


def _hf_modules(param: Param) -> list[str]:
    return [name[:-len(_WEIGHT)] for name in param.theirs]


def _widths(param: Param, d_out: int) -> tuple[int, ...]:
    return param.widths or (d_out,)


def fused_splits(architecture: str, config) -> dict[str, tuple[int, ...]]:
    """The output widths of each projection that is several modules in Hugging Face's model."""
    return {ours: p.widths for ours, p in _modules(architecture, config).items()
            if len(p.theirs) > 1}


def peft_tensors(architecture: str, config, arrays: Mapping[str, np.ndarray],
                 where: Path) -> tuple[dict[str, np.ndarray], list[str], bool]:
    """PEFT's tensors from our per-layer adapter arrays (`blocks.0.mlp.up.lora_a`, ...), the HF
    modules they adapt, and whether any is a `Conv1D` (PEFT's `fan_in_fan_out`)."""
    modules, tensors, adapted, conv1d = _modules(architecture, config), {}, [], False
    for ours in sorted(n[:-len(".lora_a")] for n in arrays if n.endswith(".lora_a")):
        if ours not in modules:
            raise GptzooError(f"{where} has an adapter on {ours}, which transformers' "
                              f"{architecture} has no module for; PEFT cannot hold it")
        param, a, b = modules[ours], arrays[ours + ".lora_a"], arrays[ours + ".lora_b"]
        names, rank = _hf_modules(param), b.shape[0]
        if a.shape[1] != len(names) * rank:
            raise GptzooError(f"{where}: the adapter on {ours} has {a.shape[1]} columns, not one "
                              f"rank-{rank} adapter for each of {', '.join(names)}")
        b_parts = np.split(b, np.cumsum(_widths(param, b.shape[1]))[:-1], axis=1)
        for name, a_part, b_part in zip(names, np.split(a, len(names), axis=1), b_parts,
                                          strict=True):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_part.T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_part.T)
            adapted.append(name)
        conv1d |= not param.transpose  # GPT-2's Conv1D stores (in, out), as we do
    return tensors, adapted, conv1d


def target_modules(architecture: str, config, adapted: list[str]) -> list[str]:
    """PEFT's `target_modules`: the adapted modules' last names when those pick out exactly
    the adapted modules (`["c_attn", "c_proj", "c_fc"]`), else their full names."""
    everything = {m.rsplit(".", 1)[0] for p in get_family(architecture).hf_params(config)
                  for m in p.theirs}
    suffixes = {m.rsplit(".", 1)[-1] for m in adapted}
    picked = {m for m in everything if m.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if picked == set(adapted) else sorted(adapted)


def adapter_config(settings, targets: list[str], conv1d: bool, base: str | None) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": settings.rank, "lora_alpha": settings.alpha, "use_rslora": settings.rslora,
            "lora_dropout": settings.dropout, "target_modules": targets,
            "fan_in_fan_out": conv1d, "bias": "none", "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}


def write_adapter(out: Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


# adapter_config.json keys whose values (other than unset, empty or this one) change what the
# adapter computes in ways gptzoo does not: the value it must have, and what to say.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA"), "bias": ("none", "trained biases"),
    "lora_bias": (False, "trained biases"), "modules_to_save": (None, "modules_to_save"),
    "rank_pattern": ({}, "per-module ranks"), "alpha_pattern": ({}, "per-module alphas"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "target_parameters"),
    "alora_invocation_tokens": (None, "activated LoRA"),
    "trainable_token_indices": (None, "trainable tokens"),
}
# PEFT's initialisations that leave the base weights as they are (PiSSA, OLoRA, CorDA, LoftQ
# and LoRA-GA replace them with the residual of the adapter's starting point).
_BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Keys that leave the adapter's forward LoRA's: settings of training, initialisation or
# placement. Any other key set (a variant newer than this list) is refused, not ignored.
_KNOWN = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
          "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
          "lora_dropout", "fan_in_fan_out", "use_rslora", "init_lora_weights",
          "layers_to_transform", "layers_pattern", "megatron_config", "megatron_core",
          "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
          "ensure_weight_tying", "qalora_group_size", *_UNSUPPORTED}


def read_adapter_config(adapter_dir: Path) -> dict:
    """A PEFT LoRA `adapter_config.json`, refused in one line when gptzoo cannot compute it."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise GptzooError(f"{adapter_dir} has no adapter_config.json; pass a folder written by "
                          "PEFT's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptzooError(f"{path} is not valid JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise GptzooError(f"{path} is not a LoRA adapter's config (a JSON object with its rank "
                          "r); re-save the adapter with PEFT's save_pretrained")
    if config.get("peft_type") != "LORA":
        raise GptzooError(f"{path}: peft_type={config.get('peft_type')!r}; gptzoo reads LoRA "
                          "adapters (peft_type LORA)")
    for key, (wanted, what) in _UNSUPPORTED.items():
        if config.get(key) and config[key] != wanted:
            raise GptzooError(f"{path}: {key}={config[key]!r} ({what}) is not supported; gptzoo "
                              f"reads adapters with {key}={json.dumps(wanted)}")
    init = config.get("init_lora_weights", True)
    if init not in _BASE_KEEPING_INITS:
        raise GptzooError(f"{path}: init_lora_weights={init!r} has PEFT change the base model's "
                          "weights as it loads the adapter, which gptzoo does not; save it with "
                          "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...), "
                          "which turns it into a plain LoRA adapter")
    unknown = sorted(key for key, value in config.items() if value and key not in _KNOWN)
    if unknown:
        raise GptzooError(f"{path}: {', '.join(unknown)} (a LoRA variant gptzoo does not know) "
                          "is not supported; gptzoo reads plain LoRA adapters with those unset")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise GptzooError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter "
                          "with PEFT's save_pretrained (safe_serialization=True)")
    return config


_KEY = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")


def adapter_arrays(architecture: str, config, base_shapes: Mapping[str, tuple[int, ...]],
                   tensors: Mapping[str, np.ndarray], rank: int, where: Path
                   ) -> dict[str, np.ndarray]:
    """Our per-layer adapter arrays from PEFT's `tensors`, checked against the base model's
    weight shapes `base_shapes` (per-layer names). A fused projection whose parts PEFT adapts
    only some of gets zeros for the others, which add nothing."""
    owner = {name: (ours, j) for ours, p in _modules(architecture, config).items()
             for j, name in enumerate(_hf_modules(p))}
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if key.endswith(".base_layer.weight") or ".lora_embedding_" in key:
            raise GptzooError(f"{where}: tensor {key} is an embedding layer's adapter, or PEFT's "
                              "copy of an adapted embedding's or tied head's weights, which "
                              "gptzoo does not import; adapt other modules, or save the adapter "
                              "with save_pretrained(save_embedding_layers=False)")
        if match is None or match.group(1) not in owner:
            raise GptzooError(f"{where}: tensor {key} names no module of the base model that "
                              "gptzoo can adapt; the adapter was made for another model")
        ours, part = owner[match.group(1)]
        found.setdefault(ours, {}).setdefault(part, {})[match.group(2)] = tensor
    return {name: array for ours, parts in found.items()
            for name, array in _adapter_pair(ours, parts, _modules(architecture, config)[ours],
                                             base_shapes, rank, where).items()}


def _adapter_pair(ours: str, parts: dict, param: Param, base_shapes: Mapping, rank: int,
                  where: Path) -> dict[str, np.ndarray]:
    d_in, d_out = base_shapes[ours + _WEIGHT]
    widths, names = _widths(param, d_out), _hf_modules(param)
    a_blocks, b_blocks = [], []
    for j, width in enumerate(widths):
        pair = parts.get(j, {"A": np.zeros((rank, d_in)), "B": np.zeros((width, rank))})
        for side, shape in (("A", (rank, d_in)), ("B", (width, rank))):
            if side not in pair:
                raise GptzooError(f"{where} has no lora_{side}.weight for {names[j]}; the adapter "
                                  "file is incomplete")
            if pair[side].shape != shape:
                raise GptzooError(f"{where}: {names[j]}.lora_{side}.weight is "
                                  f"{tuple(pair[side].shape)}, the base model needs {shape} "
                                  f"(r={rank}); the adapter was made for another model")
        a_blocks.append(pair["A"].T)
        b_blocks.append(pair["B"].T)
    return {f"{ours}.lora_a": np.concatenate(a_blocks, axis=1).astype(np.float32),
            f"{ours}.lora_b": np.concatenate(b_blocks, axis=1).astype(np.float32)}
