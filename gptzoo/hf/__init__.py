"""Published weights: Hugging Face GPT-2 and LLaMA-family checkpoints <-> gptzoo run directories."""

from gptzoo.hf.config import read_config, write_config
from gptzoo.hf.convert import export_hf, import_hf, named_arrays

__all__ = ["export_hf", "import_hf", "named_arrays", "read_config", "write_config"]
