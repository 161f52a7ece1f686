"""Published weights: small random GPT-2 and LLaMA-family models made locally with transformers
(CPU torch, nothing downloaded) are imported and must give transformers' logits and greedy
generations; export -> from_pretrained gives the same logits again; import -> export -> import is
bit-identical; bad folders fail with one line."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from gptzoo.errors import GptzooError  # noqa: E402
from gptzoo.hf import export_hf, import_hf, named_arrays  # noqa: E402
from gptzoo.sample import generate_tokens  # noqa: E402
from gptzoo.trainer import load  # noqa: E402
from tests.conftest import SHAKESPEARE  # noqa: E402

VOCAB = 300  # the tokenizer's: 256 bytes and 44 merges
TOLERANCE = 1e-4  # max |logit difference| in float32

# Small configs covering each feature: GPT-2 (tied head, exact GELU); LLaMA with grouped-query
# attention, rope_theta != 10,000, llama3 scaling, head_dim != hidden / heads, tied and untied
# heads; Qwen2's q/k/v biases. The `save` entry picks the file layout.
CONFIGS = {
    "gpt2": dict(cls="GPT2Config", save="safetensors", n_layer=2, n_embd=32, n_head=4,
                 n_positions=64, layer_norm_epsilon=1e-4),
    "gpt2_exact_gelu_bin": dict(cls="GPT2Config", save="bin", n_layer=2, n_embd=32, n_head=2,
                                n_positions=64, activation_function="gelu"),
    "llama_gqa_llama3": dict(
        cls="LlamaConfig", save="sharded", num_hidden_layers=2, hidden_size=48,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=80,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "llama_tied": dict(cls="LlamaConfig", save="safetensors", num_hidden_layers=2,
                       hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=64, max_position_embeddings=128,
                       tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 500.0}),
    "qwen2": dict(cls="Qwen2Config", save="safetensors", num_hidden_layers=2, hidden_size=32,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=128, tie_word_embeddings=False),
}


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens trained on a little Shakespeare."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()[:5000]], trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    return tokenizer


def perturb(model) -> None:
    """Move biases and norm weights away from their initial 0 and 1, so a missed one shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def make_hf(name: str, folder: Path):
    """The transformers model `name` of CONFIGS, saved in `folder` with a tokenizer.json."""
    spec = dict(CONFIGS[name])
    cls, save = spec.pop("cls"), spec.pop("save")
    config = getattr(transformers, cls)(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None, **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(model)
    model.save_pretrained(folder, max_shard_size="20KB" if save == "sharded" else "5GB")
    if save == "bin":  # transformers 5 writes only safetensors: the older pickle by hand
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    make_tokenizer().save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def imported(request, tmp_path_factory):
    """(name, transformers model, HF folder, run directory)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, root / "hf")
    import_hf(root / "hf", root / "run")
    return request.param, hf, root / "hf", root / "run"


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def random_tokens(seed: int, shape=(3, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def max_diff(model, hf, tokens) -> float:
    ours = np.asarray(jax.vmap(model)(jnp.asarray(tokens, jnp.int32)))
    return float(np.abs(ours - hf_logits(hf, tokens)).max())


def test_saved_layouts_are_the_ones_named(imported):
    name, _, folder, _ = imported
    save = CONFIGS[name]["save"]
    files = {p.name for p in folder.iterdir()}
    assert {"bin": "pytorch_model.bin", "sharded": "model.safetensors.index.json",
            "safetensors": "model.safetensors"}[save] in files


def test_imported_logits_match_transformers(imported):
    name, hf, _, run = imported
    model, _ = load(run)
    diff = max(max_diff(model, hf, random_tokens(seed)) for seed in range(2))
    print(f"{name}: max |logit difference| {diff:.2e}")
    assert diff <= TOLERANCE


def test_greedy_generation_matches_transformers(imported):
    _, hf, _, run = imported
    model, _ = load(run)
    prompt = random_tokens(7, (1, 6))
    with torch.no_grad():
        expected = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                               min_new_tokens=20)[0, 6:].numpy()
    got = np.concatenate(list(generate_tokens(model, [prompt[0]], max_new_tokens=20,
                                              temperature=0.0)), axis=1)[0]
    np.testing.assert_array_equal(got, expected)


def test_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
    _, hf, _, run = imported
    export_hf(run, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = random_tokens(3)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf, tokens), atol=1e-5)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


def test_import_export_import_is_bit_identical(imported, tmp_path):
    _, _, _, run = imported
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    first, second = (named_arrays(load(r)[0]) for r in (run, tmp_path / "run"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), key)
    assert json.loads((run / "recipe.json").read_text())["model"] == json.loads(
        (tmp_path / "run" / "recipe.json").read_text())["model"]
