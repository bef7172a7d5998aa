"""The sampler benchmark (benchmarks/sample.py): its options and per-preset defaults, the batch it reports the KV
cache of, and the trajectory comparison that must count every difference between cache and recompute."""

import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the benchmarks package lives beside src/, not inside it
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import sample as bench  # noqa: E402
from nextvisit.predict.sample import History, Trajectory  # noqa: E402
from nextvisit.tokenize.store import Subject  # noqa: E402


def test_defaults_per_preset_and_options_that_override_them():
    args = bench.parse_args([])
    assert args.presets == ["tiny", "small"] and args.grid == [1, 4, 16, 64] and args.device == "cpu"
    tiny, small = bench.plan_for("tiny", args), bench.plan_for("small", args)
    assert (tiny.histories, tiny.samples, small.histories, small.max_visits) == (16, 4, 4, 8)
    args = bench.parse_args(["--presets", "small", "--histories", "3", "--max-visits", "5", "--grid", "2,8"])
    small = bench.plan_for("small", args)
    assert (small.histories, small.max_visits, small.samples, args.grid) == (3, 5, 2, [2, 8])
    # the pretraining overrides: the preset plan's own, the loss, and the decay ending at the last step
    config = bench.pretrain_yaml(small, "bce")
    assert config["loss"] == {"kind": "bce"} and config["train"]["decay_steps"] == small.pretrain_steps
    assert config["model"] == {"output_bias": True}
    assert "loss" not in bench.PRESET_DEFAULTS["small"].pretrain  # the defaults are not modified


@pytest.mark.parametrize("argv", [["--presets", "paper"], ["--grid", "1,x"], ["--grid", "0"], ["--repeats", "0"],
                                  ["--histories", "0"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_batch_rows_follow_the_sampler_batching():
    assert bench.batch_rows(16, 1, 256) == 16  # all histories in one batch
    assert bench.batch_rows(16, 64, 256) == 256  # 4 histories of 64 samples
    assert bench.batch_rows(1, 64, 16) == 16  # one history split into batches of 16


def _trajectory(sample, days, visits, end="horizon"):
    subject = Subject(subject_id=0, birth_day=0, visit_days=np.array([100], np.int32),
                      visit_offsets=np.array([0, 2], np.int64), tokens=np.array([7, 8], np.int32))
    history = History(subject, 5, datetime(2020, 1, 1), [730])
    t = Trajectory(history, sample, np.random.default_rng(0))
    t.days, t.visits, t.end = list(days), [np.asarray(v, np.int64) for v in visits], end
    return t


def test_differences_count_every_trajectory_that_is_not_identical():
    reference = [_trajectory(0, [200, 300], [[1, 9], [1, 10]]), _trajectory(1, [210], [[1, 9]]),
                 _trajectory(2, [220], [[1, 9]]), _trajectory(3, [230], [[1, 9]], end="death")]
    other = [_trajectory(0, [200, 300], [[1, 9], [1, 10]]),  # identical
             _trajectory(1, [211], [[1, 9]]),  # another day
             _trajectory(2, [220], [[1, 9, 11]]),  # another code
             _trajectory(3, [230], [[1, 9]], end="horizon")]  # another end
    count, first = bench.differences(reference, other)
    assert count == 3
    assert first.startswith("subject 5") and "sample 1" in first and "visit 1: day 210" in first
    assert bench.differences(reference, reference) == (0, None)
    assert bench.differences(reference, other[:1])[0] == 3  # missing trajectories count as differences
