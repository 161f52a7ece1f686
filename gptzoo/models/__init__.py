"""Assembled architectures."""

from gptzoo.models.architectures import (
    ARCHITECTURES,
    GPT2Config,
    LlamaConfig,
    build_architecture,
)
from gptzoo.models.gpt import GPT, decoder, gpt2
from gptzoo.models.llama import llama
from gptzoo.models.perceiver_ar import PerceiverAR, perceiver_ar

__all__ = ["ARCHITECTURES", "GPT", "GPT2Config", "LlamaConfig", "PerceiverAR",
           "build_architecture", "decoder", "gpt2", "llama", "perceiver_ar"]
