"""Recipes: plain Python files naming a model, its data, optimizer, schedule and trainer settings.

A recipe file names a registered `architecture` (`"gpt2"`, `"llama"`, `"perceiver_ar"`: the
`model` section is then that family's config, e.g. `GPT2Config`; see `gptzoo.models.registry`)
or defines `build_model(model, vocab_size, *, key)`,
and any of the sections `model`, `data`, `optimizer` and `trainer` (dataclass instances; missing
ones take the defaults below). Every field is overridable from the command line as
`--set section.field=value`. A run of a built-in architecture is rebuilt from its `recipe.json`
alone; a run of a custom recipe executes its copy of `recipe.py`, so load only runs you trust.
"""

import ast
import dataclasses
import difflib
import importlib.util
import json
import sys
import traceback
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptzoo.atomic import write_text_atomic
from gptzoo.data.batch_schedule import checked_schedule
from gptzoo.data.text import SHAKESPEARE
from gptzoo.errors import GptzooError
from gptzoo.lora.config import LORA_CHECKS, LoRAConfig, compile_targets
from gptzoo.models import ARCHITECTURES, ModelConfig, build_architecture
from gptzoo.nn.stack import REMAT_POLICIES


@dataclasses.dataclass
class DataConfig:
    path: str = str(SHAKESPEARE)  # a text file, a folder, a glob, or JSONL files
    val_fraction: float = 0.1
    tokenizer: str = "char"  # char, bytes, bpe (trained on the training split), or a tokenizer.json
    vocab_size: int = 1024  # bpe only
    text_field: str = "text"  # JSONL files: the field holding each document's text
    cache_dir: str = ""  # where token shards go; "" = $GPTZOO_CACHE or ~/.cache/gptzoo


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # global-norm clipping


@dataclasses.dataclass
class TrainerConfig:
    max_steps: int = 2000
    batch_size: int = 32
    eval_interval: int = 250
    eval_steps: int = 20
    checkpoint_interval: int = 500
    log_interval: int = 10
    steps_per_call: int = 10  # train steps fused into one jitted call with lax.scan
    keep_checkpoints: int = 3
    keep_best: bool = False  # also RUN_DIR/best: the step of the lowest val loss so far
    max_bad_steps: int = 20  # non-finite steps in a row (each skipped) before the run stops
    seed: int = 0
    wandb: bool = False  # also log to Weights & Biases (pip install -e .[wandb])
    wandb_project: str = "gptzoo"
    precision: str = "float32"  # float32, or bfloat16 compute over float32 master weights
    remat: str = "none"  # none, full, or a jax.checkpoint_policies name, per block
    unroll_layers: bool = False  # scanned layers written out: slower compiles, faster steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size stays the global)
    # [(step, batch size), ...]: the global batch from each listed step on; None: batch_size
    batch_schedule: list | None = None


@dataclasses.dataclass
class MeshConfig:
    """How the devices are arranged: the batch is split over data x fsdp x expert, parameters and
    optimizer state over fsdp, attention heads and MLP width over tensor, a mixture's experts over
    expert. -1 takes the devices left."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


SECTIONS = ("model", "data", "optimizer", "trainer", "mesh", "lora")
DEFAULTS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "trainer": TrainerConfig, "mesh": MeshConfig, "lora": LoRAConfig}
# (key, predicate, what it must be) checked after overrides, so bad values fail before training.
_CHECKS = [
    ("trainer.max_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.batch_size", lambda v: v > 0, "a positive integer"),
    ("trainer.eval_interval", lambda v: v > 0, "a positive integer"),
    ("trainer.eval_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.checkpoint_interval", lambda v: v > 0, "a positive integer"),
    ("trainer.log_interval", lambda v: v > 0, "a positive integer"),
    ("trainer.steps_per_call", lambda v: v > 0, "a positive integer"),
    ("trainer.keep_checkpoints", lambda v: v > 0, "a positive integer"),
    ("trainer.max_bad_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.grad_accum_steps", lambda v: v > 0, "a positive integer"),
    ("trainer.precision", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    ("trainer.remat", lambda v: v in REMAT_POLICIES, f"one of {', '.join(REMAT_POLICIES)}"),
    ("optimizer.lr", lambda v: v > 0, "positive"),
    ("model.n_layers", lambda v: v > 0, "a positive integer"),
    ("model.n_heads", lambda v: v > 0, "a positive integer"),
    ("model.d_model", lambda v: v > 0, "a positive integer"),
    ("model.block_size", lambda v: v > 0, "a positive integer"),
    ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("data.vocab_size", lambda v: v > 256, "above 256 (the byte alphabet and <|endoftext|>)"),
    *LORA_CHECKS,
]


@dataclasses.dataclass
class Recipe:
    name: str
    source: Path
    build_model: Callable[..., Any] | None
    model: Any
    data: DataConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    architecture: str | None = None  # a built-in, built from `model` without build_model
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)

    def build(self, vocab_size: int, *, key) -> Any:
        """The recipe's model from its (overridden) model section."""
        try:
            if self.architecture is not None:
                return build_architecture(self.architecture, self.model, vocab_size, key=key)
            return self.build_model(self.model, vocab_size, key=key)
        except (ValueError, TypeError) as e:
            raise GptzooError(f"recipe {self.source.name}: cannot build the model: {e}") from e

    def keys(self) -> list[str]:
        return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(self, s))]

    def get(self, key: str) -> Any:
        section, field = self._split(key)
        return getattr(getattr(self, section), field)

    def set(self, key: str, value: Any) -> None:
        """Set `section.field` to `value`: a string from the command line, or a JSON value."""
        section, field = self._split(key)
        config = getattr(self, section)
        setattr(config, field, _coerce(key, value, typing.get_type_hints(type(config))[field]))

    def to_dict(self) -> dict[str, Any]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def validate(self) -> None:
        for key, ok, what in _CHECKS:
            if key in self.keys() and not ok(self.get(key)):
                raise GptzooError(f"{key}={self.get(key)!r} must be {what}; "
                                  f"fix it with --set {key}=...")
        checked_schedule(self.trainer.batch_size, self.trainer.batch_schedule,
                         self.trainer.grad_accum_steps)
        compile_targets(self.lora.targets)

    def _split(self, key: str) -> tuple[str, str]:
        if key not in self.keys():
            close = difflib.get_close_matches(key, self.keys(), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else "run `gptzoo keys RECIPE` to list them"
            raise GptzooError(f"unknown recipe key {key!r} in {self.source.name}; {hint}")
        section, field = key.split(".", 1)
        return section, field


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    union = isinstance(annotation, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in options:
            return None
    for kind in (o for o in options if o is not type(None)):
        try:
            return _parse(value, kind)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise GptzooError(f"{key} must be {names}, got {value!r}; e.g. --set {key}={_example(options)}")


def _parse(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        return str(value)
    if kind is list:  # from the command line, JSON or Python: '[[0,16],[200,32]]', '[(0,16)]'
        value = _literal(value) if isinstance(value, str) else value
        if not isinstance(value, list | tuple):
            raise ValueError(value)
        return [list(v) if isinstance(v, tuple) else v for v in value]  # one form, either syntax
    raise TypeError(f"cannot parse {kind}")


def _literal(text: str) -> Any:
    """A JSON value, or a Python literal (tuples) as the recipe file itself would write it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            raise ValueError(text) from e


def _example(options: tuple) -> str:
    return {int: "8", float: "0.5", bool: "true", str: "text",
            list: "'[[0,16],[200,32]]'"}.get(options[0], "...")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GptzooError(f"--set {pair!r} is not KEY=VALUE; "
                              "write e.g. --set trainer.max_steps=100")
        overrides[key.strip()] = value.strip()
    return overrides


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe file (a `.py` file is executed; a run's `recipe.json` of a built-in
    architecture is only read), apply `overrides` (`{"trainer.max_steps": "100"}`), validate."""
    path = Path(path)
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
    spec = importlib.util.spec_from_file_location(name, path)
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
