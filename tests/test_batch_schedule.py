"""The batch-size schedule (`trainer.batch_schedule`): the loader's sample stream does not depend
on the schedule, the batch changes at the listed steps, and a run resumes bit-exactly whether it
was interrupted before or after a change."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest
from conftest import RECIPE, TINY, SigintAt
from test_loader import split  # noqa: F401  (the fixture)

import gptzoo
from gptzoo.data import Batches, BatchSchedule
from gptzoo.errors import GptzooError


def test_scheduled_batches_read_the_same_stream_of_samples(split):  # noqa: F811
    """Steps take consecutive samples of one seeded stream: 3 batches of 4, 2 of 8 and 2 of 4
    read exactly the samples of 9 constant batches of 4, across an epoch boundary too."""
    schedule = BatchSchedule.of(4, [(0, 4), (3, 8), (5, 4)])
    assert [schedule.offset(s) for s in range(8)] == [0, 4, 8, 12, 20, 28, 32, 36]
    scheduled = Batches(split, schedule, 32, seed=5)
    constant = Batches(split, 4, 32, seed=5)
    chunks = [scheduled.chunk(0, 3), scheduled.chunk(3, 2), scheduled.chunk(5, 2)]
    assert [c.shape[1] for c in chunks] == [4, 8, 4]
    np.testing.assert_array_equal(np.concatenate([c.reshape(-1, 33) for c in chunks]),
                                  constant.chunk(0, 9).reshape(-1, 33))
    late = Batches(split, BatchSchedule.of(4, [(0, 4), (3, 8), (5, 64)]), 32, seed=5)
    np.testing.assert_array_equal(late.chunk(40, 1).reshape(-1, 33),  # from 28 + 35 * 64 = 567 * 4
                                  constant.chunk(567, 16).reshape(-1, 33))
    with pytest.raises(ValueError, match="span the batch size change at step 3"):
        scheduled.chunk(2, 2)


def test_a_bad_schedule_is_one_line_naming_the_key():
    for bad in ("[[1,8]]", "[[0,8],[0,16]]", "[[0,8],[5,0]]", "[[0,8],[5]]"):
        with pytest.raises(GptzooError, match=r"trainer.batch_schedule=.*steps increasing"):
            gptzoo.load_recipe(RECIPE, {"trainer.batch_schedule": bad})
    with pytest.raises(GptzooError, match=r"trainer.batch_schedule must be list or NoneType, got "
                                          r"'\[\(0,8\)'; e.g. --set"):
        gptzoo.load_recipe(RECIPE, {"trainer.batch_schedule": "[(0,8)"})
    with pytest.raises(GptzooError, match="batch 6 is not divisible by trainer.grad_accum_steps"):
        gptzoo.load_recipe(RECIPE, {"trainer.batch_schedule": "[[0,8],[5,6]]",
                                    "trainer.grad_accum_steps": "4"})


def test_a_schedule_is_json_or_python_as_the_recipe_file_writes_it():
    for written in ("[[0, 8], [12, 16]]", "[(0, 8), (12, 16)]"):
        recipe = gptzoo.load_recipe(RECIPE, {"trainer.batch_schedule": written})
        assert recipe.trainer.batch_schedule == [[0, 8], [12, 16]]


def test_the_batch_changes_at_the_listed_step_and_resumes_exactly_across_it(tmp_path,
                                                                            small_text):
    """Batch 8 until step 12 (no event there: the chunk plan must cut at it), 16 after; runs
    stopped by Ctrl-C once step 5 is logged (saving step 10, before the change) and once step 15
    is logged (saving step 20, after it) resume into the uninterrupted run's losses and weights,
    bit for bit."""
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "trainer.max_steps": "25",
                                         "trainer.batch_schedule": "[[0, 8], [12, 16]]",
                                         "trainer.grad_accum_steps": "2",
                                         "data.path": str(small_text)})

    def records(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def weights(run_dir):
        return jax.tree.leaves(eqx.filter(gptzoo.load(run_dir)[0], eqx.is_array))

    gptzoo.train(recipe, run_dir=tmp_path / "whole")
    whole = records(tmp_path / "whole")
    assert [(r["step"], r["batch_size"]) for r in whole] == [(5, 8), (10, 8), (15, 16), (20, 16),
                                                          (25, 16)]
    for logged, saved in ((5, 10), (15, 20)):
        run_dir = tmp_path / f"stopped_at_{saved}"
        stopped = gptzoo.train(recipe, run_dir=run_dir, reporter=SigintAt(logged, 1, 25, 0))
        assert stopped.interrupted and stopped.step == saved
        gptzoo.train(recipe, run_dir=run_dir, resume=True)
        resumed = records(run_dir)
        assert ([(r["step"], r["train_loss"], r.get("val_loss")) for r in resumed]
                == [(r["step"], r["train_loss"], r.get("val_loss")) for r in whole])
        for a, b in zip(weights(run_dir), weights(tmp_path / "whole"), strict=True):
            np.testing.assert_array_equal(a, b)
