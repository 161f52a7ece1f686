"""Mistral's sliding window and Qwen3's QK-norm against transformers, beyond what test_hf.py checks
for every config of its CONFIGS (logits, export -> from_pretrained, import -> export -> import):
both attention back-ends on inputs longer than the window, the context an import keeps, greedy
`gptzoo sample` against `generate` through the rolling cache and past block_size, and the window
keys of Qwen's configs both ways."""

import json

import jax
import pytest
import torch
import transformers
from conftest import gptzoo_in_process
from hf_models import CONFIGS, TOLERANCE, VOCAB, import_once, max_diff, random_tokens
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from gptzoo.errors import GptzooError
from gptzoo.hf import import_hf, read_config, write_config
from gptzoo.models import LlamaConfig
from gptzoo.nn.kv_cache import KVCache
from gptzoo.trainer import load

WINDOW = CONFIGS["mistral_window"]["sliding_window"]
CONTEXT = CONFIGS["mistral_window"]["max_position_embeddings"]


def one_character_tokenizer() -> Tokenizer:
    """VOCAB printable characters, a token each (ASCII, then CJK): a text decodes from one token
    sequence only, so comparing `gptzoo sample`'s text compares its tokens. (A byte-level BPE
    decodes a random model's stray bytes to U+FFFD, whatever the bytes.)"""
    chars = [chr(c) for c in range(33, 127)]
    chars += [chr(0x4E00 + i) for i in range(VOCAB - len(chars))]
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """test_hf's `imported(name)`, with `one_character_tokenizer`."""
    return import_once(tmp_path_factory, one_character_tokenizer)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_window_shorter_than_the_input_matches_both_backends(imported,
                                                               implementation):
    """The case that failed when the context was clamped to the window: window 5, 32 tokens."""
    _, folder, run = imported("mistral_window")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=implementation).eval()
    assert hf.config._attn_implementation == implementation
    model, _ = load(run)
    diff = max_diff(model, hf, random_tokens(4, (2, 32)))
    print(f"mistral_window, {implementation}: max |logit difference| {diff:.2e}")
    assert diff <= TOLERANCE


def test_an_imported_window_is_the_attentions_not_the_contexts(imported):
    """block_size is max_position_embeddings (capped), the window is how far attention reads,
    and the KV cache holds the window alone."""
    _, folder, run = imported("mistral_window")
    assert read_config(folder).config.block_size == CONTEXT
    model, _ = load(run)
    assert (model.block_size, model.context_window) == (CONTEXT, WINDOW)
    caches = jax.tree.leaves(model.init_cache(), is_leaf=lambda x: isinstance(x, KVCache))
    assert {c.positions.shape[-1] for c in caches} == {WINDOW}


def hf_greedy_text(hf, run, prompt: str, n_new: int) -> str:
    """The prompt and transformers' greedy continuation, decoded by the tokenizers library."""
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    return tokenizer.decode(out[0].tolist())


def cli_greedy_text(run, prompt: str, n_new: int) -> str:
    result = gptzoo_in_process("sample", "--ckpt", run, "--prompt", prompt, "--max-new-tokens",
                               n_new, "--temperature", "0")
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


@pytest.mark.parametrize("name", ["mistral_window", "qwen3"])
def test_greedy_sampling_matches_transformers_for_four_windows(imported, name):
    """`gptzoo sample --temperature 0` against `generate`: 20 tokens are four windows of the
    Mistral, whose 5-slot cache wraps round three times."""
    hf, _, run = imported(name)
    expected = hf_greedy_text(hf, run, "ROMEO:", 4 * WINDOW)
    assert cli_greedy_text(run, "ROMEO:", 4 * WINDOW) == expected


def test_a_window_slides_past_block_size_by_default_as_transformers(imported,
                                                                    tmp_path):
    """Imported with a block_size of 8, the model decodes past it with its rolling cache by
    default (--context slide): the tokens are transformers', which attends over the whole
    history through the same window. (A context shift would keep 4 tokens, fewer than the 9 the
    two layers of 5-token windows reach.)"""
    hf, folder, _ = imported("mistral_window")
    import_hf(folder, tmp_path / "run", block_size=8)
    expected = hf_greedy_text(hf, tmp_path / "run", "ROMEO:", 40)
    assert cli_greedy_text(tmp_path / "run", "ROMEO:", 40) == expected


def qwen_folder(tmp_path, cls: str, max_window_layers: int, layer_types: bool):
    """A Qwen config.json as transformers 5 saves it (with `layer_types`) or as transformers 4
    did (without: `max_window_layers` decides)."""
    config = getattr(transformers, cls)(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, use_sliding_window=True, sliding_window=4,
        max_window_layers=max_window_layers)
    config.architectures = [cls.replace("Config", "ForCausalLM")]
    folder = tmp_path / f"{cls}_{max_window_layers}"
    config.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    if not layer_types:
        del saved["layer_types"]
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


@pytest.mark.parametrize("layer_types", [True, False])
@pytest.mark.parametrize("cls", ["Qwen2Config", "Qwen3Config"])
def test_qwen_windows_read_and_write_as_transformers_assigns_them(tmp_path, cls, layer_types):
    """Layers from max_window_layers on slide: all of them is a window, none is none, some
    are refused in one line; a window written back slides every layer in transformers."""
    def window(max_window_layers: int) -> int | None:
        folder = qwen_folder(tmp_path, cls, max_window_layers, layer_types)
        return read_config(folder).config.sliding_window

    assert (window(0), window(2)) == (4, None)
    with pytest.raises(GptzooError, match="slide 1 of 2 layers, which is not supported"):
        window(1)
    config = read_config(qwen_folder(tmp_path, cls, 0, layer_types)).config
    written = write_config("llama", config, VOCAB)
    theirs = transformers.AutoConfig.for_model(**written)
    assert (type(theirs).__name__, theirs.sliding_window) == (cls, 4)
    assert theirs.layer_types == ["sliding_attention"] * 2


@pytest.mark.parametrize("fields, fragment", [
    ({"qk_norm": "projection"}, "qk_norm='projection' (OLMo 2's form)"),
    ({"sliding_window": 8, "use_bias": True}, "MistralForCausalLM, the class of this model's "
                                              "layout, holds biases none"),
    ({"qk_norm": "head", "qkv_bias": True}, "Qwen3ForCausalLM"),
])
def test_layouts_no_transformers_class_holds_are_refused_on_export(fields, fragment):
    config = LlamaConfig(n_layers=1, n_heads=2, d_model=16, block_size=32, **fields)
    with pytest.raises(ValueError) as error:
        write_config("llama", config, VOCAB)
    assert fragment in str(error.value), error.value


def test_a_recipes_window_and_qk_norm_export_as_their_classes():
    """A window alone is Mistral's layout, QK-norm per head Qwen3's, with or without a window."""
    written = {(w, n): write_config("llama", LlamaConfig(sliding_window=w, qk_norm=n), VOCAB)
               for w in (None, 8) for n in (None, "head")}
    assert {k: c["architectures"] for k, c in written.items()} == {
        (None, None): ["LlamaForCausalLM"], (8, None): ["MistralForCausalLM"],
        (None, "head"): ["Qwen3ForCausalLM"], (8, "head"): ["Qwen3ForCausalLM"]}
    assert written[8, None]["sliding_window"] == 8


TRIMMED = ("rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps", "sliding_window",
           "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
           "router_aux_loss_coef")
CLASSES = {"llama": {}, "mistral": {}, "qwen2": {"use_sliding_window": True,
                                                  "max_window_layers": 0},
           "qwen3": {"use_sliding_window": True, "max_window_layers": 0}, "mixtral": {}}


@pytest.mark.parametrize("model_type", CLASSES)
def test_keys_a_config_leaves_out_take_the_defaults_of_transformers_class(tmp_path, model_type):
    """A hand-written config.json without the keys that have class defaults: the import reads
    what transformers' class takes for each (Mixtral's rope_theta is 1e6, Mistral's window
    4096, Qwen3's head_dim 128), not LLaMA's."""
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    cfg = {"architectures": [config_class.__name__.replace("Config", "ForCausalLM")],
           "model_type": model_type, "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": VOCAB,
           **CLASSES[model_type]}
    assert not set(cfg) & set(TRIMMED)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs, ours = transformers.AutoConfig.from_pretrained(tmp_path), read_config(tmp_path).config
    layer_types = getattr(theirs, "layer_types", None) or ["sliding_attention"]  # Qwen's only
    window = (getattr(theirs, "sliding_window", None)
              if layer_types[0] == "sliding_attention" else None)
    assert (ours.rotary_base, ours.norm_eps, ours.sliding_window, ours.n_kv_heads) == (
        theirs.rope_parameters["rope_theta"], theirs.rms_norm_eps, window,
        theirs.num_key_value_heads)
    assert ours.resolved().head_dim == (getattr(theirs, "head_dim", None) or 64 // 4)
    if model_type == "mixtral":
        assert (ours.n_experts, ours.experts_per_token, ours.router_aux_loss_coef) == (
            theirs.num_local_experts, theirs.num_experts_per_tok, theirs.router_aux_loss_coef)


def test_a_config_missing_a_key_without_default_names_it(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "vocab_size": VOCAB}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptzooError, match=r"config.json lacks 'intermediate_size', which "
                                          r"LlamaForCausalLM needs"):
        read_config(tmp_path)
