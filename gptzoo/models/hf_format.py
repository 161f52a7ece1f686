"""How a family maps onto Hugging Face folders: its `config.json` both ways and a table pairing our
parameter names (module paths such as `blocks.3.attention.qkv.weight`) with HF tensor names.

A family declares an `HFFormat`; `gptzoo.hf` reads and writes the folders, generic over families.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptzoo.errors import GptzooError

# Rotary models allocate their KV cache and training window at block_size, not the whole
# context a config.json allows: the default cap of an imported model's block_size.
DEFAULT_MAX_BLOCK_SIZE = 4096


@dataclass(frozen=True)
class Param:
    """One of our arrays as one HF tensor, or several concatenated along our output axis."""

    ours: str  # our module path
    theirs: tuple[str, ...]  # HF tensors, concatenated along our output (last) axis
    widths: tuple[int, ...]  # each HF tensor's share of that axis
    # HF stores (out, in) in the last two axes, as torch.nn.Linear does; we store (in, out)
    transpose: bool


def param(ours: str, theirs: str | tuple[str, ...], widths: tuple[int, ...] = (),
          transpose: bool = False) -> Param:
    """A `Param`, one HF tensor given by its name alone."""
    return Param(ours, (theirs,) if isinstance(theirs, str) else theirs, widths, transpose)


def _same(name: str) -> str:
    return name


def _as_stored(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return tensors


@dataclass(frozen=True)
class HFFormat:
    """A family's Hugging Face format.

    **Arguments:**

    - `classes`: the `architectures` names of a `config.json` it reads (e.g. `LlamaForCausalLM`).
    - `read_config`: `(config.json as a dict, its path, block_size or None) -> our config`;
        raises `GptzooError` (see `unsupported`) for a setting gptzoo does not implement.
        `block_size`, when given, caps the context (`--block-size` of `gptzoo import-hf`).
    - `write_config`: `(our resolved config, vocab_size) -> config.json as a dict`; raises
        `ValueError` for a config transformers' classes cannot hold.
    - `params`: `(our resolved config) -> [Param, ...]`, every array of the model once.
    - `buffers`: suffixes of the tensors a checkpoint may hold that carry no weights (causal
        masks, rotary frequencies): skipped on import.
    - `rename`: a checkpoint's tensor name -> the name `params` uses (older layouts).
    - `convert`: the checkpoint's tensors (renamed) -> a view of them as `params` names them,
        for an older layout whose tensors combine into one of the table's (e.g. per-expert
        matrices stacked): a `Merged` view, each tensor made when read.
    """

    classes: tuple[str, ...]
    read_config: Callable[[dict, Path, int | None], Any]
    write_config: Callable[[Any, int], dict]
    params: Callable[[Any], list[Param]]
    buffers: tuple[str, ...] = ()
    rename: Callable[[str], str] = field(default=_same)
    convert: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] = field(
        default=_as_stored)


class Merged(Mapping):
    """`tensors` with groups of them seen as one tensor each, made when read: `merges` maps a
    new name to `(its source names, a function of the source tensors giving it)`. The sources
    of a merge all present are hidden; a merge with a source missing is left out, so the
    checkpoint's tensors are then reported as they are (missing or unused)."""

    def __init__(self, tensors: Mapping[str, np.ndarray],
                 merges: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]]):
        self.tensors = tensors
        self.merges = {name: merge for name, merge in merges.items()
                       if all(source in tensors for source in merge[0])}
        self.merged = {source for sources, _ in self.merges.values() for source in sources}
        self.names = [n for n in tensors if n not in self.merged] + list(self.merges)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.merges:
            return self.tensors[name]
        sources, combine = self.merges[name]
        return combine(*(self.tensors[source] for source in sources))

    def __contains__(self, name) -> bool:  # without reading the tensor, as Mapping's would
        return name in self.merges or (name in self.tensors and name not in self.merged)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def unsupported(path: Path, key: str, value: Any, supported: str):
    """Raise the one line a `read_config` gives for a setting gptzoo does not implement."""
    raise GptzooError(f"{path}: {key}={value!r} is not supported; gptzoo supports {supported}")
