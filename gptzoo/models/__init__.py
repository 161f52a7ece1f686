"""Assembled architectures."""

from gptzoo.models.gpt import GPT, decoder, gpt2
from gptzoo.models.perceiver_ar import PerceiverAR, perceiver_ar

__all__ = ["GPT", "PerceiverAR", "decoder", "gpt2", "perceiver_ar"]
