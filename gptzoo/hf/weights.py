"""Hugging Face tensor files both ways, driven by a family's `Param` table
(`Family.hf_params(config)`): each of our arrays is one HF tensor or the concatenation (along the
output axis) of several, transposed where HF stores `(out, in)` (in the last two axes: stacked
experts keep their leading axis).
"""

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so bf16 checkpoints read
import numpy as np
from safetensors import SafetensorError, safe_open

from gptzoo.errors import GptzooError
from gptzoo.models.hf_format import Param

__all__ = ["Param", "TensorFiles", "open_tensors", "read_params", "write_params"]


class TensorFiles(Mapping):
    """The tensors of a HF folder by name, each read from disk only when asked for.

    `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin` (which
    needs torch, and is memory-mapped). Each stored name is known as `rename(name)`: the family's
    name for it (`HFFormat.rename`).
    """

    def __init__(self, hf_dir: Path, stack: ExitStack, rename: Callable[[str], str] = str):
        self.location: dict[str, tuple[object, str]] = {}
        self.rename = rename
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
            self._add(stack.enter_context(open_safetensors(file)))

    def _add(self, source) -> None:
        for name in source.keys():
            self.location[self.rename(name)] = (source, name)

    def __getitem__(self, name: str) -> np.ndarray:
        source, stored = self.location[name]
        tensor = source.get_tensor(stored)
        # A torch pickle's tensors are torch's (bfloat16 among them), safetensors' NumPy's.
        array = tensor if isinstance(tensor, np.ndarray) else tensor.float().numpy()
        return np.asarray(array, dtype=np.float32)

    def __contains__(self, name) -> bool:  # without reading the tensor, as Mapping's would
        return name in self.location

    def __iter__(self) -> Iterator[str]:
        return iter(self.location)

    def __len__(self) -> int:
        return len(self.location)


@contextmanager
def open_tensors(hf_dir: Path, rename: Callable[[str], str] = str) -> Iterator[TensorFiles]:
    with ExitStack() as stack:
        yield TensorFiles(hf_dir, stack, rename)


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
                tied: bool, buffers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Our arrays by module path, each built from its HF tensors as they are read; every HF
    tensor must be used once, but for a tied head's duplicate and the names ending in one of
    `buffers` (`HFFormat.buffers`)."""
    wanted = {name for p in params for name in p.theirs}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise GptzooError(f"{where} lacks tensor {missing[0]} ({len(missing)} missing); the "
                          "weights do not match config.json")
    ignored = ("lm_head.weight",) if tied else ()
    unused = sorted(n for n in tensors.keys() - wanted
                    if not n.endswith(buffers) and n not in ignored)
    if unused:
        raise GptzooError(f"{where} holds tensor {unused[0]} ({len(unused)} unused) that "
                          "config.json does not describe; gptzoo cannot place it")
    arrays = {}
    for p in params:
        parts = [tensors[name] for name in p.theirs]
        arrays[p.ours] = np.concatenate([_transposed(t) if p.transpose else t for t in parts],
                                        axis=-1)
    return arrays


def write_params(params: list[Param], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors by name from our arrays: the inverse of `read_params`."""
    tensors = {}
    for p in params:
        parts = np.split(arrays[p.ours], np.cumsum(p.widths)[:-1], axis=-1) if p.widths else [
            arrays[p.ours]]
        for name, part in zip(p.theirs, parts, strict=True):
            tensors[name] = np.ascontiguousarray(_transposed(part) if p.transpose else part)
    return tensors


def _transposed(matrix: np.ndarray) -> np.ndarray:
    """`(out, in)` <-> `(in, out)` in the last two axes, any leading ones (experts) kept."""
    return np.swapaxes(matrix, -1, -2)


def open_safetensors(file: Path):
    """`safe_open(file)` for NumPy, which reads the file's header; a damaged file is one line."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:
        raise GptzooError(f"{file} is not a readable safetensors file ({e}); download or save "
                          "it again") from e
