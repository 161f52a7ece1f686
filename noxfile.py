"""Sessions: tests and dist (what CI runs), lint, slow (full trainings), lmeval (lm-eval through
gptzoo serve), bench, docs."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# The test extra needs torch only to build reference models on the CPU. Pinned to the release whose
# CPU wheel the CI machines keep in pip's find-links folder (/opt/wheels): an unpinned `torch`
# resolves to PyPI's newest, a CUDA build of several GB.
TEST = (".[test]", "torch==2.13.0")
# CPU only; W&B never online, whatever credentials the machine holds (its sink logs to files).
TEST_ENV = {"JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline"}


@nox.session
def tests(session):
    # One worker per core, a test file per worker: XLA compiles the suite's many small programs
    # on one thread each, so two files run side by side nearly double the pace on two cores.
    session.install("-e", *TEST)
    session.run("pytest", "-q", "-n", "auto", "--dist", "loadfile", *session.posargs, env=TEST_ENV)


@nox.session
def dist(session):
    """Multi-device and multi-process tests (a few minutes): meshes of fake CPU devices against
    one device, two-process training."""
    session.install("-e", *TEST)
    session.run("pytest", "-q", "-m", "dist", *session.posargs, env=TEST_ENV)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "gptzoo", "recipes", "tests", "bench", "noxfile.py")


@nox.session
def slow(session):
    """The full default recipe, with its validation-loss bar (about 10 minutes on 2 cores), and
    the kill test: 20 SIGKILLs of a training run, then --resume (a few minutes)."""
    session.install("-e", *TEST)
    session.run("pytest", "-q", "-m", "slow", "-s", *session.posargs, env=TEST_ENV)


@nox.session
def bench(session):
    session.install("-e", *TEST)  # torch: nanoGPT's side of the training and sampling comparisons
    env = {"JAX_PLATFORMS": "cpu"}
    session.run("python", "bench/bench_train.py", *session.posargs, env=env)
    session.run("python", "bench/bench_vs_nanogpt.py", *session.posargs, env=env)
    session.run("python", "bench/bench_head_chunk.py", env=env)
    session.run("python", "bench/bench_sample.py", *session.posargs, env=env)
    session.run("python", "bench/bench_serve.py", *session.posargs, env=env)
    session.run("python", "bench/bench_loader.py", *session.posargs, env=env)
    session.run("python", "bench/bench_loop.py", *session.posargs, env=env)
    session.run("python", "bench/bench_compile.py", *session.posargs, env=env)
    session.run("python", "bench/bench_mfu.py", *session.posargs, env=env)
    session.run("python", "bench/bench_lora.py", *session.posargs, env=env)
    session.run("python", "bench/bench_moe.py", *(a for a in session.posargs if a == "--quick"),
                env=env)
    session.run("python", "bench/bench_window.py", *session.posargs, env=env)
    # Generates a 2 GB corpus (once, under the temp dir) and prepares and trains on it.
    session.run("python", "bench/bench_scale.py", *session.posargs, env=env)


@nox.session
def lmeval(session):
    """lm-eval's local-completions model scoring a small local task through gptzoo serve (a
    minute or so); lm-eval and its datasets stack are heavy, so only this session installs them."""
    session.install("-e", *TEST, "lm-eval[api]>=0.4.13")
    session.run("pytest", "-q", "-m", "lmeval", *session.posargs,
                env={"JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})


@nox.session
def docs(session):
    """The documentation site, into site/; strict, so any warning fails the build; then the
    rendered-math check."""
    # ruff formats the rendered signatures (mkdocstrings skips that without ruff or black).
    session.install("-e", ".", "mkdocs-material", "mkdocstrings[python]", "ruff")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
    # The formulas render offline: math in KaTeX's containers, no raw TeX, nothing from a CDN.
    session.run("python", "docs/check_site.py", "site")
