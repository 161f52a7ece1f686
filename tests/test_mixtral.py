"""Mixtral against transformers' `MixtralForCausalLM`: a small random model (weights moved away
from their init, a decisive router) saved in both layouts (transformers 5's `save_pretrained`
writes the older per-expert one; the fused one is its `state_dict`) imports to the same model,
with transformers' logits, greedy generation (`gptzoo sample`), load-balancing loss and training
loss; export -> `from_pretrained` gives the same logits; import -> export -> import is
bit-identical; the trainer logs `aux_loss`; and (`-m dist`) a mesh with `expert` and `tensor`
axes trains the losses of one device."""

import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import EIGHT_DEVICES, ROOT, TINY_ONE_EVAL, gptzoo_cli, gptzoo_in_process, set_args
from hf_models import TOLERANCE, VOCAB, hf_logits, make_tokenizer, max_diff, perturb, random_tokens
from safetensors import safe_open
from safetensors.torch import save_file

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.hf import export_hf, import_hf, read_config, write_config
from gptzoo.models import AuxLossModel, CachedDecoder, MixtralConfig
from gptzoo.models.names import named_leaves
from gptzoo.trainer import load
from gptzoo.trainer.sharding import make_mesh
from gptzoo.trainer.step import make_train_chunk

RECIPE = ROOT / "recipes" / "mixtral_shakespeare.py"
CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
              max_position_embeddings=128, router_aux_loss_coef=0.02, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LAYOUTS = ("per_expert", "fused")


def make_mixtral(root):
    """The transformers model, saved in `root/per_expert` and `root/fused` with a tokenizer."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None, **CONFIG)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(model)
    with torch.no_grad():  # experts chosen by clear margins, and used unevenly
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10)
    model.save_pretrained(root / "per_expert")
    (root / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              root / "fused" / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(root / "per_expert" / "config.json", root / "fused" / "config.json")
    for layout in LAYOUTS:
        make_tokenizer().save(str(root / layout / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(transformers model, root): `root/LAYOUT` the HF folders, `root/LAYOUT_run` their
    imports."""
    root = tmp_path_factory.mktemp("mixtral")
    hf = make_mixtral(root)
    for layout in LAYOUTS:
        import_hf(root / layout, root / f"{layout}_run")
    return hf, root


def tensor_names(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", "np") as f:
        return set(f.keys())


def test_both_layouts_import_the_same_model(mixtral):
    _, root = mixtral
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in tensor_names(
        root / "per_expert")
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensor_names(root / "fused")
    per_expert, fused = (named_leaves(load(root / f"{layout}_run")[0]) for layout in LAYOUTS)
    assert per_expert.keys() == fused.keys()
    for name in per_expert:
        np.testing.assert_array_equal(per_expert[name], fused[name], name)


def test_imported_logits_match_transformers(mixtral):
    hf, root = mixtral
    model, _ = load(root / "fused_run")
    assert isinstance(model, AuxLossModel) and isinstance(model, CachedDecoder)
    assert model.cacheable
    diff = max_diff(model, hf, random_tokens(0, (4, 48)))
    print(f"mixtral: max |logit difference| {diff:.2e}")
    assert diff <= TOLERANCE


def test_greedy_generation_through_gptzoo_sample_matches_transformers(mixtral):
    """Two prompts of different lengths in one batch, each continued by 48 tokens through the
    KV cache, against transformers' `generate` of each, as text."""
    hf, root = mixtral
    _, tokenizer = load(root / "fused_run")
    prompts, new = ["ROMEO:", "To be, or not to be"], 48
    expected = []
    for prompt in prompts:
        ids = torch.tensor(tokenizer.encode(prompt))[None]
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        expected.append(prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    args = [a for p in prompts for a in ("--prompt", p)]
    result = gptzoo_in_process("sample", "--ckpt", root / "fused_run", *args,
                               "--max-new-tokens", new, "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n---------------\n".join(expected) + "\n"


def test_export_loads_in_transformers_with_the_same_logits(mixtral, tmp_path):
    hf, root = mixtral
    export_hf(root / "per_expert_run", tmp_path / "out")
    names = tensor_names(tmp_path / "out")
    assert "model.layers.0.mlp.experts.down_proj" in names  # the fused layout
    assert not any("block_sparse_moe" in n for n in names)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    assert reloaded.config.router_aux_loss_coef == 0.02
    tokens = random_tokens(3)
    diff = np.abs(hf_logits(reloaded, tokens) - hf_logits(hf, tokens)).max()
    print(f"mixtral: export -> from_pretrained, max |logit difference| {diff:.1e}")
    assert diff <= 1e-5


def test_import_export_import_is_bit_identical(mixtral, tmp_path):
    _, root = mixtral
    export_hf(root / "fused_run", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    first, second = (named_leaves(load(r)[0]) for r in (root / "fused_run", tmp_path / "run"))
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], name)
    assert json.loads((root / "fused_run" / "recipe.json").read_text())["model"] == json.loads(
        (tmp_path / "run" / "recipe.json").read_text())["model"]


def test_aux_loss_and_a_training_steps_loss_equal_transformers(mixtral):
    """The load-balancing loss of a batch, and the loss the trainer's step reports for it:
    transformers' `loss` with `labels` (cross-entropy plus 0.02 times `aux_loss`). The step reads
    `batch[:, :-1]` and predicts `batch[:, 1:]`; transformers, given the whole batch as labels,
    shifts them itself, and the last position, masked out, leaves its routing statistics."""
    hf, root = mixtral
    model, _ = load(root / "fused_run")
    batch = random_tokens(5, (4, 33)) % 8  # few distinct tokens: the experts used unevenly
    mask = torch.ones(batch.shape, dtype=torch.long)
    mask[:, -1] = 0
    with torch.no_grad():
        whole = hf(torch.tensor(batch), output_router_logits=True)
        step = hf(torch.tensor(batch), attention_mask=mask, labels=torch.tensor(batch),
                  output_router_logits=True)
    _, aux = model.logits_and_aux(jnp.asarray(batch))
    assert abs(whole.aux_loss.item() - 2.0) > 0.05  # routed unevenly: not the balanced top_k
    np.testing.assert_allclose(aux, whole.aux_loss.item(), rtol=0, atol=1e-5)
    optimizer = optax.sgd(0.0)
    mesh = make_mesh(gptzoo.load_recipe(RECIPE, {"trainer.batch_size": "4"}).mesh)
    chunk = make_train_chunk(optimizer, mesh)
    _, _, stats = chunk((jnp.asarray(batch)[None], jax.random.PRNGKey(0), jnp.int32(0)),
                        model, optimizer.init(eqx.filter(model, eqx.is_array)))
    print(f"mixtral: aux_loss {whole.aux_loss.item():.4f}, |difference| "
          f"{abs(float(aux) - whole.aux_loss.item()):.1e}; a step's: aux_loss "
          f"{abs(float(stats.aux_loss[0]) - step.aux_loss.item()):.1e}, loss "
          f"{abs(float(stats.loss[0]) - step.loss.item()):.1e}")
    np.testing.assert_allclose(stats.aux_loss[0], step.aux_loss.item(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stats.loss[0], step.loss.item(), rtol=0, atol=1e-5)


def test_training_logs_the_aux_loss(tmp_path, small_text):
    overrides = {**TINY_ONE_EVAL, "model.n_heads": "4", "model.n_kv_heads": "2",
                 "model.d_hidden": "32", "trainer.max_steps": "10", "trainer.eval_interval": "10",
                 "trainer.checkpoint_interval": "10", "data.path": str(small_text)}
    gptzoo.train(gptzoo.load_recipe(RECIPE, overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [5, 10]
    assert all(1.0 < r["aux_loss"] < 4.0 for r in records), records  # between k and E


def test_unsupported_settings_fail_with_one_line(tmp_path):
    config = {"architectures": ["MixtralForCausalLM"], "vocab_size": VOCAB, **CONFIG,
              "sliding_window": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptzooError, match=r"sliding_window=16 is not supported; gptzoo "
                                          r"supports null"):
        read_config(tmp_path)
    with pytest.raises(ValueError, match="MixtralForCausalLM has no biases"):
        write_config("mixtral", MixtralConfig(n_layers=1, d_model=32, use_bias=True), VOCAB)
    for field in ({"sliding_window": 8}, {"qk_norm": "head"}):  # which transformers would drop
        with pytest.raises(ValueError, match="holds neither a sliding window nor QK-norm"):
            write_config("mixtral", MixtralConfig(n_layers=1, d_model=32, **field), VOCAB)


# --- eight CPU devices against one (nox -s dist) ---

DIST_RUN = {**TINY_ONE_EVAL, "model.n_layers": "2", "model.n_heads": "4", "model.n_kv_heads": "2",
            "model.d_hidden": "32", "model.scan_layers": "true", "trainer.max_steps": "6",
            "trainer.log_interval": "1", "trainer.eval_interval": "6",
            "trainer.checkpoint_interval": "6", "trainer.steps_per_call": "3"}


@pytest.mark.dist
def test_a_mesh_with_expert_and_tensor_axes_trains_the_losses_of_one_device(tmp_path,
                                                                            small_text):
    run = {**DIST_RUN, "data.path": str(small_text)}
    mesh = {"mesh.data": "2", "mesh.expert": "2", "mesh.tensor": "2"}
    gptzoo_cli("train", RECIPE, *set_args(run), "--run-dir", tmp_path / "one", check=True)
    gptzoo_cli("train", RECIPE, *set_args({**run, **mesh}), "--run-dir", tmp_path / "eight",
               env=EIGHT_DEVICES, check=True)
    one, eight = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").open()]
                  for r in ("one", "eight"))
    assert [r["step"] for r in eight] == list(range(1, 7))
    for key in ("train_loss", "aux_loss"):
        np.testing.assert_allclose([r[key] for r in eight], [r[key] for r in one], rtol=1e-5,
                                   err_msg=key)
