"""`gptzoo train RECIPE --init-from RUN_DIR`: fine-tuning starts from another run's weights (a
trained run or an imported Hugging Face model) with a fresh optimizer and step 0."""

from dataclasses import dataclass
from pathlib import Path

import equinox as eqx

from gptzoo.data import Tokenizer
from gptzoo.errors import GptzooError
from gptzoo.models.names import (
    named_leaves,
    per_layer_leaves,
    replace_arrays,
    replace_per_layer,
    shape_differences,
    shapes,
)
from gptzoo.nn.leaves import is_array_or_shape
from gptzoo.trainer.run_dir import load


@dataclass
class Initial:
    """The weights and tokenizer of the run a fine-tuning starts from."""

    run_dir: Path
    model: eqx.Module
    tokenizer: Tokenizer

    @classmethod
    def load(cls, run_dir: str | Path) -> "Initial":
        model, tokenizer = load(run_dir)
        return cls(Path(run_dir), model, tokenizer)

    def weights_into(self, model: eqx.Module) -> eqx.Module:
        """`model` (the recipe's, or a template of its shapes) with every array taken, by module
        path, from this run's; refused, naming the parameters, when the two differ in names or
        shapes. Arrays of the same layout are taken as they are (no per-layer copies of a
        scanned model)."""
        same = named_leaves(self.model)
        if shapes(named_leaves(model, is_array_or_shape)) == shapes(same):
            return replace_arrays(model, same)
        ours = per_layer_leaves(model, is_array_or_shape)  # any layouts
        theirs = per_layer_leaves(self.model)
        differences = shape_differences(shapes(ours), shapes(theirs), "checkpoint", "the recipe")
        if differences:
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise GptzooError(f"--init-from {self.run_dir} does not fit the recipe: "
                              f"{'; '.join(differences[:3])}{more}; set the recipe's model "
                              "section to the run's (its recipe.json) or train from scratch")
        return replace_per_layer(model, theirs)
