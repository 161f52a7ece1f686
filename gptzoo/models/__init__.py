"""Assembled architectures."""

from gptzoo.models.gpt import GPT, gpt2

__all__ = ["GPT", "gpt2"]
