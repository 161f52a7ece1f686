"""GPT-2 small's recipe, `gptzoo tune-batch` and the MFU arithmetic."""

import json
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY, gptzoo_cli, set_args

from gptzoo.trainer import flops
from gptzoo.trainer.tune import _bisect

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


@pytest.mark.parametrize("limit, largest", [(64, 24), (20, 20), (8, 8)])
def test_bisection_finds_the_largest_fitting_multiple(limit, largest):
    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= 25  # what "fits in memory" looks like from outside: monotone

    # Multiples of 4 (the batch shards) up to the limit: the largest of them that fits 25.
    assert _bisect(fits, shards=4, limit=limit) == largest
    assert all(m % 4 == 0 for m in tried)
    assert _bisect(lambda m: False, shards=4, limit=limit) is None


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
    assert 1 < best < 16 and (best + 1) in tried  # bisected down to the exact boundary
    assert f"largest micro-batch: {best} sequences" in result.stdout
    assert "tokens/s" in result.stdout


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
