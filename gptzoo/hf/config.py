"""Hugging Face `config.json` <-> a family's config, generic over families: the class named in
`architectures` picks the family (`gptzoo.models.registry`), whose `HFFormat` reads and writes the
rest. Whatever is not implemented fails with one line naming it and what is supported.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from gptzoo.errors import GptzooError
from gptzoo.models.config import ArchitectureConfig
from gptzoo.models.registry import family_of_hf_class, get_family, hf_classes


@dataclass
class HFModel:
    """What a `config.json` describes: our architecture name and config, and its HF class."""

    architecture: str  # a registered family's name, e.g. "gpt2" or "llama"
    config: ArchitectureConfig
    hf_class: str


def read_config(hf_dir: Path, block_size: int | None = None) -> HFModel:
    """Parse `hf_dir/config.json`. `block_size` caps the context of rotary models (default: the
    config's `max_position_embeddings`, at most `DEFAULT_MAX_BLOCK_SIZE`)."""
    path = hf_dir / "config.json"
    supported = ", ".join(hf_classes())
    if not hf_dir.is_dir():
        raise GptzooError(f"{hf_dir} is not a folder; pass a Hugging Face model folder holding "
                          "config.json and model.safetensors")
    if not path.is_file():
        raise GptzooError(f"{hf_dir} has no config.json; pass a Hugging Face model folder "
                          f"({supported})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptzooError(f"{path} is not valid JSON ({e}); re-download or re-save it") from e
    classes = cfg.get("architectures") or []
    family = family_of_hf_class(classes[0]) if len(classes) == 1 else None
    if family is None:
        raise GptzooError(f"{path}: architectures={classes} is not supported; gptzoo imports "
                          f"{supported}")
    try:
        config = family.hf.read_config(cfg, path, block_size)
    except KeyError as e:
        raise GptzooError(f"{path} lacks {e.args[0]!r}, which {classes[0]} needs and has no "
                          "default for; re-save the model with transformers' save_pretrained"
                          ) from e
    return HFModel(family.name, config, classes[0])


def write_config(architecture: str, config: ArchitectureConfig, vocab_size: int) -> dict:
    """The `config.json` of a run's model; a `ValueError` says why transformers cannot hold it."""
    return get_family(architecture).hf.write_config(config.resolved(), vocab_size)
