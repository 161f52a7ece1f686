"""Published weights: Hugging Face GPT-2 and LLaMA-family checkpoints <-> gptzoo run directories."""

from gptzoo.hf.config import read_config, write_config
from gptzoo.hf.convert import export_hf, import_hf

__all__ = ["export_hf", "import_hf", "read_config", "write_config"]
