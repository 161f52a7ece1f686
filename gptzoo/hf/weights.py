"""Per-family maps between our parameter names (module paths such as
`blocks.3.attention.qkv.weight`) and Hugging Face tensor names, and the tensor files both ways.

One table per family drives import and export: each of our arrays is one HF tensor or the
concatenation (along the output axis) of several, transposed where HF stores `(out, in)`.
"""

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so bf16 checkpoints read
import numpy as np
from safetensors import safe_open

from gptzoo.errors import GptzooError
from gptzoo.models import GPT2Config, LlamaConfig
from gptzoo.nn import llama_hidden_dim


@dataclass(frozen=True)
class Param:
    ours: str  # our module path
    theirs: tuple[str, ...]  # HF tensors, concatenated along our output (last) axis
    widths: tuple[int, ...]  # each HF tensor's share of that axis
    transpose: bool  # HF stores (out, in), as torch.nn.Linear does; we store (in, out)


def _param(ours: str, theirs: str | tuple[str, ...], widths: tuple[int, ...] = (),
           transpose: bool = False) -> Param:
    return Param(ours, (theirs,) if isinstance(theirs, str) else theirs, widths, transpose)


def gpt2_params(c: GPT2Config) -> list[Param]:
    """GPT-2's Conv1D weights are already (in, out), and `c_attn` is already q|k|v fused."""
    params = [_param("token_embedding.weight", "transformer.wte.weight"),
              _param("position_embedding.weight", "transformer.wpe.weight")]
    layers = [(f"blocks.{i}.", f"transformer.h.{i}.") for i in range(c.n_layers)]
    pairs = [(ours + our, theirs + their) for ours, theirs in layers
             for our, their in (("attn_norm", "ln_1"), ("attention.qkv", "attn.c_attn"),
                                ("attention.out", "attn.c_proj"), ("mlp_norm", "ln_2"),
                                ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj"))]
    pairs.append(("final_norm", "transformer.ln_f"))
    params += [_param(f"{our}.{p}", f"{their}.{p}") for our, their in pairs
               for p in ("weight", "bias")]
    if not c.tie_head:
        params.append(_param("head.weight", "lm_head.weight", transpose=True))
    return params


def llama_params(c: LlamaConfig) -> list[Param]:
    head_dim = c.head_dim or c.d_model // c.n_heads
    q_width, kv_width = c.n_heads * head_dim, (c.n_kv_heads or c.n_heads) * head_dim
    d_hidden = c.d_hidden or llama_hidden_dim(c.d_model, 4, c.multiple_of)
    qkv_bias = c.use_bias if c.qkv_bias is None else c.qkv_bias
    params = [_param("token_embedding.weight", "model.embed_tokens.weight")]
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        qkv = (attn + "q_proj", attn + "k_proj", attn + "v_proj")
        widths = (q_width, kv_width, kv_width)
        params += [
            _param(ours + "attn_norm.scale", theirs + "input_layernorm.weight"),
            _param(ours + "attention.qkv.weight", tuple(n + ".weight" for n in qkv), widths, True),
            _param(ours + "attention.out.weight", attn + "o_proj.weight", transpose=True),
            _param(ours + "mlp_norm.scale", theirs + "post_attention_layernorm.weight"),
            _param(ours + "mlp.gate_up.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                   (d_hidden, d_hidden), True),
            _param(ours + "mlp.down.weight", mlp + "down_proj.weight", transpose=True),
        ]
        if qkv_bias:
            params.append(_param(ours + "attention.qkv.bias", tuple(n + ".bias" for n in qkv),
                                 widths))
        if c.use_bias:
            params += [_param(ours + "attention.out.bias", attn + "o_proj.bias"),
                       _param(ours + "mlp.gate_up.bias",
                              (mlp + "gate_proj.bias", mlp + "up_proj.bias"), (d_hidden, d_hidden)),
                       _param(ours + "mlp.down.bias", mlp + "down_proj.bias")]
    params.append(_param("final_norm.scale", "model.norm.weight"))
    if not c.tie_head:
        params.append(_param("head.weight", "lm_head.weight", transpose=True))
    return params


FAMILIES = {"gpt2": gpt2_params, "llama": llama_params}
# Buffers some checkpoints carry that hold no weights: causal masks, rotary frequencies, and a
# tied head saved twice.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class TensorFiles(Mapping):
    """The tensors of a HF folder by name, each read from disk only when asked for.

    `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin` (which
    needs torch, and is memory-mapped). GPT-2 checkpoints saved from `GPT2Model` (OpenAI's
    `gpt2` among them) lack the `transformer.` prefix of `GPT2LMHeadModel`'s names: it is added.
    """

    def __init__(self, hf_dir: Path, stack: ExitStack):
        self.location: dict[str, tuple[object, str]] = {}
        index, single, torch_bin = (hf_dir / "model.safetensors.index.json",
                                    hf_dir / "model.safetensors", hf_dir / "pytorch_model.bin")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [hf_dir / s for s in shards]
        elif single.is_file():
            files = [single]
        elif torch_bin.is_file():
            self._add(_torch_state_dict(torch_bin))
            return
        else:
            raise GptzooError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json "
                              "or pytorch_model.bin; save the model with save_pretrained")
        for file in files:
            if not file.is_file():
                raise GptzooError(f"{index.name} names shard {file.name}, missing from {hf_dir}")
            self._add(stack.enter_context(safe_open(file, framework="numpy")))

    def _add(self, source) -> None:
        for name in source.keys():
            base = name.startswith(("h.", "wte.", "wpe.", "ln_f."))
            self.location["transformer." + name if base else name] = (source, name)

    def __getitem__(self, name: str) -> np.ndarray:
        source, stored = self.location[name]
        tensor = source.get_tensor(stored)
        return np.asarray(tensor.float().numpy() if hasattr(tensor, "float") else tensor,
                          dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.location)

    def __len__(self) -> int:
        return len(self.location)


@contextmanager
def open_tensors(hf_dir: Path) -> Iterator[TensorFiles]:
    with ExitStack() as stack:
        yield TensorFiles(hf_dir, stack)


class _TorchStateDict:
    def __init__(self, state: dict):
        self.state = state

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name):
        return self.state[name]


def _torch_state_dict(path: Path) -> _TorchStateDict:
    try:
        import torch
    except ImportError as e:
        raise GptzooError(f"{path.name} is a torch pickle and reading it needs torch; pip install "
                          "torch, or save the model as safetensors") from e
    return _TorchStateDict(torch.load(path, map_location="cpu", mmap=True, weights_only=True))


def read_params(params: list[Param], tensors: Mapping[str, np.ndarray], where: Path,
                tied: bool) -> dict[str, np.ndarray]:
    """Our arrays by module path, each built from its HF tensors as they are read; every HF
    tensor must be used once (a tied head's duplicate and known buffers aside)."""
    wanted = {name for p in params for name in p.theirs}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise GptzooError(f"{where} lacks tensor {missing[0]} ({len(missing)} missing); the "
                          "weights do not match config.json")
    ignored = ("lm_head.weight",) if tied else ()
    unused = sorted(n for n in tensors.keys() - wanted
                    if not n.endswith(_BUFFER_SUFFIXES) and n not in ignored)
    if unused:
        raise GptzooError(f"{where} holds tensor {unused[0]} ({len(unused)} unused) that "
                          "config.json does not describe; gptzoo cannot place it")
    arrays = {}
    for p in params:
        parts = [tensors[name] for name in p.theirs]
        arrays[p.ours] = np.concatenate([t.T if p.transpose else t for t in parts], axis=-1)
    return arrays


def write_params(params: list[Param], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors by name from our arrays: the inverse of `read_params`."""
    tensors = {}
    for p in params:
        parts = np.split(arrays[p.ours], np.cumsum(p.widths)[:-1], axis=-1) if p.widths else [
            arrays[p.ours]]
        for name, part in zip(p.theirs, parts):
            tensors[name] = np.ascontiguousarray(part.T if p.transpose else part)
    return tensors
