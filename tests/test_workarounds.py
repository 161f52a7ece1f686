"""Each workaround of `gptzoo.workarounds` is still needed: every test here checks the dependency
behaviour it works around, and fails once the dependency changes, naming the workaround that can
then go. Each also checks that the workaround itself does what it says."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental import serialize_executable

from gptzoo import workarounds
from gptzoo.trainer.checkpoint import Checkpoints

# A process that loads JAX, runs a program and ends, printing the moment its last atexit handler
# starts: from then on, Python tears down its modules and objects (what `gptzoo` skips).
_ENDING = """
import atexit, time

atexit.register(lambda: print(repr(time.time()), flush=True))  # first registered, last run
import jax, jax.numpy as jnp
jax.jit(lambda a: a @ a)(jnp.ones((64, 64))).block_until_ready()
"""


# Timed, so not in CI's suite (a loaded machine read 0.13 s once): `nox -s slow` runs it.
@pytest.mark.slow
def test_python_teardown_with_jax_loaded_outlasts_an_immediate_exit():
    """`os._exit` ends such a process within a few hundredths of a second; once Python's own
    teardown is about as quick, `exit_without_teardown` can go."""
    process = subprocess.Popen([sys.executable, "-c", _ENDING], stdout=subprocess.PIPE, text=True)
    teardown_started = float(process.stdout.read())  # returns once the process has ended
    teardown = time.time() - teardown_started
    assert process.wait() == 0
    assert teardown > 0.15, (
        f"Python's teardown took {teardown:.3f} s: drop workarounds.exit_without_teardown")


# Asks for `import torch` are recorded and refused (a real torch would take seconds to load).
_TENSORBOARDX = """
import sys

class RefuseTorch:
    asked = False

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            RefuseTorch.asked = True
            raise ImportError("torch refused by the test")
        return None

sys.meta_path.insert(0, RefuseTorch())
from tensorboardX import SummaryWriter
print(RefuseTorch.asked)
"""


def test_tensorboardx_still_imports_torch_with_its_writer():
    """Once tensorboardX's writer loads without asking for torch, `torch_hidden` can go."""
    asked = subprocess.run([sys.executable, "-c", _TENSORBOARDX], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert asked == "True", "tensorboardX no longer imports torch: drop workarounds.torch_hidden"


_HIDDEN = """
import sys
from gptzoo.workarounds import torch_hidden

with torch_hidden():
    try:
        import torch
        print("imported")
    except ImportError:
        print("refused")
print("torch" in sys.modules)
"""


def test_torch_hidden_refuses_torch_and_then_forgets_it():
    out = subprocess.run([sys.executable, "-c", _HIDDEN], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["refused", "False"]


def saved_files(tmp_path, handler) -> set[str]:
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, handler))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    checkpointer.save(tmp_path / "saved", args=ocp.args.PyTreeSave({"w": jnp.ones(3)}))
    return {p.name for p in (tmp_path / "saved").rglob("*")}


def test_orbax_still_writes_a_sharding_file_by_default(tmp_path):
    """Once orbax's default array handler writes no `_sharding` file, the override can go."""
    assert "_sharding" in saved_files(tmp_path / "default", ocp.type_handlers.ArrayHandler()), (
        "orbax writes no _sharding file: drop workarounds.orbax_arrays_without_sharding_file")
    checkpoints = Checkpoints(tmp_path / "run")  # gptzoo's, with the override registered
    checkpoints.save(1, {"w": jnp.ones(3)}, {"m": jnp.zeros(2)}, {})
    checkpoints.close()
    files = {p.name for p in (tmp_path / "run").rglob("*")}
    assert "_METADATA" in files and "_sharding" not in files


def test_jax_distributed_still_has_no_public_cluster_detection():
    """Once `jax.distributed` offers more than these, one may say which cluster `initialize()`
    would detect: `detected_cluster` could then stop reading the private `jax._src.clusters`."""
    public = {name for name in dir(jax.distributed) if not name.startswith("_")}
    assert public == {"initialize", "is_initialized", "shutdown"}, (
        f"jax.distributed now has {sorted(public)}: see whether one replaces "
        "workarounds.detected_cluster")
    assert workarounds.detected_cluster() is None  # a test machine is no cluster


def run_serialized(compiled, x) -> float:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    return float(serialize_executable.deserialize_and_load(payload, in_tree, out_tree)(x))


def test_a_program_read_from_the_persistent_cache_serializes_without_its_kernels():
    """The test session's persistent cache is on (conftest): a program compiled twice is read
    back from it the second time, and its serialized form fails to run. Once it runs,
    `compile_past_persistent_cache` can go. Compiled past the cache, it runs."""
    assert jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache

    def program(a):
        return jnp.tanh(a @ a).sum()

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
    expected = float(np.tanh(np.asarray(x, np.float64) @ np.asarray(x, np.float64)).sum())
    jax.jit(program).lower(x).compile()  # into the persistent cache
    jax.clear_caches()
    from_cache = jax.jit(program).lower(x).compile()
    try:
        run_serialized(from_cache, x)
    except Exception as e:  # noqa: BLE001 - XLA's runtime error, whatever its class
        assert "not found" in str(e), e
    else:
        raise AssertionError("a program read from JAX's persistent cache now serializes whole: "
                             "drop workarounds.compile_past_persistent_cache")
    jax.clear_caches()  # or the lowering compiles to the executable held in memory
    afresh = workarounds.compile_past_persistent_cache(jax.jit(program).lower(x))
    assert run_serialized(afresh, x) == pytest.approx(expected, rel=1e-5)
    assert jax.config.jax_enable_compilation_cache  # restored


def _cache_step(cache, q, new, position, ordered: bool):
    """A decode step's shape: read the whole cache, then write one row of it in place."""
    read = jnp.einsum("d,sd->s", q, cache)
    if ordered:
        (new,) = workarounds.read_before_write(read, new)
    return jax.lax.dynamic_update_slice(cache, new[None], (position, 0)), read


def _cache_copies(ordered: bool) -> int:
    step = jax.jit(lambda *a: _cache_step(*a, ordered=ordered), donate_argnums=0)
    text = step.lower(jnp.zeros((4096, 64)), jnp.ones(64), jnp.ones(64), 3).compile().as_text()
    return sum(" copy(" in line and "f32[4096,64]" in line for line in text.splitlines())


def test_xla_cpu_still_copies_a_cache_updated_without_the_read_first():
    assert _cache_copies(ordered=False) > 0, (
        "XLA:CPU now orders a read before an in-place write by itself: "
        "workarounds.read_before_write can go")
    assert _cache_copies(ordered=True) == 0


def test_read_before_write_keeps_values_whatever_the_dependency():
    values = (jnp.arange(3.0), jnp.arange(3, dtype=jnp.int32))
    for dependency in (jnp.array([2.0]), jnp.array([jnp.nan]), jnp.array([-jnp.inf])):
        for got, want in zip(workarounds.read_before_write(dependency, *values), values,
                             strict=True):
            np.testing.assert_array_equal(got, want)


def test_one_non_finite_token_stays_in_its_own_cache_slot():
    """A NaN in one decoded token's input poisons its own keys and values, never the positions
    or the other tokens' slots: later tokens still read a well-formed cache."""
    from gptzoo.nn import CausalSelfAttention

    attention = CausalSelfAttention(16, 2, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16)).at[1].set(jnp.nan)
    _, cache = attention.decode(x, jnp.arange(3), attention.init_cache(8))
    np.testing.assert_array_equal(cache.positions, [0, 1, 2, -1, -1, -1, -1, -1])
    finite_k = np.isfinite(np.asarray(cache.k)).all(axis=(0, 2))  # per slot
    np.testing.assert_array_equal(finite_k, [True, False, True] + [True] * 5)


# JAX's persistent compilation cache after a process killed while writing it

_COMPILE = """
import sys, jax, jax.numpy as jnp
from gptzoo.compile_cache import enable_compilation_cache
enable_compilation_cache()
jax.jit(lambda a: a * float(sys.argv[1]))(jnp.ones(3)).block_until_ready()
"""


def test_jax_cache_still_stops_writing_once_an_entry_lost_its_access_time(tmp_path):
    """JAX's own writes: with a size limit, an entry without its access time (a kill between
    the two files) makes every later write raise; and an entry that exists is never written
    again, so one cut short stays cut short. Once both are gone,
    `workarounds.whole_compilation_cache_entries` can go."""
    from jax._src.lru_cache import LRUCache

    put = getattr(LRUCache.put, "__wrapped__", LRUCache.put)  # JAX's, patched or not
    limited = LRUCache(str(tmp_path / "limited"), max_size=2**20)
    put(limited, "a", b"whole")
    (tmp_path / "limited" / "a-atime").unlink()
    with pytest.raises(FileNotFoundError):
        put(limited, "b", b"whole")
    unlimited = LRUCache(str(tmp_path / "unlimited"), max_size=-1)
    put(unlimited, "c", b"cut sh")
    put(unlimited, "c", b"cut short")  # as after the entry cut short could not be read
    assert unlimited.get("c") == b"cut sh"


def test_the_compile_cache_mends_what_a_killed_command_left(tmp_path):
    """Commands after one killed mid-write, each a process with gptzoo's compile cache: an entry
    left without its access time does not stop the next command's writes, and an entry cut short
    is read (with JAX's warning) and compiled again once, then written whole for the next."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["GPTZOO_COMPILE_CACHE"] = str(tmp_path)  # gptzoo's own folder, with its size limit

    def stderr_of_a_command(factor: int) -> str:
        return subprocess.run([sys.executable, "-c", _COMPILE, str(factor)], env=env, text=True,
                              capture_output=True, check=True).stderr

    def entries() -> set:
        return set((tmp_path / "jax").glob("jit__lambda-*-cache"))

    stderr_of_a_command(2)
    (first,) = entries()
    first.with_name(first.name.replace("-cache", "-atime")).unlink()  # killed between its files
    assert "persistent compilation cache" not in stderr_of_a_command(3)
    (second,) = entries() - {first}
    second.write_bytes(second.read_bytes()[:100])  # killed while writing it
    assert "Error reading persistent compilation cache" in stderr_of_a_command(3)
    assert "persistent compilation cache" not in stderr_of_a_command(3)
    assert len(second.read_bytes()) > 100


def test_a_cache_entry_cut_short_while_written_is_never_read(tmp_path, monkeypatch):
    """Killed while its bytes are written, an entry is not there for the next read (JAX's own
    write would leave what it wrote, under the entry's name)."""
    from jax._src.lru_cache import LRUCache

    workarounds.whole_compilation_cache_entries()
    cache = LRUCache(str(tmp_path), max_size=2**20)
    synced, flushed = [], os.fsync

    def killed_at_the_entry(descriptor):  # its access time is written first, then the entry
        synced.append(descriptor)
        if len(synced) == 2:
            raise KeyboardInterrupt
        flushed(descriptor)

    monkeypatch.setattr(os, "fsync", killed_at_the_entry)
    with pytest.raises(KeyboardInterrupt):
        cache.put("program", b"compiled program")
    monkeypatch.undo()
    assert cache.get("program") is None
    cache.put("program", b"compiled program")
    assert cache.get("program") == b"compiled program"


def _rows_sampled_wrongly(n_rows: int) -> int:
    """Rows of a two-step decode loop whose token differs from float64 NumPy's, when each step
    applies a `(256, 32)` head to its row as the rowwise layout does: a multiply-reduce, vmapped."""
    rng = np.random.default_rng(0)
    head = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
    x0 = jnp.asarray(rng.normal(size=(n_rows, 32)), jnp.float32)
    noise = jnp.asarray(rng.gumbel(size=(n_rows, 2, 256)), jnp.float32)

    @jax.jit
    def decode(x, noise):
        def step(i, carry):
            x, out = carry
            token = jnp.argmax(jax.vmap(lambda row: jnp.sum(head * row, -1))(x) + noise[:, i], -1)
            return x * 0.5 + head[token] * 0.1, out.at[:, i].set(token)
        return jax.lax.fori_loop(0, 2, step, (x, jnp.zeros((n_rows, 2), jnp.int32)))[1]

    x, want = np.asarray(x0, np.float64), np.zeros((n_rows, 2), int)
    for i in range(2):
        want[:, i] = np.argmax(x @ np.asarray(head, np.float64).T + np.asarray(noise)[:, i], -1)
        x = x * 0.5 + np.asarray(head, np.float64)[want[:, i]] * 0.1
    return int((np.asarray(decode(x0, noise)) != want).any(1).sum())


def test_ynnpack_still_miscomputes_a_vmapped_multiply_reduce_past_128_rows():
    assert _rows_sampled_wrongly(workarounds.ROWWISE_MAX_ROWS) == 0
    assert _rows_sampled_wrongly(256) > 0, (
        "XLA:CPU now computes the vmapped multiply-reduce of 256 rows right: "
        "workarounds.rowwise_batch_computes_right can go")
