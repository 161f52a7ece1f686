"""The shared LoRA fine-tuning of an imported LLaMA, for the LoRA tests: its settings and the
module-scoped `llama` fixture that trains it."""

from types import SimpleNamespace

import pytest
from conftest import save_hf_model

from gptzoo.hf import import_hf
from gptzoo.recipe import load_recipe
from gptzoo.trainer import train

# A LoRA fine-tuning of an imported LLaMA: four steps of two micro-batches, saved every two.
LORA = {"lora.rank": "4", "lora.alpha": "8", "model.block_size": "32", "trainer.max_steps": "4",
        "trainer.batch_size": "4", "trainer.grad_accum_steps": "2", "trainer.eval_interval": "4",
        "trainer.eval_steps": "1", "trainer.checkpoint_interval": "2",
        "trainer.log_interval": "2", "trainer.steps_per_call": "2", "optimizer.lr": "3e-2",
        "optimizer.warmup_steps": "1"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory, small_text):
    root = tmp_path_factory.mktemp("lora")
    hf = save_hf_model("llama", root / "hf")
    import_hf(root / "hf", root / "base")
    overrides = {**LORA, "data.path": str(small_text)}
    recipe = load_recipe(root / "base" / "recipe.json", overrides)
    result = train(recipe, root / "tuned", init_from=root / "base")
    return SimpleNamespace(root=root, hf=hf, base=root / "base", run=root / "tuned",
                           overrides=overrides, result=result)
