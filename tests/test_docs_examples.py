"""The documentation's examples work as written: every ```python block in docs/ runs, the recipe
files the pages define load and build, and the component walkthrough's recipe trains."""

import json
import re
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ONE_EVAL

import gptzoo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
RECIPE_NAME = re.compile(r"# (\w+\.py)\b")


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number of the fence, code) of each ```python block of a page."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def doc_recipes() -> dict[str, str]:
    """The blocks that are whole recipe files: those opening with a `# NAME.py` comment."""
    recipes = {}
    for page in DOCS.rglob("*.md"):
        for _, code in python_blocks(page):
            match = RECIPE_NAME.match(code)
            if match:
                recipes[match.group(1)] = code
    return recipes


# serving.md's examples talk to a live server: tests/test_serve_docs.py runs them against one.
PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p) and p.name != "serving.md")


def test_every_page_has_examples_and_the_docs_define_their_recipes():
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    components = {p.name for p in (DOCS / "components").glob("*.md")}
    assert {f"components/{c}" for c in components} <= names
    assert {"getting-started.md", "recipes.md", "generation.md", "write-a-component.md"} <= names
    assert {"char_shakespeare.py", "llama_style.py", "relu2_mlp.py"} <= doc_recipes().keys()


def promised_output(lines: list[str], first: int) -> re.Pattern | None:
    """What a `print(...)  # OUTPUT: prose` call starting on `lines[first]` promises, as a
    pattern, or None without comments. A call over several lines may comment each argument. The
    output is the text before the first ": " or ", Word" (the prose), "..." stands for anything
    and runs of whitespace for any whitespace."""
    shown, depth, line = [], 0, first
    while True:
        code, _, comment = lines[line].partition("  # ")
        depth += code.count("(") - code.count(")")
        if comment:
            shown.append(re.split(r": |, (?=[A-Za-z])", comment)[0].strip())
        if depth <= 0:
            break
        line += 1
    if not shown:
        return None
    parts = [r"\s+".join(map(re.escape, piece.split())) for piece in " ".join(shown).split("...")]
    return re.compile(r"\s*.*?\s*".join(parts), re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run_and_print_what_they_say(page, tmp_path, monkeypatch, family_registry):
    """A page's blocks run in order, each in a fresh module, in a directory where
    `recipes/` is the repository's (files a block writes, such as run directories, stay there for
    the blocks after it), and the families they register are gone after the page. Tracebacks
    point at the page's own line numbers. A `print` whose line ends in a comment must print what
    the comment shows."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    lines = page.read_text().splitlines()
    checked = []

    def checking_print(*args, **kwargs):
        print(*args, **kwargs)
        line = sys._getframe(1).f_lineno - 1
        while "print(" not in lines[line]:  # a call spread over lines: find its first
            line -= 1
        pattern = promised_output(lines, line)
        if pattern and "sep" not in kwargs and "end" not in kwargs:
            printed = " ".join(map(str, args))
            assert pattern.fullmatch(printed), f"{page.name} line {line + 1} printed {printed!r}"
            checked.append(line)

    for i, (line, code) in enumerate(python_blocks(page)):
        name = f"docs_example_{page.stem.replace('-', '_')}_{i}"
        module = types.ModuleType(name)
        module.print = checking_print
        monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
        exec(compile("\n" * line + code, str(page), "exec"), module.__dict__)
    promised = [i for i, text in enumerate(lines)
                if re.match(r"\s*print\(", text) and promised_output(lines, i)]
    assert sorted(set(checked)) == promised  # every promised output was printed and checked


def test_index_opens_with_the_readme_setup_commands():
    first_block = (DOCS / "index.md").read_text().split("```")[1]
    assert first_block == (ROOT / "README.md").read_text().split("```")[1]


def test_recipes_the_docs_name_exist():
    named = {name for page in DOCS.rglob("*.md")
             for name in re.findall(r"recipes/\w+\.py", page.read_text())}
    assert named and all((ROOT / name).is_file() for name in named), named


def test_recipe_shown_in_the_docs_is_the_shipped_one():
    body = doc_recipes()["char_shakespeare.py"].split("\n", 1)[1].strip()
    assert body in (ROOT / "recipes" / "char_shakespeare.py").read_text()


def write_recipe(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(doc_recipes()[name])
    return path


def test_llama_style_recipe_builds_and_takes_its_own_keys(tmp_path):
    path = write_recipe(tmp_path, "llama_style.py")
    recipe = gptzoo.load_recipe(path, {**TINY_ONE_EVAL, "model.n_kv_heads": "1",
                                       "model.rotary_fraction": "0.5"})
    assert {"model.n_kv_heads", "model.rotary_fraction", "model.multiple_of"} <= set(recipe.keys())
    model = recipe.build(65, key=jax.random.PRNGKey(0))
    attention = model.blocks[0].attention
    assert attention.n_kv_heads == 1 and attention.positional.rotary_dim == 8
    assert model.position_embedding is None and model.cacheable and model.slides_window
    tokens = jnp.zeros((2, 32), jnp.int32)
    assert model(tokens).shape == (2, 32, 65)


def test_relu2_recipe_trains_and_samples_from_its_run_directory(tmp_path, small_text):
    path = write_recipe(tmp_path, "relu2_mlp.py")
    recipe = gptzoo.load_recipe(path, {**TINY_ONE_EVAL, "optimizer.lr": "3e-3",
                                       "data.path": str(small_text), "model.hidden_mult": "2"})
    run_dir = tmp_path / "run"
    result = gptzoo.train(recipe, run_dir=run_dir)

    mlps = [block.mlp for block in result.model.blocks]
    assert [type(m).__name__ for m in mlps] == ["ReluSquaredMLP"]
    assert mlps[0].up.weight.shape == (32, 64)  # hidden_mult=2 took effect
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").open()]
    assert losses[-1] < losses[0] - 0.3, losses
    assert np.isfinite(result.val_loss)

    # The run directory alone rebuilds the model: the recipe, component included, was copied.
    model, tokenizer = gptzoo.load(run_dir)
    assert model.cacheable
    text = gptzoo.generate(model, tokenizer, "ROMEO:", max_new_tokens=20, temperature=0)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
