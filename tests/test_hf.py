"""Published weights: small random GPT-2 and LLaMA-family models made locally with transformers
(CPU torch, nothing downloaded; hf_models.py) are imported and must give transformers' logits and
greedy generations; export -> from_pretrained gives the same logits again; import -> export ->
import is bit-identical; models built from recipes and the default recipe's char run export as
transformers computes them; both config dialects read alike; bf16 weights import exactly."""

import json

import jax
import numpy as np
import pytest

# Imported, not skipped when missing: torch and transformers are in the test extra, and a CI
# machine that failed to install them must fail these tests rather than pass without them.
import torch
import transformers
from conftest import SHAKESPEARE
from hf_models import CONFIGS, TOLERANCE, VOCAB, hf_logits, make_hf, max_diff, random_tokens
from hf_models import imported as imported  # the fixture, where pytest finds it
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from gptzoo.hf import export_hf, import_hf, read_config, write_config
from gptzoo.hf.weights import write_params
from gptzoo.models import GPT2Config, LlamaConfig, build_architecture, get_family
from gptzoo.models.names import named_leaves, per_layer_leaves
from gptzoo.sample import generate_tokens
from gptzoo.trainer import load


@pytest.mark.parametrize("name", CONFIGS)
def test_saved_layouts_are_the_ones_named(imported, name):
    _, folder, _ = imported(name)
    save = CONFIGS[name]["save"]
    files = {p.name for p in folder.iterdir()}
    assert {"bin": "pytorch_model.bin", "sharded": "model.safetensors.index.json",
            "safetensors": "model.safetensors"}[save] in files


@pytest.mark.parametrize("name", CONFIGS)
def test_imported_logits_match_transformers(imported, name):
    hf, _, run = imported(name)
    model, _ = load(run)
    diff = max_diff(model, hf, random_tokens(0, (4, 48)))
    print(f"{name}: max |logit difference| {diff:.2e}")
    assert diff <= TOLERANCE


# One of each family, for time: learned positions (the sampler crops) and rotary (it slides).
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_llama3"])
def test_greedy_generation_matches_transformers(imported, name):
    hf, _, run = imported(name)
    model, _ = load(run)
    prompt = random_tokens(7, (1, 6))
    with torch.no_grad():
        expected = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                               min_new_tokens=20)[0, 6:].numpy()
    got = np.concatenate(list(generate_tokens(model, [prompt[0]], max_new_tokens=20,
                                              temperature=0.0)), axis=1)[0]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers_with_the_same_logits(imported, name, tmp_path):
    hf, _, run = imported(name)
    export_hf(run, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = random_tokens(3)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf, tokens), atol=1e-5)
    assert (Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).to_str()
            == Tokenizer.from_file(str(run / "tokenizer.json")).to_str())


@pytest.mark.parametrize("name", CONFIGS)
def test_import_export_import_is_bit_identical(imported, name, tmp_path):
    _, _, run = imported(name)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    first, second = (named_leaves(load(r)[0]) for r in (run, tmp_path / "run"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), key)
    assert json.loads((run / "recipe.json").read_text())["model"] == json.loads(
        (tmp_path / "run" / "recipe.json").read_text())["model"]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_recipe_models_export_to_transformers(architecture, tmp_path):
    """A model built from a recipe's config (LLaMA's hidden width from multiple_of, no
    vocab_size) exports as transformers computes it: same logits from from_pretrained."""
    config = (GPT2Config(n_layers=2, n_heads=2, d_model=32, block_size=64)
              if architecture == "gpt2" else
              LlamaConfig(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, block_size=64,
                          multiple_of=32, rotary_base=1000.0))
    model = build_architecture(architecture, config, VOCAB, key=jax.random.PRNGKey(0))
    tensors = write_params(get_family(architecture).hf_params(config),
                           {k: np.asarray(v) for k, v in per_layer_leaves(model).items()})
    (tmp_path / "config.json").write_text(json.dumps(write_config(architecture, config, VOCAB)))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(model, hf, random_tokens(2)) <= TOLERANCE


def test_both_config_dialects_read_alike(tmp_path):
    """transformers 4.x writes rope_theta and rope_scaling ("type" in older files, "rope_type"
    in newer), 5.x rope_parameters: all three give the same model."""
    v5 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "intermediate_size": 80, "vocab_size": VOCAB, "max_position_embeddings": 128,
          "rope_parameters": {**CONFIGS["llama_gqa_llama3"]["rope_parameters"]}}
    scaling = {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
    v4 = {**{k: v for k, v in v5.items() if k != "rope_parameters"}, "rope_theta": 50000.0,
          "rope_scaling": scaling}
    v4_old = {**v4, "rope_scaling": {("type" if k == "rope_type" else k): v
                                     for k, v in scaling.items()}}
    configs = []
    for i, dialect in enumerate((v5, v4, v4_old)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps(dialect))
        configs.append(read_config(tmp_path / str(i)).config)
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rotary_base == 50000.0 and configs[0].rope_scaling["factor"] == 4.0


def test_bfloat16_weights_import_exactly(tmp_path):
    """A bf16 checkpoint (most published LLaMAs) is widened to float32 without loss."""
    hf = make_hf("llama_tied", tmp_path / "hf").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, _ = load(tmp_path / "run")
    assert max_diff(model, hf.float(), random_tokens(1)) <= TOLERANCE


def test_the_default_recipes_char_run_exports(trained_run, tmp_path):
    """The README's first run (char tokens) loads in transformers with its ids and logits."""
    export_hf(trained_run, tmp_path / "hf")
    model, tokenizer = load(trained_run)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = SHAKESPEARE.read_text()[:64]
    ids = tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids.tolist() and hf_tokenizer.decode(ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_diff(model, hf, ids[None, :32]) <= TOLERANCE
