"""Recipes: plain Python files naming a model, its data, optimizer, schedule and trainer settings.

A recipe file names a registered `architecture` (`"gpt2"`, `"llama"`, `"perceiver_ar"`: the
`model` section is then that family's config, e.g. `GPT2Config`; see `gptzoo.models.registry`)
or defines `build_model(model, vocab_size, *, key)`,
and any of the sections `model`, `data`, `optimizer` and `trainer` (dataclass instances; missing
ones take the defaults below). Every field is overridable from the command line as
`--set section.field=value`. A run of a built-in architecture is rebuilt from its `recipe.json`
alone; a run of a custom recipe executes its copy of `recipe.py`, so load only runs you trust.
"""

from gptzoo.lora.config import LoRAConfig
from gptzoo.models import ModelConfig
from gptzoo.recipe.files import load_recipe, load_run_recipe, save_recipe
from gptzoo.recipe.overrides import parse_overrides
from gptzoo.recipe.schema import Recipe
from gptzoo.recipe.sections import (
    DEFAULTS,
    SECTIONS,
    DataConfig,
    MeshConfig,
    OptimizerConfig,
    TrainerConfig,
)

__all__ = ["DEFAULTS", "SECTIONS", "DataConfig", "LoRAConfig", "MeshConfig", "ModelConfig",
           "OptimizerConfig", "Recipe", "TrainerConfig", "load_recipe", "load_run_recipe",
           "parse_overrides", "save_recipe"]
