"""Crashes survived: the real command line killed with SIGKILL (``kill -9``) in the middle of its work.

- pretrain killed after a checkpoint, while writing one, or before its first resumes with ``--resume`` to the
  same metrics.csv rows, digit for digit, and the same final weights, bit for bit, as a run never interrupted;
- tokenize, label, forecast and evaluate killed mid-work leave nothing at ``--out`` but, beside it, their lock
  and staging siblings, which the rerun with the same ``--out`` removes; an ``--overwrite`` killed while it
  publishes leaves the old folder or none, never a mix;
- two runs on one ``--out`` (or run folder) at once: the second is refused with one line naming the folder and
  the first's PID, and the folder ends as the first one writes it.

Each kill is sent by this test to a subprocess (``kill_when``), or, where a moment is too short to hit from
outside (between two renames), by the subprocess to itself through a wrapper that patches the one call it waits
for (``KILL_SELF``); the product code has no test hooks.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextvisit.artifacts.folders import LOCK, PARTIAL, REPLACED
from nextvisit.cli import main as cli_main
from nextvisit.config import RunConfig
from nextvisit.data.simulate.dataset import simulate
from nextvisit.tasks import load_task, make_labels, write_labels
from nextvisit.tokenize.dataset import tokenize_dataset
from nextvisit.train.trainer import train
from test_train import make_store, tiny_config

TIMEOUT_S = 60  # a subprocess that has not reached the awaited moment by then has hung
# the columns of metrics.csv that depend on the wall clock, not on the computation
TIMING_COLUMNS = {"tokens_per_s", "elapsed_s"}
CURVE = dict(max_steps=32, checkpoint_every=8, eval_every=16, log_every=1)


def command(*argv) -> list[str]:
    return [sys.executable, "-m", "nextvisit.cli", *map(str, argv)]


# A wrapper around the command line that SIGKILLs its own process at one chosen moment: argv[1] names it,
# the rest is the command line. `between-renames-of:NAME` kills just after the first of two renames of an
# atomic replacement that moves the old folder aside to NAME (a checkpoint, an --overwrite); `before-publish` once
# a stage's staging folder is complete; `checkpoint-half-written` after the weights of the first checkpoint.
KILL_SELF = r"""
import os, signal, sys
from pathlib import Path

moment, argv = sys.argv[1], sys.argv[2:]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if moment.startswith("between-renames-of:"):
    aside = moment.split(":", 1)[1]  # the name the old folder is renamed to
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        if aside in Path(dst).name:
            die()

    os.replace = replace
elif moment == "before-publish":
    import nextvisit.artifacts.folders as folders
    folders.publish = lambda staging, out: die()
elif moment == "checkpoint-half-written":
    import torch
    torch.save = lambda *args, **kwargs: die()  # the first checkpoint: its weights written, its optimizer state not
from nextvisit.cli import main
sys.exit(main(argv))
"""


def killing_itself(moment: str, *argv) -> list[str]:
    return [sys.executable, "-c", KILL_SELF, moment, *map(str, argv)]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """A subprocess with one thread per library, its output in ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", POLARS_MAX_THREADS="1")
    with open(log, "w") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)


def finished(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{process.args[:6]} hung; its output:\n{log.read_text()[-2000:]}") from None


def kill_when(process: subprocess.Popen, log: Path, ready) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it ends first (then the kill missed its work)."""
    wait_until(ready, process, log)
    process.send_signal(signal.SIGKILL)
    assert finished(process, log) == -signal.SIGKILL, log.read_text()[-2000:]


def wait_until(ready, process: subprocess.Popen, log: Path, poll_s: float = 0.002) -> None:
    """Return once ``ready()`` holds; fail if ``process`` ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before the awaited moment:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"never reached the awaited moment:\n{log.read_text()[-2000:]}")
        time.sleep(poll_s)


def locked_by(out: Path, pid: int) -> bool:
    """Whether ``pid`` holds the lock of ``out`` (the stage is between its ``check_out`` and its publish)."""
    try:
        return (out.parent / f".{out.name}{LOCK}").read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def siblings(out: Path) -> list[str]:
    """The hidden entries beside ``out`` that belong to it (lock, staging, replaced)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def metrics_rows(run: Path) -> list[dict]:
    """metrics.csv's complete rows (a row being written when read is left out)."""
    try:
        with open(run / "metrics.csv", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        return []
    return [dict(zip(rows[0], r)) for r in rows[1:] if len(r) == len(rows[0])]


def checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    except (FileNotFoundError, ValueError):  # none yet, or one being renamed into place
        return 0


def curve(run: Path) -> list[dict]:
    """metrics.csv without the wall-clock columns."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in metrics_rows(run)]


# -- pretrain ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "store")


@pytest.fixture(scope="module")
def pretrain_yaml(store) -> Path:
    path = store.parent / "pretrain.yaml"
    tiny_config(**CURVE).save(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(store, pretrain_yaml) -> Path:
    """The run never interrupted (the command line in this process)."""
    run = store.parent / "uninterrupted"
    assert cli_main(["pretrain", str(store), "--out", str(run), "--config", str(pretrain_yaml), "--device", "cpu"]) == 0
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    """Every metrics.csv row the same to the last printed digit (all but the wall-clock columns), and the final
    weights bit for bit."""
    got, expected = curve(run), curve(reference)
    assert [int(r["step"]) for r in got if r["loss"]] == list(range(1, CURVE["max_steps"] + 1))
    assert got == expected
    final, reference_final = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(final[name], reference_final[name]) for name in reference_final)


def test_pretrain_killed_after_a_checkpoint_resumes_to_the_same_loss_curve(store, pretrain_yaml, uninterrupted,
                                                                           tmp_path, capsys):
    """Killed two steps or more past a checkpoint, ``--resume`` recomputes those steps and ends where the run
    never interrupted ends. While the run works, a second one on its folder (new or resumed) is refused."""
    run = tmp_path / "run"
    log = tmp_path / "pretrain.log"
    process = start(command("pretrain", store, "--out", run, "--config", pretrain_yaml, "--device", "cpu"), log)
    wait_until(lambda: locked_by(run, process.pid), process, log)
    process.send_signal(signal.SIGSTOP)  # holds the lock while the other runs start
    try:
        other = tmp_path / "other.yaml"
        tiny_config(max_steps=3).save(other)
        for argv in (["--config", str(other)], ["--resume"]):
            assert cli_main(["pretrain", str(store), "--out", str(run), *argv, "--device", "cpu"]) == 2
            assert capsys.readouterr().err.strip().splitlines() == [
                f"nextvisit pretrain: error: {run}: PID {process.pid} is writing this folder now (lock "
                f"{tmp_path / '.run.lock'}); wait for it to finish or stop it, or choose another --out"]
    finally:
        process.send_signal(signal.SIGCONT)

    def two_steps_past_a_checkpoint():
        saved = checkpoint_step(run)
        return saved > 0 and any(int(r["step"]) > saved + 1 for r in metrics_rows(run) if r["loss"])

    kill_when(process, log, two_steps_past_a_checkpoint)
    saved = checkpoint_step(run)
    logged = max(int(r["step"]) for r in metrics_rows(run))
    assert 0 < saved <= logged < CURVE["max_steps"]  # killed mid-run (seen above with rows past its checkpoint)
    assert locked_by(run, process.pid)  # the dead run's lock, taken over by the resumed run

    assert cli_main(["pretrain", str(store), "--out", str(run), "--resume", "--device", "cpu"]) == 0
    assert_same_run(run, uninterrupted)  # the first run's folder, continued: nothing of the refused ones
    assert siblings(run) == []


def test_pretrain_on_a_full_disk_stops_with_one_line_and_resumes_once_there_is_room(store, pretrain_yaml,
                                                                                    uninterrupted, tmp_path, capsys):
    """The run's disk fills while its first checkpoint is written: one error line naming the run, the step and
    --resume, the half-written checkpoint removed (it would hold space); given room, --resume ends where the run
    never interrupted ends."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root")
    disk, size = tmp_path / "disk", 64 * 1024
    disk.mkdir()
    checkpoint_bytes = sum(p.stat().st_size for p in (uninterrupted / "checkpoint").iterdir())
    assert checkpoint_bytes > size  # the folder's first files fit, its checkpoint cannot
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        run = disk / "run"
        assert cli_main(["pretrain", str(store), "--out", str(run), "--config", str(pretrain_yaml),
                         "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"nextvisit pretrain: error: {run}: no space left on the device while writing the run at step "
            f"{CURVE['checkpoint_every']}; free some space there and continue it with --resume (the run keeps its "
            "last complete checkpoint)")
        assert not any(p.name.startswith("checkpoint") for p in run.iterdir())
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert cli_main(["pretrain", str(store), "--out", str(run), "--resume", "--device", "cpu"]) == 0
        assert_same_run(run, uninterrupted)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("moment", ["between-renames-of:checkpoint.old", "checkpoint-half-written"])
def test_pretrain_killed_while_writing_a_checkpoint_resumes_from_a_complete_one(store, pretrain_yaml, uninterrupted,
                                                                                tmp_path, moment):
    """Killed between the two renames of the second checkpoint's save (on disk: step 8's ``checkpoint.old/`` and
    step 16's finished ``checkpoint.tmp/``): resume takes step 8's. Killed while the first one's files are written
    (only a ``checkpoint.tmp/`` without its optimizer state): resume starts again from step 0."""
    run = tmp_path / "run"
    log = tmp_path / "pretrain.log"
    process = start(killing_itself(moment, "pretrain", store, "--out", run, "--config", pretrain_yaml,
                                   "--device", "cpu"), log)
    assert finished(process, log) == -signal.SIGKILL, log.read_text()[-2000:]
    between = moment.startswith("between")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == \
        (["checkpoint.old", "checkpoint.tmp"] if between else ["checkpoint.tmp"])
    assert max(int(r["step"]) for r in metrics_rows(run)) == (16 if between else 8)

    train(store, run, RunConfig(), resume=True, progress=False)
    assert_same_run(run, uninterrupted)


# -- stages that publish a folder ---------------------------------------------------------------------------


def simulated_data(root: Path) -> tuple[Path, Path, Path]:
    """(MEDS, token store, dementia labels) of 400 simulated subjects under ``root`` (large enough that tokenizing
    them takes a fraction of a second)."""
    meds, store, labels = root / "meds", root / "store", root / "labels"
    simulate(400, meds, seed=0, workers=1, progress=False)
    tokenize_dataset(meds, store, workers=1, progress=False)
    task = load_task("dementia")
    write_labels(labels, make_labels(meds, task), task)
    return meds, store, labels


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A simulated MEDS dataset, its token store, dementia labels (``simulated_data``), a briefly trained run and
    its forecast."""
    root = tmp_path_factory.mktemp("world")
    meds, store, labels = simulated_data(root)
    run = root / "run"
    train(store, run, tiny_config(max_steps=2, eval_every=1000, eval_contexts=0), progress=False)
    predictions = root / "predictions"
    assert cli_main(["forecast", str(run), str(meds), str(labels), "--out", str(predictions), "--device", "cpu"]) == 0
    return {"meds": meds, "store": store, "labels": labels, "run": run, "predictions": predictions}


# per stage: its command line given --out, the files a finished --out holds, and whether the kill waits for its
# staging folder (a stage whose staging lasts long enough to be hit from outside) or only for its lock
STAGES = {
    "tokenize": (lambda w: ["tokenize", w["meds"], "--workers", "1"],
                 {"manifest.json", "store.json", "vocab.json", "train", "tuning", "held_out"}, True),
    "label": (lambda w: ["label", w["meds"], "dementia"], {"labels.parquet", "task.yaml", "counts.json"}, False),
    "forecast": (lambda w: ["forecast", w["run"], w["meds"], w["labels"], "--device", "cpu"],
                 {"predictions.parquet", "info.json"}, False),
    "evaluate": (lambda w: ["evaluate", w["predictions"], "--bootstrap", "20"],
                 {"metrics.json", "report.html", "summary_auroc.png"}, True),
}


@pytest.mark.parametrize("verb", list(STAGES))
def test_stage_killed_mid_work_leaves_nothing_at_out_and_reruns(world, tmp_path, capsys, verb):
    argv, files, wait_for_staging = STAGES[verb]
    out = tmp_path / "out"
    log = tmp_path / f"{verb}.log"
    process = start(command(*argv(world), "--out", out), log)
    staging = tmp_path / f".out{PARTIAL}{process.pid}"

    def mid_work():
        if not locked_by(out, process.pid):
            return False
        return not wait_for_staging or (staging.is_dir() and any(staging.iterdir()))

    kill_when(process, log, mid_work)
    assert not out.exists()
    assert set(siblings(out)) <= {".out.lock", staging.name}
    assert ".out.lock" in siblings(out) and (not wait_for_staging or staging.name in siblings(out))
    left_staging = staging.exists()

    capsys.readouterr()
    assert cli_main([*map(str, argv(world)), "--out", str(out)]) == 0  # the rerun takes the dead run's lock over
    assert (f"removed {staging}, left by an interrupted run" in capsys.readouterr().err) == left_staging
    assert files <= {p.name for p in out.iterdir()}
    assert siblings(out) == []  # the dead run's staging folder removed, the lock released


@pytest.mark.parametrize("moment", ["before-publish", f"between-renames-of:{REPLACED}"])
def test_overwrite_killed_while_publishing_leaves_the_old_folder_or_none(world, tmp_path, moment):
    """``label --overwrite`` over an existing labels folder (of another task), killed with its new folder
    complete: before the first rename the old folder is intact; between the two it is absent (moved aside)."""
    out = tmp_path / "labels"
    shutil.copytree(world["labels"], out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    log = tmp_path / "label.log"
    process = start(killing_itself(moment, "label", world["meds"], "knee_oa", "--out", out, "--overwrite"), log)
    assert finished(process, log) == -signal.SIGKILL, log.read_text()[-2000:]
    if moment == "before-publish":
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    else:
        assert not out.exists()
        assert {p.name: p.read_bytes() for p in (tmp_path / f".labels{REPLACED}{process.pid}").iterdir()} == old
    assert f".labels{PARTIAL}{process.pid}" in siblings(out)

    assert cli_main(["label", str(world["meds"]), "knee_oa", "--out", str(out), "--overwrite"]) == 0
    assert load_task(out / "task.yaml").name == "knee_oa"
    assert siblings(out) == []


def test_two_runs_on_one_out_the_second_is_refused(world, tmp_path):
    """Two `label` runs on one --out (of different tasks, to tell their folders apart): the one that takes the
    lock first writes the folder; the other exits 2 with one line naming the folder and the first's PID."""
    out = tmp_path / "labels"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(command("label", world["meds"], "dementia", "--out", out), first_log)
    wait_until(lambda: locked_by(out, first.pid), first, first_log)
    first.send_signal(signal.SIGSTOP)  # holds the lock while the second run starts
    try:
        second = start(command("label", world["meds"], "knee_oa", "--out", out), second_log)
        assert finished(second, second_log) == 2
    finally:
        first.send_signal(signal.SIGCONT)
    assert finished(first, first_log) == 0, first_log.read_text()[-2000:]
    assert second_log.read_text().strip().splitlines() == [
        f"nextvisit label: error: {out}: PID {first.pid} is writing this folder now (lock "
        f"{tmp_path / '.labels.lock'}); wait for it to finish or stop it, or choose another --out"]
    assert load_task(out / "task.yaml").name == "dementia"
    assert siblings(out) == []
