"""GPT-2 small's recipe, `gptzoo tune-batch` and the MFU arithmetic."""

import json
import math
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY, gptzoo_cli, set_args

from gptzoo.recipe import load_recipe
from gptzoo.trainer import flops
from gptzoo.trainer.tune import Fit, _search, one_step_recipe, throughput

RECIPE = ROOT / "recipes" / "char_shakespeare.py"
GPT2_SMALL = ROOT / "recipes" / "gpt2_124m.py"
# GPT-2 small's shape cut down to seconds on a CPU; its optimizer, precision, remat, FSDP mesh and
# gradient accumulation are the recipe's own.
SHRUNK = {"model.n_layers": "2", "model.n_heads": "2", "model.d_model": "64",
          "model.block_size": "64", "model.vocab_size": "640", "data.vocab_size": "512",
          "trainer.batch_size": "8", "trainer.grad_accum_steps": "2", "trainer.max_steps": "2",
          "trainer.eval_interval": "2", "trainer.eval_steps": "1", "trainer.log_interval": "1",
          "trainer.checkpoint_interval": "2", "optimizer.warmup_steps": "1"}


def test_gpt2_small_recipe_takes_steps_on_cpu(tmp_path, small_text):
    run = tmp_path / "gpt2"
    result = gptzoo_cli("train", GPT2_SMALL, *set_args({**SHRUNK, "data.path": str(small_text)}),
                        "--run-dir", run)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    resolved = json.loads((run / "recipe.json").read_text())
    # What makes it GPT-2 small at full size, and kept when shrunk.
    assert resolved["trainer"]["precision"] == "bfloat16"
    assert resolved["mesh"]["fsdp"] == -1
    assert resolved["model"]["vocab_size"] % 128 == 0


def _memory_models():
    """Plans of `bytes(micro)` in MB, against a budget of 1,000: linear (as XLA's plans about
    are), with a large constant, convex, in steps, and one whose run fails below the plan's
    boundary."""
    yield "linear", lambda m: 40 + 6.5 * m, None
    yield "constant", lambda m: 900 + 0.3 * m, None
    yield "convex", lambda m: 10 + 0.05 * m * m, None
    yield "steps", lambda m: 100 * (m // 24 + 1), None
    yield "runs out", lambda m: 40 + 2 * m, 300  # the plan fits up to 480, the device to 299


@pytest.mark.parametrize("model", list(_memory_models()), ids=lambda model: model[0])
@pytest.mark.parametrize("shards, limit", [(1, 512), (4, 512), (4, 64), (8, 8)])
def test_search_finds_the_largest_fitting_multiple(model, shards, limit):
    _, plan, runs_up_to = model
    tried = []

    def trial(micro):
        tried.append(micro)
        needed = int(plan(micro) * 1e6)
        fits = needed <= 1e9 and (runs_up_to is None or micro < runs_up_to)
        return Fit(micro, needed, fits)

    fitting = [m for m in range(shards, limit + 1, shards) if trial(m).fits]
    tried.clear()
    # What a trial of every candidate finds, from the few trials that predictions choose.
    assert _search(trial, shards, limit, budget=10**9) == (max(fitting) if fitting else None)
    assert all(m % shards == 0 and m <= limit for m in tried)
    assert len(tried) == len(set(tried))
    if model[0] == "linear" and limit == 512:
        assert len(tried) <= 4  # 1 or 4, twice that, the predicted boundary and one past it
    candidates = limit // shards  # never worse than doubling and bisecting, plus one
    assert len(tried) <= 2 * math.ceil(math.log2(candidates)) + 2


def test_tune_batch_reports_a_fitting_micro_batch(tmp_path, small_text):
    # 2.3 MiB holds the tiny model's step for micro-batches up to about 13 of its 16.
    overrides = {**TINY, "trainer.batch_size": "16", "data.path": str(small_text)}
    result = gptzoo_cli("tune-batch", RECIPE, *set_args(overrides), "--memory-gb", "0.0022")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    tried = {int(line.split()[1].rstrip(":")): "does not fit" not in line
             for line in lines if line.startswith("micro-batch")}
    best = max(m for m, fits in tried.items() if fits)
    assert all(fits == (m <= best) for m, fits in tried.items())
    assert 1 < best < 16 and (best + 1) in tried  # searched down to the exact boundary
    assert f"largest micro-batch: {best} sequences" in result.stdout
    assert "tokens/s" in result.stdout


def test_throughput_times_whole_accumulated_steps(small_text):
    recipe = load_recipe(RECIPE, {**TINY, "data.path": str(small_text),
                                  "trainer.steps_per_call": "5"})
    stepped = one_step_recipe(recipe, 4, grad_accum_steps=2)
    cfg = stepped.trainer
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.steps_per_call) == (8, 2, 1)
    assert recipe.trainer.steps_per_call == 5  # the recipe given is left as it was
    tokens_per_sec, per_token = throughput(recipe, 4, steps=2, grad_accum_steps=2)
    assert tokens_per_sec > 0 and per_token > 0


def test_tune_batch_on_cpu_needs_a_budget(small_text):
    result = gptzoo_cli("tune-batch", RECIPE, *set_args({"data.path": str(small_text)}))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: cpu devices report no memory limit; give tune-batch one with --memory-gb")


def test_flops_per_token_matches_nanogpt_for_gpt2_small():
    # nanoGPT's estimate_mfu: 6N + 12 L H Q T with N = 124M (non-embedding: wpe excluded).
    n, layers, heads, head_dim, context = 123_653_376, 12, 12, 64, 1024
    assert flops.flops_per_token(n, layers, heads * head_dim, context) == (
        6 * n + 12 * layers * heads * head_dim * context)
    # An A100 running nanoGPT's 0.5M-token batch in 1 s per step would be at...
    per_token = flops.flops_per_token(n, layers, 768, context)
    assert flops.mfu(524_288, per_token, 312e12, 1) == pytest.approx(524_288 * per_token / 312e12)


def test_peak_flops_table_matches_device_kinds():
    def device(kind):
        return SimpleNamespace(device_kind=kind)

    assert flops.known_peak_flops(device("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.known_peak_flops(device("NVIDIA H100 PCIe")) == 756e12
    assert flops.known_peak_flops(device("TPU v5 lite")) == 197e12
    assert flops.known_peak_flops(device("cpu")) is None
