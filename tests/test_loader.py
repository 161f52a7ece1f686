"""The batch loader and streamed evaluation: batches are a pure function of (seed, step), a
process can read only its rows, the prefetch thread delivers the plan in order, and evaluating
a memory-mapped split a batch at a time equals a direct per-window computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE, TINY

import gptzoo
from gptzoo.data import Batches, Prefetcher, prepare_corpus, shards
from gptzoo.recipe import DataConfig


@pytest.fixture
def split(tmp_path, monkeypatch):
    """A bytes-tokenised split of 3,000 tokens over shards of 700, so windows cross shards."""
    monkeypatch.setattr(shards, "SHARD_TOKENS", 700)
    rng = np.random.default_rng(0)
    (tmp_path / "t.txt").write_bytes(bytes(rng.integers(32, 127, size=3334).tolist()))
    cfg = DataConfig(path=str(tmp_path / "t.txt"), tokenizer="bytes",
                     cache_dir=str(tmp_path / "c"))
    corpus = prepare_corpus(cfg, log=lambda _: None)
    assert len(corpus.train) == 3000 and len(corpus.train.maps) == 5
    return corpus.train


def test_batches_are_a_pure_function_of_seed_and_step(split):
    a, b = Batches(split, 8, 32, seed=1), Batches(split, 8, 32, seed=1)
    chunk = a.chunk(5, 4)
    assert chunk.shape == (4, 8, 33) and chunk.dtype == np.int32
    b.chunk(100, 3)  # another position first: no hidden state carries over
    np.testing.assert_array_equal(b.chunk(5, 4), chunk)
    np.testing.assert_array_equal(np.stack([a.chunk(s, 1)[0] for s in range(5, 9)]), chunk)
    assert not np.array_equal(Batches(split, 8, 32, seed=2).chunk(5, 4), chunk)
    flat = split[0:len(split)]
    starts = a.starts(7)
    np.testing.assert_array_equal(chunk[2], flat[starts[:, None] + np.arange(33)])


def test_a_process_reads_only_its_rows_of_the_global_batch(split):
    batches = Batches(split, 8, 32, seed=3)
    whole = batches.chunk(11, 2)
    np.testing.assert_array_equal(batches.chunk(11, 2, rows=range(4, 8)), whole[:, 4:])


def test_each_epoch_is_a_shifted_permutation_of_the_windows(split):
    batches = Batches(split, 4, 32, seed=0)
    n = batches.n_windows
    assert n == (3000 - 32) // 32 == 4 * 23  # an epoch is 23 whole batches
    per_epoch = [np.concatenate([batches.starts(s) for s in range(k * 23, (k + 1) * 23)])
                 for k in range(2)]
    for starts in per_epoch:
        offset = starts.min() % 32
        assert sorted(starts) == list(offset + 32 * np.arange(n))
    assert not np.array_equal(per_epoch[0], per_epoch[1])


def test_prefetcher_delivers_the_plan_in_order_and_passes_errors_on(split):
    batches = Batches(split, 8, 32, seed=0)
    plan = [(0, 3), (3, 2), (5, 5)]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loader = Prefetcher(batches, plan, sharding)
    seen = [(step, n, np.asarray(x)) for step, n, x in loader]
    loader.close()
    assert [(s, n) for s, n, _ in seen] == plan
    for step, n, x in seen:
        np.testing.assert_array_equal(x, batches.chunk(step, n))
    stopped = Prefetcher(batches, [(s, 1) for s in range(100)], sharding, depth=1)
    next(iter(stopped))
    stopped.close()  # mid-plan: the thread ends
    assert not stopped.thread.is_alive()
    broken = Prefetcher(batches, [(0, 1), (1, -1)], sharding)
    with pytest.raises(ValueError):
        list(broken)
    broken.close()


def reference_loss(model, tokens: np.ndarray, block_size: int) -> float:
    """Mean next-token loss over non-overlapping windows, one window at a time."""
    total, count = 0.0, 0
    for first in range(0, len(tokens) - 1, block_size):
        window = tokens[first:first + block_size]
        inputs = np.zeros(block_size, np.int32)
        inputs[:len(window)] = window  # a causal model ignores what follows
        log_probs = jax.nn.log_softmax(np.asarray(model(jnp.asarray(inputs)[None])[0]), axis=-1)
        for j in range(min(block_size, len(tokens) - 1 - first)):
            total -= float(log_probs[j, tokens[first + j + 1]])
            count += 1
    return total / count


def test_streamed_evaluation_equals_a_direct_computation(split):
    recipe = gptzoo.load_recipe(RECIPE, TINY)
    model = recipe.build(256, key=jax.random.PRNGKey(0))
    val = split  # 3,000 tokens in five shards
    expected = reference_loss(model, val[0:len(val)], 32)
    streamed = gptzoo.evaluate(model, val, 32, batch_size=7, bytes_per_token=1.0)
    assert streamed.n_tokens == len(val) - 1
    assert streamed.loss == pytest.approx(expected, rel=1e-5)
    assert streamed.bits_per_byte == streamed.bits_per_token
    in_memory = gptzoo.evaluate(model, val[0:len(val)], 32)  # one padded batch of 64
    assert in_memory.loss == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_count_utf8_bytes(tmp_path):
    text = "naïve café " * 200  # 11 characters, 13 bytes
    (tmp_path / "t.txt").write_text(text)
    corpus = prepare_corpus(DataConfig(path=str(tmp_path / "t.txt"),
                                       cache_dir=str(tmp_path / "c")), log=lambda _: None)
    assert corpus.val.bytes_per_token == pytest.approx(13 / 11, rel=0.01)
    result = gptzoo.trainer.EvalResult(loss=1.0, n_tokens=10,
                                       bytes_per_token=corpus.val.bytes_per_token)
    assert result.bits_per_byte == pytest.approx(result.bits_per_token * 11 / 13, rel=0.01)


def _resident_kb(path) -> int:
    """This process's resident kB of its mappings of `path` (/proc/self/smaps)."""
    total, current = 0, None
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:
            current = line.split()[-1]
        elif line.startswith("Rss:") and current == str(path):
            total += int(line.split()[1])
    return total


def test_random_windows_do_not_stay_resident(tmp_path):
    """Reading windows at random places keeps only what is in use mapped: without releasing the
    pages read, the kernel's fault-around kept ~64 kB per window resident, and a long run over
    a big corpus grew by the gigabytes it had sampled."""
    shard = tmp_path / "train_00000.bin"
    np.arange(4 << 20, dtype=np.uint16).tofile(shard)  # 8 MB, in the page cache once written
    split = shards.TokenSplit(tmp_path, {"shards": [{"file": shard.name}], "bytes": 8 << 20},
                                     "uint16", "train", str(tmp_path))
    starts = np.random.default_rng(0).integers(0, len(split) - 65, size=(100, 8))
    for rows in starts:
        windows = split.windows(rows, 65)
        np.testing.assert_array_equal(windows[:, 0], rows.astype(np.uint16))
    assert _resident_kb(shard) < 256
