"""Assembled architectures: the `GPT` model and `decoder`, the model protocol, and the families
(`gpt2`, `llama`, `mixtral`, `perceiver_ar`), registered by name in `gptzoo.models.registry`."""

from gptzoo.models.config import ArchitectureConfig, ModelConfig
from gptzoo.models.families.gpt2 import GPT2Config, gpt2
from gptzoo.models.families.llama import LlamaConfig, llama
from gptzoo.models.families.mixtral import MixtralConfig, mixtral
from gptzoo.models.families.perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar
from gptzoo.models.gpt import GPT, MoEGPT, decoder
from gptzoo.models.protocol import AuxLossModel, CachedDecoder, LanguageModel, require
from gptzoo.models.registry import (
    ARCHITECTURES,
    Family,
    build_architecture,
    get_family,
    register,
)

__all__ = ["ARCHITECTURES", "ArchitectureConfig", "AuxLossModel", "CachedDecoder", "Family", "GPT",
           "GPT2Config", "LanguageModel", "LlamaConfig", "MixtralConfig", "ModelConfig", "MoEGPT",
           "PerceiverAR", "PerceiverARConfig", "build_architecture", "decoder", "get_family",
           "gpt2", "llama", "mixtral", "perceiver_ar", "register", "require"]
