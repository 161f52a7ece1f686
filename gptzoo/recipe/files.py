"""Recipe files: a recipe `.py` executed or a run's `recipe.json` read, overrides applied; and the
copy a run directory keeps."""

import dataclasses
import importlib.util
import json
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from gptzoo.atomic import write_text_atomic
from gptzoo.errors import GptzooError
from gptzoo.models import ARCHITECTURES, ModelConfig
from gptzoo.recipe.schema import Recipe
from gptzoo.recipe.sections import DEFAULTS, SECTIONS


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe file (a `.py` file is executed; a run's `recipe.json` of a built-in
    architecture is only read), apply `overrides` (`{"trainer.max_steps": "100"}`), validate."""
    path = Path(path)
    if path.is_dir():
        inside = path / "recipe.json"
        raise GptzooError(f"recipe {path} is a folder; pass a recipe file, such as "
                          f"{inside if inside.is_file() else 'recipes/char_shakespeare.py'}")
    if not path.is_file():
        raise GptzooError(f"recipe {path} does not exist; "
                          "pass a recipe file such as recipes/char_shakespeare.py")
    recipe = _read_json_recipe(path) if path.suffix == ".json" else _python_recipe(path)
    for key, value in (overrides or {}).items():
        recipe.set(key, value)
    recipe.validate()
    _note_deprecated(recipe)
    return recipe


def _note_deprecated(recipe: Recipe) -> None:
    """One line on stderr for each setting that still works but has a replacement."""
    if isinstance(recipe.model, ModelConfig) and not recipe.model.scan_layers:
        print(f"note: {recipe.source.name}: model.scan_layers=false is deprecated and will go; "
              "use trainer.unroll_layers=true (the layers stay stacked and run as fast)",
              file=sys.stderr)


def _python_recipe(path: Path) -> Recipe:
    module = _exec_recipe(path)
    architecture = getattr(module, "architecture", None)
    build_model = getattr(module, "build_model", None)
    if architecture is not None:
        _check_architecture(architecture, path)
        if build_model is not None:
            raise GptzooError(f"recipe {path} names architecture={architecture!r} and defines "
                              "build_model; keep one")
    elif not callable(build_model):
        raise GptzooError(f"recipe {path} defines no build_model(model, vocab_size, *, key) "
                          f"function; add one or name a built-in architecture "
                          f"({', '.join(ARCHITECTURES)})")
    defaults = DEFAULTS
    if architecture is not None:
        defaults = {**DEFAULTS, "model": ARCHITECTURES[architecture].config}
    sections = {}
    for s in SECTIONS:
        config = getattr(module, s, None)
        sections[s] = defaults[s]() if config is None else config
        # A built-in architecture's model section must be its config: the builder's arguments.
        must_be = defaults[s] if architecture and s == "model" else object
        if not dataclasses.is_dataclass(sections[s]) or not isinstance(sections[s], must_be):
            raise GptzooError(f"recipe {path}: `{s}` must be a dataclass instance such as "
                              f"{defaults[s].__name__}()")
    return Recipe(name=path.stem, source=path, build_model=build_model,
                  architecture=architecture, **sections)


def _read_json_recipe(path: Path) -> Recipe:
    """A recipe of a built-in architecture from the `recipe.json` a run directory holds."""
    values = _read_json(path)
    architecture = values.get("architecture")
    if architecture is None:
        raise GptzooError(f"{path} names no built-in architecture; pass the run's recipe.py")
    _check_architecture(architecture, path)
    classes = {**DEFAULTS, "model": ARCHITECTURES[architecture].config}
    try:
        sections = {s: classes[s](**values.get(s, {})) for s in SECTIONS}
    except TypeError as e:
        raise GptzooError(f"{path}: {e}; remove the key or fix its name") from e
    return Recipe(name=values.get("name", path.parent.name), source=path, build_model=None,
                  architecture=architecture, **sections)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptzooError(f"{path} is not valid JSON ({e}); restore it from the run") from e


def _check_architecture(architecture: Any, path: Path) -> None:
    if architecture not in ARCHITECTURES:
        raise GptzooError(f"{path}: architecture={architecture!r} is not built in; choose one of "
                          f"{', '.join(ARCHITECTURES)} or define build_model")


def _exec_recipe(path: Path) -> types.ModuleType:
    name = f"gptzoo_recipe_{path.stem}"
    # Python source whatever the file's name ends with (recipe.txt, an extensionless file).
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(
        name, str(path)))
    module = importlib.util.module_from_spec(spec)
    # Registered so dataclasses and pickling inside the recipe can find their module.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise GptzooError(f"recipe {path} line {e.lineno}: SyntaxError: {e.msg}; "
                          "fix the recipe") from e
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
        where = f" line {frames[-1].lineno}" if frames else ""
        raise GptzooError(f"recipe {path}{where}: {type(e).__name__}: {e}; fix the recipe") from e
    return module


def save_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Copy the recipe source (if a Python file) and its resolved values into the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.source.suffix == ".py":
        write_text_atomic(run_dir / "recipe.py", recipe.source.read_text())
    built_in = {"architecture": recipe.architecture} if recipe.architecture else {}
    resolved = {"name": recipe.name, **built_in, **recipe.to_dict()}
    write_text_atomic(run_dir / "recipe.json", json.dumps(resolved, indent=2) + "\n")


def load_run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory was trained with, as `save_recipe` left it: read from
    `recipe.json` for a built-in architecture, else by executing the run's `recipe.py`."""
    source, resolved = run_dir / "recipe.py", run_dir / "recipe.json"
    if resolved.is_file() and "architecture" in _read_json(resolved):
        return _read_json_recipe(resolved)
    if not source.is_file() or not resolved.is_file():
        raise GptzooError(f"{run_dir} holds no recipe.py/recipe.json; point --ckpt at a run "
                          "directory made by gptzoo train")
    values = json.loads(resolved.read_text())
    recipe = load_recipe(source)
    recipe.name = values.get("name", recipe.name)
    for section in SECTIONS:
        for field, value in values.get(section, {}).items():
            recipe.set(f"{section}.{field}", value)
    return recipe
