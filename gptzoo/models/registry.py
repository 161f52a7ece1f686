"""The model families gptzoo builds by name: a recipe's `architecture`, a run's `recipe.json`, a
Hugging Face `config.json`'s class, the sharding rules' logical axes all look a family up here.

A family module (`gptzoo/models/families/`) defines a `Family` and calls `register` on import;
a family of one's own registers the same way, before a recipe naming it is loaded.
"""

from collections.abc import Callable
from dataclasses import dataclass

from jaxtyping import PRNGKeyArray

from gptzoo.models.config import ArchitectureConfig
from gptzoo.models.hf_format import HFFormat, Param
from gptzoo.models.protocol import LanguageModel


@dataclass(frozen=True)
class Family:
    """A model family: what a recipe, `gptzoo import-hf`/`export-hf` and the trainer's sharding
    rules need to know of it.

    **Arguments:**

    - `name`: the `architecture` a recipe names and `recipe.json` records (`"llama"`).
    - `config`: its config class, an `ArchitectureConfig` whose fields are the recipe's model
        section.
    - `build`: `build(config, vocab_size, *, key) -> LanguageModel`, given the `resolved()`
        config and the vocabulary size to build.
    - `hf`: its Hugging Face format (`HFFormat`), or None when it has none.
    - `logical_axes`: `(module-path pattern, axes)` pairs for the parameters only this family
        has, as in `gptzoo.models.axes` (which holds the components' shared ones).
    """

    name: str
    config: type[ArchitectureConfig]
    build: Callable[..., LanguageModel]
    hf: HFFormat | None = None
    logical_axes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def hf_params(self, config: ArchitectureConfig) -> list[Param]:
        """Its table of our parameter names against Hugging Face tensor names for `config`."""
        if self.hf is None:
            raise ValueError(f"the {self.name} family has no Hugging Face format")
        return self.hf.params(config.resolved())


# The registry: architecture name -> Family, in the order registered.
ARCHITECTURES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` under its name (and its HF classes); a name or class already taken by another
    family is refused, so a family cannot silently replace a built-in one."""
    taken = ARCHITECTURES.get(family.name)
    if taken is not None and taken is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    for hf_class in family.hf.classes if family.hf else ():
        owner = family_of_hf_class(hf_class)
        if owner is not None and owner.name != family.name:
            raise ValueError(f"{hf_class} is already read by the {owner.name} family")
    ARCHITECTURES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family registered as `name`; a `KeyError` names the registered ones."""
    if name not in ARCHITECTURES:
        raise KeyError(f"no model family {name!r}; registered: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def family_of_hf_class(hf_class: str) -> Family | None:
    """The family whose Hugging Face format reads `hf_class` (`"MistralForCausalLM"`), if any."""
    for family in ARCHITECTURES.values():
        if family.hf is not None and hf_class in family.hf.classes:
            return family
    return None


def hf_classes() -> tuple[str, ...]:
    """Every Hugging Face class some family reads, in registration order."""
    return tuple(c for f in ARCHITECTURES.values() if f.hf is not None for c in f.hf.classes)


def build_architecture(name: str, config: ArchitectureConfig, vocab_size: int, *,
                       key: PRNGKeyArray) -> LanguageModel:
    """The model of family `name` from its config, for a tokenizer of `vocab_size` tokens. The
    config's own `vocab_size`, when set, must hold them all (an imported model's may be larger)."""
    own_vocab = config.vocab_size
    if own_vocab is not None and own_vocab < vocab_size:
        raise ValueError(f"model.vocab_size={own_vocab} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; raise it or set it to None")
    return get_family(name).build(config.resolved(), own_vocab or vocab_size, key=key)
