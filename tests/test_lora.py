"""LoRA: the component against float64 NumPy and PEFT's initialisation; training only the adapters
(optimizer state, frozen base, checkpoints that name the base, exact resume, accumulation,
bfloat16, eight devices against one); PEFT loading gptzoo's adapters and gptzoo importing PEFT's,
each with the other's logits (small random transformers models made here); one-line errors."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import EIGHT_DEVICES, ROOT, gptzoo_in_process, save_hf_model, set_args
from safetensors.numpy import load_file

from gptzoo.data import ByteTokenizer
from gptzoo.errors import GptzooError
from gptzoo.hf import export_hf, import_hf
from gptzoo.hf.peft_runs import export_peft, import_peft
from gptzoo.lora.adapters import adapter_of, add_lora
from gptzoo.lora.run import content_hash
from gptzoo.models import LlamaConfig, build_architecture
from gptzoo.models.names import named_leaves, per_layer_leaves
from gptzoo.nn import Linear
from gptzoo.nn.lora import LoRALinear
from gptzoo.recipe import LoRAConfig, load_recipe
from gptzoo.sample import generate_tokens
from gptzoo.trainer import load, train
from gptzoo.trainer.checkpoint import Checkpoints, named_arrays
from gptzoo.trainer.prepared import prepare

TOLERANCE = 1e-4  # max |logit difference| in float32


def test_lora_linear_is_its_base_plus_each_parts_update_in_float64():
    """Three fused parts of widths 6, 4, 4, each with its own rank-3 adapter."""
    rng = np.random.default_rng(0)
    lora = LoRALinear(Linear(8, 14, key=jax.random.PRNGKey(0)), 3, scale=2.5, splits=(6, 4, 4),
                      key=jax.random.PRNGKey(1))
    lora = eqx.tree_at(lambda m: (m.lora_b, m.bias), lora,
                       (jnp.asarray(rng.normal(size=(3, 14)), jnp.float32),
                        jnp.asarray(rng.normal(size=14), jnp.float32)))
    x = rng.normal(size=(5, 8)).astype(np.float32)
    w, b, a, bb = (np.asarray(t, np.float64) for t in (lora.weight, lora.bias, lora.lora_a,
                                                       lora.lora_b))
    expected = x @ w + b
    for j, (start, stop) in enumerate([(0, 6), (6, 10), (10, 14)]):
        expected[:, start:stop] += 2.5 * (x @ a[:, 3 * j:3 * j + 3]) @ bb[:, start:stop]
    np.testing.assert_allclose(lora(jnp.asarray(x)), expected, atol=1e-5)
    np.testing.assert_allclose(lora.merged()(jnp.asarray(x)), expected, atol=1e-5)


def test_adapters_start_as_pefts_and_leave_the_model_unchanged():
    """A as PEFT's default draws it (torch's kaiming-uniform, a = sqrt(5)), B zero: the adapted
    model's logits are the base's exactly; scanned and unscanned layers draw the same adapters."""
    ours = np.asarray(LoRALinear(Linear(256, 8, key=jax.random.PRNGKey(0)), 64, scale=1.0,
                                 key=jax.random.PRNGKey(1)).lora_a)
    theirs = torch.nn.init.kaiming_uniform_(torch.empty(64, 256), a=math.sqrt(5)).numpy()
    assert abs(np.abs(ours).max() / np.abs(theirs).max() - 1) < 0.01
    assert abs(ours.std() / theirs.std() - 1) < 0.03
    config = LlamaConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, multiple_of=16)
    tokens = jnp.arange(16) % 50
    adapters = []
    for scan in (True, False):
        config.scan_layers = scan
        base = build_architecture("llama", config, 50, key=jax.random.PRNGKey(0))
        model = add_lora(base, LoRAConfig(rank=4), key=jax.random.PRNGKey(1))
        np.testing.assert_array_equal(model(tokens), base(tokens))
        assert all(not np.asarray(b).any() for n, b in named_leaves(model).items()
                   if n.endswith("lora_b"))
        adapters.append({k: np.asarray(v) for k, v in per_layer_leaves(adapter_of(model)).items()})
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 16
    for name in adapters[0]:
        np.testing.assert_array_equal(adapters[0][name], adapters[1][name], name)


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


def tuned(llama, **changes):
    return load_recipe(llama.base / "recipe.json", {**llama.overrides, **changes})


def adapter_arrays(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in named_arrays(adapter_of(model)).items()}


def test_only_the_adapters_train_and_the_checkpoints_hold_them_and_name_the_base(llama):
    state = named_arrays(prepare(tuned(llama), init_from=llama.base).opt_state)
    adapters = adapter_arrays(llama.result.model)
    assert len(adapters) == 8  # lora_a and lora_b of 4 projections, layers stacked
    for moment in ("mu", "nu"):  # Adam's two moments, of the adapters only
        held = {k.split(f".{moment}.", 1)[1]: v for k, v in state.items() if f".{moment}." in k}
        assert held.keys() == adapters.keys()
        assert sum(v.nbytes for v in held.values()) == sum(a.nbytes for a in adapters.values())
    base, _ = load(llama.base)
    trained = named_arrays(llama.result.model)
    for name, array in named_arrays(base).items():  # frozen, bit for bit
        np.testing.assert_array_equal(trained[name], array, name)
    assert all(np.abs(a).max() > 1e-3 for n, a in adapters.items() if n.endswith("lora_b"))
    checkpoints = Checkpoints(llama.run)
    meta = checkpoints.meta(4)
    checkpoints.close()
    assert set(meta["shapes"]["model"]) == set(adapters)
    assert meta["lora_base"] == {"path": str(llama.base.absolute()), "hash": content_hash(base)}


def test_a_resumed_lora_run_repeats_the_unbroken_one(llama, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama.run, run)
    shutil.rmtree(run / "checkpoints" / "4")
    resumed = train(tuned(llama), run, resume=True)  # the base is the one its checkpoints name
    expected = adapter_arrays(llama.result.model)
    for name, array in adapter_arrays(resumed.model).items():
        np.testing.assert_array_equal(array, expected[name], name)


def test_a_diverging_lora_run_keeps_the_adapters_that_evaluate_as_well_as_the_run_did(
        llama, tmp_path):
    """Resumed at lr 1e30: step 5's adapters are finite and huge, and the steps after it are
    skipped. The stop evaluates each checkpoint's adapters on the frozen weights: it sets step 5
    aside and keeps step 4, whose loss is the one the run measured there."""
    run = tmp_path / "run"
    shutil.copytree(llama.run, run)
    val_4 = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
             if r["step"] == 4][0]
    diverging = tuned(llama, **{"trainer.max_steps": "10", "optimizer.lr": "1e30",
                                "trainer.checkpoint_interval": "1", "trainer.max_bad_steps": "2"})
    with pytest.raises(GptzooError) as error:
        train(diverging, run, resume=True)
    message = str(error.value)
    assert f"checkpoint step 4 is kept (validation loss {val_4:.4f} against {val_4:.4f} at " \
           "the step 4 evaluation" in message, message
    assert f"set aside in {run / 'set_aside'}: step 5 (validation loss" in message, message


def losses(run) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").open()]


def test_accumulated_and_bfloat16_lora_steps_agree_with_float32(llama, tmp_path):
    whole = train(tuned(llama, **{"trainer.grad_accum_steps": "1"}), tmp_path / "whole",
                  init_from=llama.base)
    expected = adapter_arrays(llama.result.model)
    for name, array in adapter_arrays(whole.model).items():
        np.testing.assert_allclose(array, expected[name], atol=2e-5, err_msg=name)
    bf16 = tuned(llama, **{"trainer.precision": "bfloat16"})
    half = train(bf16, tmp_path / "bf16", init_from=llama.base)
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(llama.run), rtol=0.02)
    assert half.model.blocks.layers.attention.qkv.weight.dtype == jnp.float32
    np.testing.assert_array_equal(half.model.blocks.layers.attention.qkv.weight,
                                  llama.result.model.blocks.layers.attention.qkv.weight)
    # The frozen weights compute in bfloat16 too: the step casts the stacked q/k/v weight.
    p = prepare(bf16, init_from=llama.base)
    step = eqx.filter_make_jaxpr(p.train_chunk)(
        (p.train_batches.chunk(0, 1), p.train_key, np.int32(0)), p.model, p.opt_state)[0]
    assert p.model.blocks.layers.attention.qkv.weight.shape == (2, 32, 64)
    assert "bf16[2,32,64]" in str(step)


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def gptzoo_logits(model, tokens) -> np.ndarray:
    return np.asarray(jax.vmap(model)(jnp.asarray(tokens, jnp.int32)))


def with_peft(hf_dir, adapter_dir):
    """transformers' model of `hf_dir` with PEFT's adapter from `adapter_dir`, loaded with
    warnings as errors (transformers' deprecation notices aside): a key PEFT does not place only
    warns, and would leave B at zero. Every tensor of the file must be one PEFT holds."""
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    held = peft.get_peft_model_state_dict(model)
    assert held.keys() == load_file(adapter_dir / "adapter_model.safetensors").keys()
    return model


TOKENS = np.random.default_rng(0).integers(0, 256, (3, 32))


def test_peft_loads_the_trained_adapter_and_the_merged_export_is_the_same(llama, tmp_path):
    export_peft(llama.run, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                        "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str((llama.root / "hf").absolute())
    theirs = torch_logits(with_peft(llama.root / "hf", tmp_path / "adapter"), TOKENS)
    merged, unmerged = (gptzoo_logits(load(llama.run, merge=m)[0], TOKENS) for m in (True, False))
    export_hf(llama.run, tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    differences = {"merged": np.abs(merged - theirs).max(),
                   "unmerged": np.abs(unmerged - theirs).max(),
                   "merged export": np.abs(torch_logits(exported, TOKENS) - theirs).max()}
    print(f"LLaMA, trained adapter, max |logit - PEFT's|: {differences}")
    assert max(differences.values()) <= TOLERANCE
    assert np.abs(theirs - torch_logits(llama.hf, TOKENS)).max() > 1e-3  # the adapter acts


@pytest.mark.parametrize("architecture, targets, rslora", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"], False),  # Conv1D, fan_in_fan_out
    ("llama", ["q_proj", "v_proj", "o_proj", "down_proj"], True),  # k_proj and gate/up not
])
def test_a_peft_adapter_imports_with_pefts_logits_and_exports_back_exactly(
        tmp_path, architecture, targets, rslora):
    save_hf_model(architecture, tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.manual_seed(1)
    made = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
        fan_in_fan_out=architecture == "gpt2")).eval()
    made.save_pretrained(tmp_path / "adapter")
    theirs = torch_logits(made, TOKENS)
    with made.disable_adapter():
        assert np.abs(torch_logits(made, TOKENS) - theirs).max() > 1e-3  # the adapter acts
    result = gptzoo_in_process("import-hf", tmp_path / "hf", "--adapter", tmp_path / "adapter",
                               "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    export_hf(tmp_path / "run", tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    differences = {"merged": gptzoo_logits(load(tmp_path / "run")[0], TOKENS) - theirs,
                   "unmerged": gptzoo_logits(load(tmp_path / "run", merge=False)[0],
                                             TOKENS) - theirs,
                   "merged export": torch_logits(exported, TOKENS) - theirs}
    differences = {k: float(np.abs(v).max()) for k, v in differences.items()}
    print(f"{architecture}, PEFT's adapter, max |logit - PEFT's|: {differences}")
    assert max(differences.values()) <= TOLERANCE
    assert gptzoo_in_process("export-hf", tmp_path / "run", "--peft", "--out",
                             tmp_path / "again").returncode == 0
    original, again = (load_file(d / "adapter_model.safetensors")
                       for d in (tmp_path / "adapter", tmp_path / "again"))
    for key, tensor in again.items():  # a fused part PEFT left out comes back as zeros
        np.testing.assert_array_equal(tensor, original.get(key, np.zeros_like(tensor)), key)
    assert original.keys() <= again.keys()
    reloaded = torch_logits(with_peft(tmp_path / "hf", tmp_path / "again"), TOKENS)
    assert np.abs(reloaded - theirs).max() <= TOLERANCE


def test_sample_and_eval_read_a_lora_run_as_peft_computes_it(llama, small_text):
    """Greedy decoding from the LoRA run gives PEFT's greedy tokens; eval scores the adapted
    model, not the base."""
    export_peft(llama.run, llama.root / "sampled_adapter")
    adapted = with_peft(llama.root / "hf", llama.root / "sampled_adapter")
    prompt = ByteTokenizer().encode("ROMEO:")
    with torch.no_grad():
        ids = adapted.generate(torch.tensor(prompt[None]), max_new_tokens=12, do_sample=False,
                               min_new_tokens=12)[0, len(prompt):].numpy()
    ours = np.concatenate(list(generate_tokens(load(llama.run)[0], [prompt], max_new_tokens=12,
                                               temperature=0.0)), axis=1)[0]
    np.testing.assert_array_equal(ours, ids)
    scores = [gptzoo_in_process("eval", "--ckpt", run, "--data", small_text)
              for run in (llama.run, llama.base)]
    tuned_loss, base_loss = (float(s.stdout.split("val loss ")[1].split()[0]) for s in scores)
    print(f"val loss: tuned {tuned_loss:.4f}, base {base_loss:.4f}")
    assert tuned_loss < base_loss  # fine-tuned on this text, from a random model


def test_the_fine_tuning_walkthrough_on_gpt2(tmp_path, small_text):
    """docs/fine-tuning.md's steps on a local GPT-2 folder: import, LoRA fine-tune on a text
    file, sample, export merged and as a PEFT adapter; transformers and PEFT (over the imported
    folder) give gptzoo's logits."""
    save_hf_model("gpt2", tmp_path / "gpt2")
    steps = [("import-hf", tmp_path / "gpt2", "--out", tmp_path / "runs/gpt2"),
             ("train", tmp_path / "runs/gpt2/recipe.json", "--init-from", tmp_path / "runs/gpt2",
              *set_args({"lora.rank": 4, "data.path": small_text, "trainer.max_steps": 2,
                         "trainer.batch_size": 2, "trainer.steps_per_call": 2,
                         "trainer.log_interval": 2, "trainer.eval_interval": 2,
                         "trainer.eval_steps": 1, "trainer.checkpoint_interval": 2,
                         "optimizer.lr": 3e-2, "optimizer.warmup_steps": 1}),
              "--run-dir", tmp_path / "runs/gpt2_lora"),
             ("sample", "--ckpt", tmp_path / "runs/gpt2_lora", "--prompt", "ROMEO:",
              "--max-new-tokens", "8"),
             ("export-hf", tmp_path / "runs/gpt2_lora", "--out", tmp_path / "gpt2_tuned"),
             ("export-hf", tmp_path / "runs/gpt2_lora", "--peft", "--out", tmp_path / "adapter")]
    for step in steps:
        result = gptzoo_in_process(*step)
        assert result.returncode == 0, (step[0], result.stderr)
    assert result.stdout.startswith("exported")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"] and config["fan_in_fan_out"]
    ours = gptzoo_logits(load(tmp_path / "runs/gpt2_lora")[0], TOKENS)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2_tuned").eval()
    adapted = with_peft(tmp_path / "gpt2", tmp_path / "adapter")
    differences = {"merged export": np.abs(torch_logits(merged, TOKENS) - ours).max(),
                   "PEFT": np.abs(torch_logits(adapted, TOKENS) - ours).max()}
    print(f"GPT-2, trained adapter, max |logit - gptzoo's|: {differences}")
    assert max(differences.values()) <= TOLERANCE
    with adapted.disable_adapter():
        assert np.abs(torch_logits(adapted, TOKENS) - ours).max() > 1e-3  # the adapter acts


def one_line_error(result, *fragments):
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert all(f in result.stderr for f in fragments), result.stderr


def test_bad_lora_settings_fail_with_one_line(llama, tmp_path):
    def train_with(*overrides, init_from=llama.base):
        return gptzoo_in_process("train", llama.base / "recipe.json",
                                 *set_args({**llama.overrides, **dict(overrides)}),
                                 *(["--init-from", init_from] if init_from else []),
                                 "--run-dir", tmp_path / "run")

    one_line_error(train_with(("lora.targets", "attention\\.nothing")),
                   "lora.targets='attention\\\\.nothing' matches no projection",
                   "blocks.0.attention.qkv, blocks.0.attention.out")
    one_line_error(train_with(("lora.targets", "blocks\\.0\\.mlp")),
                   "matches 1 of the 2 scanned layers' blocks.0.mlp.gate_up",
                   "--set model.scan_layers=false")
    one_line_error(train_with(("lora.targets", "(")), "lora.targets='(' is not a regular")
    one_line_error(train_with(("lora.rank", "-1")), "lora.rank=-1 must be 0 (off)")
    one_line_error(train_with(init_from=None), "lora.rank=4 trains adapters", "--init-from")
    assert not (tmp_path / "run" / "checkpoints").exists()
    one_line_error(gptzoo_in_process("export-hf", llama.base, "--peft", "--out", tmp_path / "x"),
                   "has no LoRA adapters (lora.rank=0)", "drop --peft")


def test_a_peft_adapter_of_another_model_is_refused_naming_what_differs(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    for name, config in (("wider", {"hidden_size": 48}), ("deeper", {"num_hidden_layers": 3})):
        other = save_hf_model("llama", tmp_path / name, **config)
        peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
            tmp_path / f"{name}_adapter")
    with pytest.raises(GptzooError, match=r"q_proj.lora_A.weight is \(2, 48\), the base model "
                                          r"needs \(2, 32\)"):
        import_peft(tmp_path / "hf", tmp_path / "wider_adapter", tmp_path / "run")
    with pytest.raises(GptzooError, match=r"tensor base_model.model.model.layers.2.self_attn."
                                          r"q_proj.lora_A.weight names no module of the base"):
        import_peft(tmp_path / "hf", tmp_path / "deeper_adapter", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_a_moved_or_changed_base_is_one_line(tmp_path):
    save_hf_model("gpt2", tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"],
                                              fan_in_fan_out=True)).save_pretrained(
        tmp_path / "adapter")
    import_peft(tmp_path / "hf", tmp_path / "adapter", tmp_path / "run")
    (tmp_path / "run" / "base").rename(tmp_path / "moved")
    one_line_error(gptzoo_in_process("sample", "--ckpt", tmp_path / "run"),
                   "adapt the base run", "which is not there (moved or deleted)")
    save_hf_model("gpt2", tmp_path / "other", seed=1)
    import_hf(tmp_path / "other", tmp_path / "run" / "base")
    one_line_error(gptzoo_in_process("eval", "--ckpt", tmp_path / "run"),
                   "the base run changed")


# With eight CPU devices: the LoRA fine-tuning on FSDP and FSDP x tensor meshes; prints each
# mesh's adapters and losses as JSON.
_ON_EIGHT_DEVICES = """
import json, sys
from pathlib import Path
import numpy as np
import gptzoo
from gptzoo.lora.adapters import adapter_of
from gptzoo.trainer.checkpoint import named_arrays

base, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
found = {}
for name, (fsdp, tensor) in {"fsdp8": (8, 1), "fsdp4_tensor2": (4, 2)}.items():
    mesh = {"mesh.data": 1, "mesh.fsdp": fsdp, "mesh.tensor": tensor}
    recipe = gptzoo.load_recipe(base / "recipe.json", {**overrides, **mesh})
    model = gptzoo.train(recipe, out / name, init_from=base).model
    found[name] = {k: np.asarray(v).tolist() for k, v in named_arrays(adapter_of(model)).items()}
print(json.dumps(found))
"""


@pytest.mark.dist
def test_lora_on_eight_devices_equals_one(llama, tmp_path):
    overrides = {**llama.overrides, "trainer.batch_size": "8", "trainer.grad_accum_steps": "1"}
    one = train(load_recipe(llama.base / "recipe.json", overrides), tmp_path / "one",
                init_from=llama.base)
    eight = subprocess.run(
        [sys.executable, "-c", _ON_EIGHT_DEVICES, str(llama.base), str(tmp_path),
         json.dumps(overrides)], capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **EIGHT_DEVICES})
    assert eight.returncode == 0, eight.stderr[-3000:]
    found = json.loads(eight.stdout.strip().splitlines()[-1])
    for mesh, adapters in found.items():
        for name, array in adapter_arrays(one.model).items():
            # Adam's first steps magnify rounding where a gradient is near zero
            np.testing.assert_allclose(adapters[name], array, atol=1e-4, err_msg=f"{mesh} {name}")
        np.testing.assert_allclose(losses(tmp_path / mesh), losses(tmp_path / "one"), rtol=1e-5)
