"""gptzoo: an Equinox model zoo for decoder-only language models.

    import gptzoo
    recipe = gptzoo.load_recipe("recipes/char_shakespeare.py", {"trainer.max_steps": "200"})
    result = gptzoo.train(recipe, run_dir="runs/demo")
    model, tokenizer = gptzoo.load("runs/demo")
    print(gptzoo.generate(model, tokenizer, "ROMEO:", max_new_tokens=100))
"""

from gptzoo.errors import GptzooError
from gptzoo.recipe import Recipe, load_recipe
from gptzoo.sample import generate, stream
from gptzoo.trainer import evaluate, load, train

__all__ = [
    "GptzooError", "Recipe", "evaluate", "generate", "load", "load_recipe", "stream", "train",
]
