"""Compiled programs kept on disk (`gptzoo.stored_jit`): a later process runs them without
tracing, gets what compiling would have given, and never reuses one for other code, other static
values or other shapes; a bad or unwritable store only costs a compilation."""

import importlib
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EIGHT_DEVICES

from gptzoo.models import gpt2
from gptzoo.sample import decode_chunk, generate_tokens, prefill
from gptzoo.sample.programs import merge_rows
from gptzoo.stored_jit import StoredJit, store_programs_in, stored_jit


@pytest.fixture
def store(tmp_path):
    """A fresh folder of stored programs for the test, and no store afterwards."""
    store_programs_in(tmp_path / "programs")
    yield tmp_path / "programs"
    store_programs_in(None)


def scaled(x, factor: float):
    return {"y": x * factor, "factor": factor}


def later_process(fn, **kwargs) -> StoredJit:
    """`fn` as a later process would first see it: nothing compiled in memory."""
    return StoredJit(fn, **kwargs)


def test_a_stored_program_runs_in_a_later_process_without_compiling(store):
    x = jnp.arange(4.0)
    first = later_process(scaled)
    assert first(x, 3.0)["factor"] == 3.0 and first.n_compiled == 1
    again = later_process(scaled)
    out = again(x, 3.0)
    assert (again.n_compiled, again.n_loaded) == (0, 1)
    np.testing.assert_array_equal(out["y"], [0.0, 3.0, 6.0, 9.0])
    assert out["factor"] == 3.0  # the output's static leaves come back as traced


def test_other_static_values_shapes_or_donation_are_compiled_not_loaded(store):
    later_process(scaled)(jnp.arange(4.0), 3.0)
    for args, kwargs in [((jnp.arange(4.0), 2.0), {}), ((jnp.arange(5.0), 3.0), {}),
                         ((jnp.arange(4, dtype=jnp.int32), 3.0), {}),
                         ((jnp.arange(4.0), 3.0), {"donate": "all-except-first"})]:
        f = later_process(scaled, **kwargs)
        out = f(*args)
        assert (f.n_compiled, f.n_loaded) == (1, 0), (args, kwargs)
        np.testing.assert_array_equal(out["y"], args[0] * args[1])


def test_a_changed_source_file_is_compiled_not_loaded(store, tmp_path, monkeypatch):
    module = tmp_path / "user_activation.py"
    monkeypatch.syspath_prepend(tmp_path)

    def run_with(body: str, mtime_ns: int) -> tuple[StoredJit, jax.Array]:
        module.write_text(f"def act(x):\n    return {body}\n")
        os.utime(module, ns=(mtime_ns, mtime_ns))
        sys.modules.pop("user_activation", None)
        act = importlib.import_module("user_activation").act
        f = later_process(lambda x: act(x))
        return f, f(jnp.arange(3.0))

    f, out = run_with("x + 1", 10**18)
    assert f.n_compiled == 1
    f, out = run_with("x + 1", 10**18)
    assert f.n_loaded == 1
    f, out = run_with("x + 2", 2 * 10**18)  # what a user's module imported by a recipe might be
    assert (f.n_compiled, f.n_loaded) == (1, 0)
    np.testing.assert_array_equal(out, [2.0, 3.0, 4.0])


def test_a_program_in_jax_persistent_cache_is_still_stored_runnable(store):
    """An executable JAX reads back from its own cache serializes without its kernels; the
    store compiles afresh, so the program it keeps runs in a later process."""
    x = jnp.arange(6.0).reshape(2, 3)

    def softmax_rows(x):  # a fused program: a kernel that must travel with the executable
        return jax.nn.softmax(x * 2.0, axis=-1)

    store_programs_in(None)
    later_process(softmax_rows)(x)  # now in JAX's persistent cache
    store_programs_in(store)
    later_process(softmax_rows)(x)
    again = later_process(softmax_rows)
    np.testing.assert_allclose(again(x), jax.nn.softmax(x * 2.0, axis=-1), rtol=1e-6)
    assert again.n_loaded == 1


def test_a_corrupt_stored_program_is_compiled_again(store, caplog):
    later_process(scaled)(jnp.arange(4.0), 3.0)
    (path,) = store.glob("*.program")
    path.write_bytes(b"half a program")
    f = later_process(scaled)
    with caplog.at_level(logging.WARNING, logger="gptzoo.stored_jit"):
        np.testing.assert_array_equal(f(jnp.arange(4.0), 3.0)["y"], [0.0, 3.0, 6.0, 9.0])
    assert f.n_compiled == 1 and "ignoring stored program" in caplog.text
    assert later_process(scaled)(jnp.arange(4.0), 3.0)["factor"] == 3.0  # stored again
    assert path.read_bytes() != b"half a program"


def test_the_store_keeps_its_most_recently_used_programs(store, monkeypatch):
    stored = []
    for n in range(1, 5):  # four programs, last used at 4000, 1000, 3000, 2000 s
        later_process(scaled)(jnp.arange(float(n)), 3.0)
        (new,) = set(store.glob("*.program")) - set(stored)
        stored.append(new)
    for path, used in zip(stored, [4000, 1000, 3000, 2000], strict=True):
        os.utime(path, (used, used))
    monkeypatch.setattr("gptzoo.stored_jit._ON_DISK", 3)
    later_process(scaled)(jnp.arange(2.0), 3.0)  # the one used at 1000 s is used again
    later_process(scaled)(jnp.arange(5.0), 3.0)  # a fifth: those used at 2000 and 3000 s go
    assert {p for p in stored if p.exists()} == {stored[0], stored[1]}
    assert len(list(store.glob("*.program"))) == 3


def test_an_unwritable_store_only_warns(tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    store_programs_in(tmp_path / "file" / "programs")
    try:
        with caplog.at_level(logging.WARNING, logger="gptzoo.stored_jit"):
            out = later_process(scaled)(jnp.arange(4.0), 3.0)
    finally:
        store_programs_in(None)
    np.testing.assert_array_equal(out["y"], [0.0, 3.0, 6.0, 9.0])
    assert "could not store" in caplog.text


def test_the_sampler_loads_every_program_of_a_second_generation(store):
    model = gpt2(29, n_layers=1, n_heads=2, d_model=16, block_size=16, key=jax.random.PRNGKey(0))
    prompt = [np.array([1, 2, 3], np.int32)]
    programs = prefill, decode_chunk, merge_rows

    def generate() -> np.ndarray:
        return np.concatenate(list(generate_tokens(model, prompt, max_new_tokens=30,
                                                           seeds=[5])), axis=1)

    def counts() -> np.ndarray:  # (compiled, loaded) per program, over the whole session
        return np.array([(f.n_compiled, f.n_loaded) for f in programs])

    before = counts()
    first = generate()  # past the window: a prefill and decode chunks (shifts reuse the prefill)
    compiled = counts() - before
    assert compiled[:2, 0].tolist() == [1, 1] and not compiled[:, 1].any()
    for f in programs:
        f._programs.clear()  # as in a later process
    np.testing.assert_array_equal(generate(), first)
    np.testing.assert_array_equal(counts() - before, compiled + compiled[:, ::-1])


# Run twice in a process with eight devices, a program's arrays on the fourth.
_ON_DEVICE_3 = """
import sys, jax, jax.numpy as jnp
from gptzoo.stored_jit import StoredJit, store_programs_in
store_programs_in(sys.argv[1])
f = StoredJit(lambda x: x * 2)
y = f(jax.device_put(jnp.arange(3.0), jax.devices()[3]))
print(f.n_compiled, f.n_loaded, y.devices() == {jax.devices()[3]}, y.tolist())
"""


def test_a_program_is_stored_for_its_device_on_a_host_with_several(tmp_path):
    def run() -> str:
        return subprocess.run([sys.executable, "-c", _ON_DEVICE_3, str(tmp_path)], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, **EIGHT_DEVICES, "JAX_PLATFORMS": "cpu"}).stdout
    assert run().split() == ["1", "0", "True", "[0.0,", "2.0,", "4.0]"]
    assert run().split() == ["0", "1", "True", "[0.0,", "2.0,", "4.0]"]


def test_decorator_forms(store):
    @stored_jit(donate="all-except-first")
    def add(model, x):
        return x + model

    assert isinstance(add, StoredJit) and add.donate == "all-except-first"
    np.testing.assert_array_equal(add(jnp.ones(2), jnp.ones(2)), [2.0, 2.0])
    with pytest.raises(ValueError, match="donate='some'"):
        stored_jit(scaled, donate="some")
