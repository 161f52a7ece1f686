"""Small random transformers models for the published-weights tests (test_hf.py, test_hf_cli.py,
test_hf_variants.py, test_mixtral.py): their configs, made locally with CPU torch (nothing
downloaded) with a small byte-level BPE, imported once per module, and their logits compared."""

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Imported, not skipped when missing: torch and transformers are in the test extra, and a CI
# machine that failed to install them must fail these tests rather than pass without them.
import torch
import transformers
from conftest import SHAKESPEARE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptzoo.hf import import_hf

VOCAB = 300  # the tokenizer's: 256 bytes and 44 merges
TOLERANCE = 1e-4  # max |logit difference| in float32

# Small configs covering each feature: GPT-2 (tied head, exact GELU); LLaMA with grouped-query
# attention, rope_theta != 10,000, llama3 scaling, head_dim != hidden / heads, tied and untied
# heads; Qwen2's q/k/v biases; Mistral's sliding window, shorter than the tested sequences;
# Qwen3's QK-norm with head_dim != hidden / heads and attention biases (these two with weights 10x
# the default's, so attention is far from uniform). The `save` entry picks the file layout.
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
    "mistral_window": dict(cls="MistralConfig", save="safetensors", num_hidden_layers=2,
                           hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=128, sliding_window=5,
                           initializer_range=0.2),
    "qwen3": dict(cls="Qwen3Config", save="safetensors", num_hidden_layers=2, hidden_size=32,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  intermediate_size=64, max_position_embeddings=128, attention_bias=True,
                  tie_word_embeddings=False, initializer_range=0.2),
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


def make_hf(name: str, folder: Path, tokenizer: Callable[[], Tokenizer] = make_tokenizer):
    """The transformers model `name` of CONFIGS, saved in `folder` with `tokenizer()`'s
    tokenizer.json."""
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
    tokenizer().save(str(folder / "tokenizer.json"))
    return model


def import_once(tmp_path_factory, tokenizer: Callable[[], Tokenizer] = make_tokenizer):
    """`get(name)`: (transformers model, HF folder, run directory) of CONFIGS[name] with
    `tokenizer()`'s tokenizer.json, made and imported at the first call."""
    made = {}

    def get(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            hf = make_hf(name, root / "hf", tokenizer)
            import_hf(root / "hf", root / "run")
            made[name] = hf, root / "hf", root / "run"
        return made[name]

    return get


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`import_once` for a module: `imported(name)` is made once per module."""
    return import_once(tmp_path_factory)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def random_tokens(seed: int, shape=(3, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


def max_diff(model, hf, tokens) -> float:
    ours = np.asarray(jax.vmap(model)(jnp.asarray(tokens, jnp.int32)))
    return float(np.abs(ours - hf_logits(hf, tokens)).max())
