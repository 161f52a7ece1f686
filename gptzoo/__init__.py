"""gptzoo: an Equinox model zoo for decoder-only language models.

    import gptzoo
    recipe = gptzoo.load_recipe("recipes/char_shakespeare.py", {"trainer.max_steps": "200"})
    result = gptzoo.train(recipe, run_dir="runs/demo")
    model, tokenizer = gptzoo.load("runs/demo")
    print(gptzoo.generate(model, tokenizer, "ROMEO:", max_new_tokens=100))
"""

from typing import TYPE_CHECKING

from gptzoo._lazy import lazy_attributes
from gptzoo.errors import GptzooError

# Each name is imported on first use, so that `gptzoo sample` starts without importing the
# training loop (its progress display and metrics sinks), and `import gptzoo.nn` without the rest.
_EXPORTS = {
    "Recipe": "gptzoo.recipe", "load_recipe": "gptzoo.recipe", "generate": "gptzoo.sample",
    "stream": "gptzoo.sample", "evaluate": "gptzoo.trainer.evaluate",
    "load": "gptzoo.trainer.run_dir", "train": "gptzoo.trainer.loop",
}
__all__ = [
    "GptzooError", "Recipe", "evaluate", "generate", "load", "load_recipe", "stream", "train",
]

if TYPE_CHECKING:
    from gptzoo.recipe import Recipe, load_recipe
    from gptzoo.sample import generate, stream
    from gptzoo.trainer import evaluate, load, train


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
