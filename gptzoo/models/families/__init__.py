"""The built-in model families, one module each; importing a module registers its family
(`gptzoo.models.registry`). A new family is a new module here and its import line below."""

from gptzoo.models.families import gpt2, llama, mixtral, perceiver_ar

__all__ = ["gpt2", "llama", "mixtral", "perceiver_ar"]
