"""Published weights: Hugging Face checkpoints <-> gptzoo run directories, for every family with
a Hugging Face format (`gptzoo.models.hf_format.HFFormat`): GPT-2, and LLaMA with Mistral and
Qwen2."""

from gptzoo.hf.config import read_config, write_config
from gptzoo.hf.convert import export_hf, import_hf

__all__ = ["export_hf", "import_hf", "read_config", "write_config"]
