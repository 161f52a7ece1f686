"""LoRA and PEFT: PEFT loading gptzoo's adapters and gptzoo importing PEFT's, each with the other's
logits (small random transformers models made here); sampling and eval of a LoRA run; the
fine-tuning walkthrough; one-line errors."""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import lora_models
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import gptzoo_in_process, save_hf_model, set_args
from safetensors.numpy import load_file, save_file

from gptzoo.data import ByteTokenizer
from gptzoo.errors import GptzooError
from gptzoo.hf import export_hf, import_hf
from gptzoo.hf.peft_runs import export_peft, import_peft
from gptzoo.sample import generate_tokens
from gptzoo.trainer import load

llama = lora_models.llama  # the shared LoRA fine-tuning, trained once for this module

TOLERANCE = 1e-4  # max |logit difference| in float32


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
    # PEFT's own state also holds a copy of an adapted lm_head's weights, not the adapter's.
    held = {k for k in peft.get_peft_model_state_dict(model) if ".base_layer." not in k}
    assert held == load_file(adapter_dir / "adapter_model.safetensors").keys()
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
    ("llama", ["q_proj", "lm_head"], False),  # the head, with a dropout for attention only
])
def test_a_peft_adapter_imports_with_pefts_logits_and_exports_back_exactly(
        tmp_path, architecture, targets, rslora):
    save_hf_model(architecture, tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.manual_seed(1)
    made = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
        fan_in_fan_out=architecture == "gpt2", lora_dropout=0.05)).eval()
    made.save_pretrained(tmp_path / "adapter")  # with lm_head, also PEFT's copy of its weights
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
    assert {k for k in original if ".base_layer." not in k} <= again.keys()  # but PEFT's copy
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


@pytest.mark.parametrize("setting, fragment", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' has PEFT change the base"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' has PEFT change the base"),
    ({"alora_invocation_tokens": [5, 6]}, "(activated LoRA) is not supported"),
    ({"task_type": "CAUSAL_LM", "future_variant": True}, "future_variant (a LoRA variant gptzoo "
                                                         "does not know) is not supported"),
])
def test_adapters_peft_computes_otherwise_are_refused_in_one_line(tmp_path, setting, fragment):
    """Each of these imported as plain LoRA would be silently off PEFT's logits."""
    save_hf_model("llama", tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    known = {k: v for k, v in setting.items() if k != "future_variant"}
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], **known)
                        ).save_pretrained(tmp_path / "adapter")
    saved = tmp_path / "adapter" / "adapter_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), **setting}))
    with pytest.raises(GptzooError, match=re.escape(fragment)):
        import_peft(tmp_path / "hf", tmp_path / "adapter", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_damaged_or_unimportable_adapters_and_resuming_an_import_are_one_line(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
                        ).save_pretrained(tmp_path / "head")  # with PEFT's copy of lm_head
    damaged = {"no rank": ({"peft_type": "LORA"}, "a JSON object with its rank r"),
               "a list": ([1], "a JSON object with its rank r")}
    for name, (config, fragment) in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        one_line_error(gptzoo_in_process("import-hf", tmp_path / "hf", "--adapter",
                                         tmp_path / name, "--out", tmp_path / "run"), fragment)
    (tmp_path / "head" / "adapter_model.safetensors").rename(tmp_path / "copy.safetensors")
    (tmp_path / "head" / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    one_line_error(gptzoo_in_process("import-hf", tmp_path / "hf", "--adapter", tmp_path / "head",
                                     "--out", tmp_path / "run"), "adapter_model.safetensors is "
                   "not a readable safetensors file")
    tensors = load_file(tmp_path / "copy.safetensors")
    tensors["base_model.model.lm_head.base_layer.weight"] *= 2  # as if the vocabulary had changed
    save_file(tensors, tmp_path / "head" / "adapter_model.safetensors")
    one_line_error(gptzoo_in_process("import-hf", tmp_path / "hf", "--adapter", tmp_path / "head",
                                     "--out", tmp_path / "run"),
                   "lm_head.base_layer.weight differs from", "lm_head.weight")
    assert not (tmp_path / "run").exists()
    import_hf(tmp_path / "hf", tmp_path / "imported")
    one_line_error(gptzoo_in_process("train", tmp_path / "imported" / "recipe.json", "--resume",
                                     "--run-dir", tmp_path / "imported"),
                   "holds a model imported from", "--init-from")
