"""A catalogue of bad inputs: every way we know a user can hand the command line something wrong, one row of
``CASES`` each, and what the command must answer.

A row names the verb, what is wrong, how the test builds the bad input (a small edit of one shared world: a
simulated MEDS dataset of 200 subjects, its token store, a tiny pretrained run and the dementia labels), and
the one-line message expected. For a row whose ``outcome`` is ``refused`` the test asserts: exit status 2,
stderr of exactly one line as a terminal shows it (no traceback, no warning, no progress bar left standing: a
bar the command wiped with a carriage return is no line), that line matching the row's ``message`` (which
names the file, column, subject, row or field) and holding its ``todo`` (what to do), and the output folder
absent or unchanged (and no staging folder left beside it). A ``counted`` row is input the commands accept on
purpose and account for (the tokenizer counts the events it could not use, by reason): the test asserts exit
0 and the printed count line naming the reason and the exact number of bad rows.

``message`` is a template: ``{tmp}`` is the case's own folder, ``{base}`` the shared world, other ``{names}``
are facts the build step returns (a row number, a subject id), and ``…`` stands for any text (an exception's
own words). docs/errors.md is generated from this table (``python -m tests.test_bad_inputs --write-docs``) and
``test_docs_match_the_table`` fails when it differs.

Most rows run ``nextvisit.cli.main`` in this process (fast; the exit status is ``main``'s return value or
argparse's ``SystemExit``, and a warning raised during the run counts as a line of stderr, as a user would see
it); rows with ``subprocess=True`` run ``python -m nextvisit.cli`` for the real process exit status and stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess as sp
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "errors.md"

# The tiny pretrained run (tests/test_train.py's tiny_config, as a YAML for `nextvisit pretrain --config`).
TINY_RUN_YAML = """\
model: {d_model: 32, n_layers: 2, n_heads: 2}
data: {context: 64}
train: {batch_contexts: 8, micro_batch: 4, warmup_steps: 1, eval_every: 1000, eval_contexts: 8,
        checkpoint_every: 1000, log_every: 1, precision: fp32, threads: 1}
"""


# -- the shared world and running the command line ------------------------------------------------------------

@dataclass
class World:
    """The shared inputs every bad one is made from (never changed by a case: each edits a copy)."""

    root: Path

    @property
    def meds(self) -> Path:  # `nextvisit simulate --subjects 200`
        return self.root / "meds"

    @property
    def store(self) -> Path:  # `nextvisit tokenize`
        return self.root / "store"

    @property
    def run(self) -> Path:  # `nextvisit pretrain`, the tiny config, 2 steps
        return self.root / "run"

    @property
    def labels(self) -> Path:  # `nextvisit label MEDS dementia`
        return self.root / "labels"


@dataclass
class Result:
    code: int
    stdout: str
    stderr_lines: list[str]  # the non-blank lines stderr leaves on a terminal, then the warnings a user would see


def run_in_process(argv: list[str]) -> Result:
    from nextvisit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filters, not pytest's: what a user's run would print
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    lines = _lines(err.getvalue()) + [f"{w.category.__name__}: {w.message}" for w in caught]
    return Result(int(code or 0), out.getvalue(), lines)


def run_subprocess(argv: list[str]) -> Result:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    # bytes, decoded here: text mode would turn a progress bar's carriage returns into new lines
    done = sp.run([sys.executable, "-m", "nextvisit.cli", *argv], capture_output=True, env=env, timeout=120)
    return Result(done.returncode, done.stdout.decode(errors="replace"), _lines(done.stderr.decode(errors="replace")))


def _lines(text: str) -> list[str]:
    """The lines ``text`` leaves on a terminal: a carriage return goes back to the line's start and what follows
    overwrites it (a progress bar wiped with blanks leaves nothing); blank lines left out.

    >>> _lines("bar 0%\\rbar 100%\\r        \\rerror: x\\n")
    ['error: x']
    """
    lines = []
    for line in text.split("\n"):
        screen: list[str] = []
        for part in line.split("\r"):
            screen[: len(part)] = part
        if "".join(screen).strip():
            lines.append("".join(screen).rstrip())
    return lines


def _ok(argv: list[str]) -> None:
    result = run_in_process(argv)
    assert result.code == 0, (argv, result.stderr_lines[-5:])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    (root / "tiny.yaml").write_text(TINY_RUN_YAML)
    _ok(["simulate", "--subjects", "200", "--out", str(root / "meds"), "--workers", "1"])
    _ok(["tokenize", str(root / "meds"), "--out", str(root / "store"), "--workers", "1"])
    _ok(["pretrain", str(root / "store"), "--out", str(root / "run"), "--config", str(root / "tiny.yaml"),
         "--max-steps", "2", "--device", "cpu"])
    _ok(["label", str(root / "meds"), "dementia", "--out", str(root / "labels")])
    return World(root)


@dataclass
class Context:
    """What a build step gets: the shared world, the case's own empty folder, and a way to undo (a mount)."""

    world: World
    tmp: Path
    cleanups: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # values for the message template's {names}

    def defer(self, undo: Callable[[], None]) -> None:
        self.cleanups.append(undo)


# -- edits: copies of the world's artifacts, changed a little --------------------------------------------------

def meds(ctx: Context, edit=None, splits=None) -> str:
    """A copy of the world's MEDS dataset at tmp/meds; ``edit`` changes its one shard, ``splits`` its splits."""
    folder = ctx.tmp / "meds"
    shutil.copytree(ctx.world.meds, folder)
    if edit is not None:
        edit(pl.read_parquet(folder / "data" / "0.parquet")).write_parquet(folder / "data" / "0.parquet")
    if splits is not None:
        path = folder / "metadata" / "subject_splits.parquet"
        splits(pl.read_parquet(path)).write_parquet(path)
    return str(folder)


def labels(ctx: Context, edit) -> str:
    """A copy of the world's labels at tmp/labels with ``edit`` applied to labels.parquet."""
    folder = ctx.tmp / "labels"
    shutil.copytree(ctx.world.labels, folder)
    edit(pl.read_parquet(folder / "labels.parquet")).write_parquet(folder / "labels.parquet")
    return str(folder)


def copy(ctx: Context, name: str) -> Path:
    shutil.copytree(getattr(ctx.world, name), ctx.tmp / name)
    return ctx.tmp / name


def task_file(ctx: Context, text: str) -> str:
    return write(ctx.tmp / "task.yaml", text)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def without(folder: str, name: str) -> str:
    """``folder`` after removing its file ``name``."""
    (Path(folder) / name).unlink()
    return folder


def at_rows(frame: pl.DataFrame, rows: list[int], column: str, value) -> pl.DataFrame:
    """``frame`` with ``column`` set to ``value`` at the given 0-based rows."""
    hit = pl.int_range(pl.len()).is_in(rows)
    return frame.with_columns(pl.when(hit).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))


def first_row(frame: pl.DataFrame, condition: pl.Expr) -> int:
    return int(frame.with_row_index().filter(condition)["index"][0])


def forecast(ctx: Context, labels_dir=None, meds_dir=None, run=None, *options: str) -> list[str]:
    w = ctx.world
    return ["forecast", str(run or w.run), str(meds_dir or w.meds), str(labels_dir or w.labels),
            "--out", str(ctx.tmp / "out"), "--device", "cpu", *options]


def tokenize(ctx: Context, meds_dir, *options: str) -> list[str]:
    return ["tokenize", str(meds_dir), "--out", str(ctx.tmp / "out"), "--workers", "1", *options]


def label(ctx: Context, task: str, meds_dir=None, *options: str) -> list[str]:
    return ["label", str(meds_dir or ctx.world.meds), task, "--out", str(ctx.tmp / "out"), *options]


def pretrain(ctx: Context, store, *options: str) -> list[str]:
    return ["pretrain", str(store), "--out", str(ctx.tmp / "out"), "--device", "cpu", "--max-steps", "1",
            "--config", str(ctx.world.root / "tiny.yaml"), *options]


# -- MEDS edits -------------------------------------------------------------------------------------------------

def unsorted_subjects(ctx: Context) -> list[str]:
    def edit(frame):
        first = frame.filter(pl.col("subject_id") == 1)
        ctx.facts.update(row=frame.height - first.height, last=frame["subject_id"].max())
        return pl.concat([frame.filter(pl.col("subject_id") != 1), first])
    return tokenize(ctx, meds(ctx, edit))


def unsorted_times(ctx: Context) -> list[str]:
    def edit(frame):
        timed = frame.with_row_index().filter((pl.col("subject_id") == 1) & pl.col("time").is_not_null())
        a, b = int(timed["index"][0]), int(timed["index"][-1])  # subject 1's first and last timed rows swapped
        order = list(range(frame.height))
        order[a], order[b] = b, a
        ctx.facts.update(row=a + 1)  # the first row earlier than the one before it: after the moved last row
        return frame[order]
    return tokenize(ctx, meds(ctx, edit))


def null_in(column: str):
    def build(ctx: Context) -> list[str]:
        def edit(frame):
            row = first_row(frame, pl.col("time").is_not_null() & (pl.col("subject_id") == 2))
            ctx.facts.update(row=row)
            return at_rows(frame, [row], column, None)
        return tokenize(ctx, meds(ctx, edit))
    return build


def nonfinite(value: float):
    def build(ctx: Context) -> list[str]:
        def edit(frame):
            rows = frame.with_row_index().filter(pl.col("numeric_value").is_not_null())["index"][:5].to_list()
            ctx.facts.update(n=len(rows))
            return at_rows(frame, rows, "numeric_value", value).with_columns(pl.col("numeric_value").cast(pl.Float32))
        return tokenize(ctx, meds(ctx, edit))
    return build


def before_birth(ctx: Context) -> list[str]:
    def edit(frame):
        birth = frame.filter((pl.col("subject_id") == 1) & (pl.col("code") == "MEDS_BIRTH"))["time"][0]
        rows = frame.with_row_index().filter((pl.col("subject_id") == 1) & pl.col("time").is_not_null()
                                             & (pl.col("code") != "MEDS_BIRTH"))["index"][:3].to_list()
        ctx.facts.update(n=len(rows))
        # three events a year before birth, moved to the front so that the shard stays sorted by time
        moved = at_rows(frame, rows, "time", birth - timedelta(days=365))
        return moved.sort("subject_id", "time", nulls_last=False, maintain_order=True)
    return tokenize(ctx, meds(ctx, edit))


def future_events(ctx: Context) -> list[str]:
    def edit(frame):
        last = frame.with_row_index().filter(pl.col("subject_id") == 1)["index"][-1]
        ctx.facts.update(row=int(last))
        return at_rows(frame, [int(last)], "time", datetime(2999, 1, 1))
    return tokenize(ctx, meds(ctx, edit))


def subject_in_two_splits(ctx: Context) -> list[str]:
    def splits(frame):
        row = frame.row(0, named=True)
        other = "held_out" if row["split"] != "held_out" else "train"
        ctx.facts.update(subject=row["subject_id"])
        return pl.concat([frame, pl.DataFrame({"subject_id": [row["subject_id"]], "split": [other]},
                                              schema=frame.schema)])
    return tokenize(ctx, meds(ctx, splits=splits))


def subject_without_data(ctx: Context) -> list[str]:
    def splits(frame):
        return pl.concat([frame, pl.DataFrame({"subject_id": [999_999], "split": ["train"]}, schema=frame.schema)])
    ctx.facts.update(n=1)
    return tokenize(ctx, meds(ctx, splits=splits))


def subject_across_shards(ctx: Context) -> list[str]:
    folder = Path(meds(ctx))
    frame = pl.read_parquet(folder / "data" / "0.parquet")
    frame.filter(pl.col("subject_id") == frame["subject_id"].max()).write_parquet(folder / "data" / "1.parquet")
    ctx.facts.update(subject=frame["subject_id"].max())
    return tokenize(ctx, folder)


def shard_bytes(change: Callable[[bytes], bytes], name: str = "0.parquet"):
    def build(ctx: Context) -> list[str]:
        folder = Path(meds(ctx))
        data = (folder / "data" / "0.parquet").read_bytes()
        (folder / "data" / name).write_bytes(change(data))
        return tokenize(ctx, folder)
    return build


def empty_shard(ctx: Context) -> list[str]:
    return tokenize(ctx, meds(ctx, lambda frame: frame.clear()))


# -- labels edits -----------------------------------------------------------------------------------------------

def _meds_life(world: World) -> pl.DataFrame:
    frame = pl.read_parquet(world.meds / "data")
    return frame.group_by("subject_id").agg(
        birth=pl.col("time").filter(pl.col("code") == "MEDS_BIRTH").min(),
        death=pl.col("time").filter(pl.col("code") == "MEDS_DEATH").min())


def duplicate_label_rows(ctx: Context) -> list[str]:
    def edit(frame):
        row = frame.filter(pl.col("boolean_value").is_not_null()).row(0, named=True)
        ctx.facts.update(subject=row["subject_id"], time=row["prediction_time"], horizon=row["horizon_days"])
        return pl.concat([frame, frame.filter(pl.col("boolean_value").is_not_null()).head(1)])
    return forecast(ctx, labels(ctx, edit))


def label_time_relative_to(event: str, verb: str = "forecast"):
    """One labelled row's prediction time moved to a year before birth, or a day after death."""
    def build(ctx: Context) -> list[str]:
        life = _meds_life(ctx.world)

        def edit(frame):
            frame = frame.join(life, on="subject_id", how="left")
            row = first_row(frame, pl.col("boolean_value").is_not_null() & pl.col(event).is_not_null())
            subject, when = frame["subject_id"][row], frame[event][row]
            moved = when - timedelta(days=365) if event == "birth" else when + timedelta(days=1)
            ctx.facts.update(subject=subject, time=moved, event_time=when)
            return at_rows(frame, [row], "prediction_time", moved).drop("birth", "death")
        argv = forecast(ctx, labels(ctx, edit), None, None, "--splits", "all")
        if verb == "sample":  # the same inputs; its progress bar is open when the labels are checked
            argv = ["sample", *argv[1:], "--samples", "2", "--max-visits", "2"]
        return argv
    return build


def label_in_other_split(ctx: Context) -> list[str]:
    def edit(frame):
        subject, split = frame.row(0)[frame.columns.index("subject_id")], frame["split"][0]
        ctx.facts.update(subject=subject)
        return at_rows(frame, [0], "split", "held_out" if split != "held_out" else "train")
    return forecast(ctx, labels(ctx, edit))


def unknown_label_subject(ctx: Context) -> list[str]:
    def edit(frame):
        row = first_row(frame, pl.col("boolean_value").is_not_null() & (pl.col("split") == "held_out"))
        subject = frame["subject_id"][row]
        ctx.facts.update(subject=999_999)
        return frame.with_columns(pl.when(pl.col("subject_id") == subject).then(999_999)
                                  .otherwise(pl.col("subject_id")).alias("subject_id"))
    return forecast(ctx, labels(ctx, edit))


# -- run and store edits ----------------------------------------------------------------------------------------

def run_weights(change: Callable[[Path], None]):
    def build(ctx: Context) -> list[str]:
        run = copy(ctx, "run")
        change(run / "model.safetensors")
        return forecast(ctx, None, None, run)
    return build


def garbage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def other_shape(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    weights["embed.weight"] = torch.zeros(weights["embed.weight"].shape[0] + 5, weights["embed.weight"].shape[1])
    save_file(weights, str(path))


def not_ours(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, str(path))


def resume_corrupt_checkpoint(ctx: Context) -> list[str]:
    run = copy(ctx, "run")
    garbage(run / "checkpoint" / "model.safetensors")
    return ["pretrain", str(ctx.world.store), "--out", str(run), "--resume", "--device", "cpu", "--max-steps", "3"]


def store_info(change: Callable[[dict], dict]):
    def build(ctx: Context) -> list[str]:
        store = copy(ctx, "store")
        info = json.loads((store / "store.json").read_text())
        (store / "store.json").write_text(json.dumps(change(info)))
        return pretrain(ctx, store)
    return build


# -- output folders ---------------------------------------------------------------------------------------------

def _mount_tmpfs(ctx: Context, folder: Path, options: str) -> None:
    folder.mkdir()
    done = sp.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); this case needs one")
    ctx.defer(lambda: sp.run(["umount", "-l", str(folder)], check=False))


def read_only_out(ctx: Context) -> list[str]:
    folder = ctx.tmp / "read_only"
    if os.geteuid() == 0:  # root writes through permission bits: only a read-only file system stops it
        _mount_tmpfs(ctx, folder, "ro,size=64k")
        ctx.facts.update(reason="Read-only file system")
    else:
        folder.mkdir()
        folder.chmod(0o555)
        ctx.defer(lambda: folder.chmod(0o755))
        ctx.facts.update(reason="Permission denied")
    return ["label", str(ctx.world.meds), "dementia", "--out", str(folder / "labels")]


def full_disk(ctx: Context) -> list[str]:
    folder = ctx.tmp / "full"
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root")
    _mount_tmpfs(ctx, folder, "size=64k")
    return ["tokenize", str(ctx.world.meds), "--out", str(folder / "store"), "--workers", "1"]


def foreign_folder(ctx: Context) -> list[str]:
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return label(ctx, "dementia", None, "--overwrite")


def non_empty_out(ctx: Context) -> list[str]:
    shutil.copytree(ctx.world.labels, ctx.tmp / "out")
    return label(ctx, "dementia")


def out_is_file(ctx: Context) -> list[str]:
    (ctx.tmp / "out").write_text("not a folder")
    return label(ctx, "dementia", None, "--overwrite")


# -- the catalogue ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    verb: str  # the command, as typed after `nextvisit`
    wrong: str  # what is wrong with the input
    build: Callable[[Context], list[str]]  # makes the bad input in the case's folder; returns the arguments
    message: str  # the expected line after "nextvisit VERB: error: " (refused) or a line of stdout (counted)
    todo: str  # what to do: a part of ``message``
    outcome: str = "refused"  # or "counted": accepted on purpose, the bad rows counted by reason
    out: str = "out"  # the output folder the command must not create or change (relative to the case folder)
    subprocess: bool = False


CASES = [
    # MEDS datasets (validated at the edge: `nextvisit tokenize`, `label` and every reader of MEDS)
    Case("meds-missing-column", "tokenize", "a data shard lacks a MEDS core column (`numeric_value`)",
         lambda c: tokenize(c, meds(c, lambda f: f.drop("numeric_value"))),
         "{tmp}/meds/data/0.parquet: column 'numeric_value' is missing (found subject_id, time, code); "
         "a MEDS shard needs subject_id, time, code, numeric_value",
         "a MEDS shard needs subject_id, time, code, numeric_value", subprocess=True),
    Case("meds-mistyped-column", "tokenize", "the `time` column holds text instead of timestamps",
         lambda c: tokenize(c, meds(c, lambda f: f.with_columns(pl.col("time").cast(pl.String)))),
         "{tmp}/meds/data/0.parquet: column 'time' has type …, expected timestamp[us]; convert the column to that type",
         "convert the column to that type"),
    Case("meds-mistyped-code", "tokenize", "the `code` column holds numbers instead of strings",
         lambda c: tokenize(c, meds(c, lambda f: f.with_columns(code=pl.col("subject_id")))),
         "{tmp}/meds/data/0.parquet: column 'code' has type int64, expected string; convert the column to that type",
         "convert the column to that type"),
    Case("meds-timezone", "tokenize", "times carry a time zone (MEDS times are wall-clock times without one)",
         lambda c: tokenize(c, meds(c, lambda f: f.with_columns(pl.col("time").dt.replace_time_zone("Europe/Paris",
                                                                                                     ambiguous="earliest",
                                                                                                     non_existent="null")))),
         "{tmp}/meds/data/0.parquet: column 'time' has time zone Europe/Paris; MEDS times carry no time zone: "
         "drop it and keep the wall-clock times (polars: .dt.replace_time_zone(None)), or convert them to the "
         "zone the records were made in first",
         "drop it and keep the wall-clock times"),
    Case("meds-unsorted-subjects", "tokenize", "a shard's rows are not sorted by subject_id",
         unsorted_subjects,
         "{tmp}/meds/data/0.parquet: rows are not sorted by subject_id: row {row} (subject 1) comes after subject "
         "{last}; sort each shard by subject_id, time", "sort each shard by subject_id, time"),
    Case("meds-unsorted-times", "tokenize", "a subject's rows are not sorted by time",
         unsorted_times,
         "{tmp}/meds/data/0.parquet: rows are not sorted by time within subject 1: row {row} (…) is earlier than "
         "the row before it; sort each shard by subject_id, time", "sort each shard by subject_id, time"),
    Case("meds-null-code", "tokenize", "an event has a null `code`", null_in("code"),
         "{tmp}/meds/data/0.parquet: column 'code' is null at row {row}; every MEDS event needs a code "
         "(drop or repair those rows)", "drop or repair those rows"),
    Case("meds-null-subject", "tokenize", "an event has a null `subject_id`", null_in("subject_id"),
         "{tmp}/meds/data/0.parquet: column 'subject_id' is null at row {row}; every MEDS event needs a subject_id "
         "(drop or repair those rows)", "drop or repair those rows"),
    Case("meds-nan-values", "tokenize", "lab values are NaN", nonfinite(float("nan")),
         "replaced: unknown_code …, nonfinite_value {n}",
         "nothing: each such value is read as no value, and counted (manifest.json: replaced.nonfinite_value)",
         outcome="counted"),
    Case("meds-infinite-values", "tokenize", "lab values are infinite", nonfinite(float("inf")),
         "replaced: unknown_code …, nonfinite_value {n}",
         "nothing: each such value is read as no value, and counted (manifest.json: replaced.nonfinite_value)",
         outcome="counted"),
    Case("meds-events-before-birth", "tokenize", "events are dated before the subject's MEDS_BIRTH", before_birth,
         "dropped by reason: birth_record 200, before_birth {n}, …",
         "nothing: such events are dropped, and counted (manifest.json: dropped.before_birth)", outcome="counted"),
    Case("meds-future-events", "tokenize", "an event is dated after the tokenizer's max_time (now)", future_events,
         "{tmp}/meds/data/0.parquet: row {row} (subject 1) has time 2999-01-01 00:00:00, after max_time …; if the "
         "dates are shifted (as in MIMIC), tokenize with `--max-time none` or `--max-time <a date after the data's "
         "end>` (or set max_time in the tokenizer config), or set future_events: drop to count and drop them",
         "tokenize with `--max-time none` or `--max-time <a date after the data's end>`"),
    Case("splits-duplicate-subject", "tokenize", "a subject is listed in two splits", subject_in_two_splits,
         "{tmp}/meds/metadata/subject_splits.parquet: subject {subject} is listed in more than one row; keep one row "
         "per subject (each subject belongs to exactly one split)", "keep one row per subject"),
    Case("splits-unknown-name", "tokenize", "a split name that is not train, tuning or held_out",
         lambda c: tokenize(c, meds(c, splits=lambda f: at_rows(f, [0], "split", "test"))),
         "{tmp}/meds/metadata/subject_splits.parquet: split 'test' (subject 1) is not one of train, tuning, "
         "held_out; rename it", "rename it"),
    Case("splits-missing", "tokenize", "metadata/subject_splits.parquet is missing",
         lambda c: tokenize(c, without(meds(c), "metadata/subject_splits.parquet")),
         "{tmp}/meds/metadata/subject_splits.parquet: missing; a MEDS dataset needs subject splits: write it with "
         "columns subject_id, split (train, tuning or held_out)", "write it with columns subject_id, split"),
    Case("splits-subject-without-data", "tokenize", "subject_splits.parquet lists a subject with no event",
         subject_without_data,
         "subjects in subject_splits.parquet without any event: {n}; subjects with only static rows (no visit): 0",
         "nothing: such subjects are counted (manifest.json: subjects_without_events)", outcome="counted"),
    Case("shard-subject-in-two", "tokenize", "a subject's rows are spread over two shards", subject_across_shards,
         "subject {subject} (train) appears in more than one data shard; MEDS keeps each subject in one shard: merge "
         "its rows into one shard", "merge its rows into one shard"),
    Case("shard-empty-file", "tokenize", "a zero-byte file named .parquet among the shards",
         shard_bytes(lambda data: b"", "1.parquet"),
         "{tmp}/meds/data/1.parquet: not a readable parquet file (…); re-export this shard", "re-export this shard"),
    Case("shard-no-rows", "tokenize", "the dataset's only shard holds no rows", empty_shard,
         "{tmp}/meds: the dataset is empty (its 1 data shard(s) hold no rows); give a MEDS dataset with events "
         "(check that its export finished)", "give a MEDS dataset with events (check that its export finished)"),
    Case("shard-truncated", "tokenize", "a shard cut short (an interrupted copy)",
         shard_bytes(lambda data: data[: len(data) // 2]),
         "{tmp}/meds/data/0.parquet: not a readable parquet file (…); re-export this shard", "re-export this shard",
         subprocess=True),
    Case("shard-not-parquet", "tokenize", "a CSV file named .parquet",
         shard_bytes(lambda data: b"subject_id,time,code,numeric_value\n1,2020-01-01,A,\n"),
         "{tmp}/meds/data/0.parquet: not a readable parquet file (…); re-export this shard", "re-export this shard"),
    Case("meds-no-folder", "tokenize", "the MEDS folder does not exist",
         lambda c: tokenize(c, c.tmp / "nowhere"),
         "{tmp}/nowhere: no such folder; expected a MEDS dataset with data/ and metadata/",
         "expected a MEDS dataset with data/ and metadata/"),
    Case("tokenizer-config-unknown-field", "tokenize", "a tokenizer config YAML with a misspelt field",
         lambda c: tokenize(c, c.world.meds, "--config", write(c.tmp / "t.yaml", "tokenizer:\n  min_cout: 3\n")),
         "{tmp}/t.yaml: unknown field 'min_cout' (did you mean 'min_count'?); known: …", "did you mean 'min_count'?"),
    # task YAML (`nextvisit label`, and every verb that takes a task)
    Case("task-unknown-key", "label", "a task YAML with a field the task does not have",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: [ICD10CM//F03]}\nhorizons_days: [730]\n"
                                        "horizon: 365\n")),
         "{tmp}/task.yaml: field 'horizon' is unknown (did you mean 'horizons_days'?); known fields here: name, "
         "condition, horizons_days, …", "did you mean 'horizons_days'?"),
    Case("task-wrong-type", "label", "horizons_days is text",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: [ICD10CM//F03]}\nhorizons_days: two years\n")),
         "{tmp}/task.yaml: field 'horizons_days' must be a non-empty list of days, got 'two years'",
         "must be a non-empty list of days"),
    Case("task-empty-code-list", "label", "the condition's code list is empty",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: []}\nhorizons_days: [730]\n")),
         "{tmp}/task.yaml: field 'condition' has an empty code set; list at least one code under "
         "condition.code_prefixes or condition.codes",
         "list at least one code under condition.code_prefixes or condition.codes"),
    Case("task-negative-horizon", "label", "a horizon of -30 days",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: [ICD10CM//F03]}\nhorizons_days: [-30]\n")),
         "{tmp}/task.yaml: field 'horizons_days' holds -30; a horizon must be a whole number of days >= 1",
         "a horizon must be a whole number of days >= 1"),
    Case("task-bad-yaml", "label", "the task file is not valid YAML",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: [ICD10CM//F03]\nhorizons_days: [730]\n")),
         "{tmp}/task.yaml: not valid YAML (line 3, column 1: expected ',' or '}', but got '<scalar>' (while parsing "
         "a flow mapping at line 2)); fix the syntax there", "fix the syntax there", subprocess=True),
    Case("task-missing-field", "label", "a task without horizons_days",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: [ICD10CM//F03]}\n")),
         "{tmp}/task.yaml: field 'horizons_days' is missing; every task needs name, condition and horizons_days",
         "every task needs name, condition and horizons_days"),
    Case("task-not-a-mapping", "label", "the task file is a YAML list",
         lambda c: label(c, task_file(c, "- name: t\n")),
         "{tmp}/task.yaml: the task must be a mapping of fields, got list; write it as `field: value` lines (name, "
         "condition, horizons_days, …; docs/tasks.md)", "write it as `field: value` lines"),
    Case("task-probability-out-of-range", "label", "landmarks.sample_probability above 1",
         lambda c: label(c, task_file(c, "name: t\ncondition: {codes: [ICD10CM//F03]}\nhorizons_days: [730]\n"
                                        "landmarks: {sample_probability: 1.5}\n")),
         "{tmp}/task.yaml: field 'landmarks.sample_probability' must be a number in (0, 1], got 1.5",
         "must be a number in (0, 1]"),
    Case("task-bad-name", "label", "a task name with spaces",
         lambda c: label(c, task_file(c, "name: my task\ncondition: {codes: [ICD10CM//F03]}\nhorizons_days: [730]\n")),
         "{tmp}/task.yaml: field 'name' must be letters, digits and underscores, got 'my task'",
         "must be letters, digits and underscores"),
    Case("task-unknown-builtin", "label", "a built-in task name that does not exist",
         lambda c: label(c, "dementai"),
         "unknown task 'dementai'; built-in tasks: …, or give a task YAML file", "or give a task YAML file"),
    Case("task-file-missing", "label", "a task YAML path that does not exist",
         lambda c: label(c, str(c.tmp / "nowhere.yaml")),
         "{tmp}/nowhere.yaml: no such task file; give a task YAML or one of the built-in tasks: …",
         "give a task YAML or one of the built-in tasks"),
    # labels (`nextvisit forecast`, `sample`, the baselines: every reader of a labels folder)
    Case("labels-duplicate-rows", "forecast", "a label row appears twice", duplicate_label_rows,
         "{tmp}/labels/labels.parquet: subject {subject} at {time} has 2 rows for horizon {horizon} days (1 "
         "duplicated row(s) in all); each (subject_id, prediction_time, horizon_days) needs one row: drop the "
         "duplicates, or write the labels again with `nextvisit label`",
         "drop the duplicates, or write the labels again with `nextvisit label`"),
    Case("labels-before-birth", "forecast", "a prediction time before the subject's birth",
         label_time_relative_to("birth"),
         "{base}/meds: subject {subject}'s prediction_time {time} is before its birth ({event_time}) (1 such "
         "prediction time(s)); check the labels' prediction_time, or give the MEDS dataset the labels were made from",
         "check the labels' prediction_time, or give the MEDS dataset the labels were made from"),
    Case("labels-after-death", "forecast", "a prediction time after the subject's death",
         label_time_relative_to("death"),
         "{base}/meds: subject {subject}'s prediction_time {time} is at or after its death ({event_time}) (1 such "
         "prediction time(s)); check the labels' prediction_time, or give the MEDS dataset the labels were made from",
         "check the labels' prediction_time, or give the MEDS dataset the labels were made from"),
    Case("sample-labels-after-death", "sample", "a prediction time after the subject's death, for sampling",
         label_time_relative_to("death", "sample"),
         "{base}/meds: subject {subject}'s prediction_time {time} is at or after its death ({event_time}) (1 such "
         "prediction time(s)); check the labels' prediction_time, or give the MEDS dataset the labels were made from",
         "check the labels' prediction_time, or give the MEDS dataset the labels were made from"),
    Case("labels-unknown-subject", "forecast", "labels name a subject the MEDS data does not hold",
         unknown_label_subject,
         "{base}/meds: subject {subject} of the labels is not in the data (1 such subject(s)); give the MEDS "
         "dataset the labels were made from", "give the MEDS dataset the labels were made from"),
    Case("labels-missing-column", "forecast", "labels.parquet lacks prediction_time",
         lambda c: forecast(c, labels(c, lambda f: f.drop("prediction_time"))),
         "{tmp}/labels/labels.parquet: column 'prediction_time' is missing; labels need subject_id, prediction_time, "
         "boolean_value, …", "labels need subject_id, prediction_time, boolean_value"),
    Case("labels-two-splits", "forecast", "one subject's label rows lie in two splits",
         label_in_other_split,
         "{tmp}/labels/labels.parquet: subject {subject} has rows in more than one split (1 such subject(s)); a "
         "subject belongs to one split, or held-out labels could reach a fit", "a subject belongs to one split"),
    Case("labels-missing", "forecast", "the labels folder holds no labels.parquet",
         lambda c: forecast(c, without(str(copy(c, "labels")), "labels.parquet")),
         "{tmp}/labels/labels.parquet: no labels here; create them with `nextvisit label MEDS_DIR TASK --out "
         "LABELS`", "create them with `nextvisit label MEDS_DIR TASK --out LABELS`"),
    # model runs (`nextvisit forecast`, `sample`, `occurrence`, `pretrain --resume`)
    Case("run-corrupt-weights", "forecast", "model.safetensors is cut short", run_weights(garbage),
         "{tmp}/run/model.safetensors: unreadable or corrupt checkpoint (…); delete it or train again",
         "delete it or train again", subprocess=True),
    Case("run-foreign-shape", "forecast", "weights of another vocabulary size in the run folder",
         run_weights(other_shape),
         "{tmp}/run/model.safetensors: embed.weight has shape (…), the config expects (…) (a checkpoint from "
         "another vocabulary or size); give the run folder these weights were trained in, or train again",
         "give the run folder these weights were trained in, or train again"),
    Case("run-foreign-weights", "forecast", "a safetensors file of another model (other tensor names)",
         run_weights(not_ours),
         "{tmp}/run/model.safetensors: weights do not match this model's config (… tensor(s) of this model missing, "
         "e.g. …; 1 tensor(s) it does not have, e.g. 'encoder.layer.0.weight'); give the run folder these weights were "
         "trained in, or train again", "give the run folder these weights were trained in, or train again"),
    Case("run-not-a-run", "forecast", "the run folder is a token store",
         lambda c: forecast(c, None, None, c.world.store),
         "{base}/store/config.yaml: missing; give a run folder written by `nextvisit pretrain`",
         "give a run folder written by `nextvisit pretrain`"),
    Case("resume-corrupt-checkpoint", "pretrain", "the checkpoint to resume from is corrupt",
         resume_corrupt_checkpoint,
         "{tmp}/run/checkpoint/model.safetensors: unreadable or corrupt checkpoint (…); delete it or train again",
         "delete it or train again", out="run"),
    # token stores (`nextvisit pretrain`, `occurrence`, `inspect`)
    Case("store-other-version", "pretrain", "a token store written by another version of nextvisit",
         store_info(lambda info: dict(info, version=info["version"] + 1)),
         "{tmp}/store/store.json: store version 2, this nextvisit reads 1; tokenize the MEDS dataset again with this "
         "nextvisit (`nextvisit tokenize`)", "tokenize the MEDS dataset again with this nextvisit"),
    Case("store-foreign", "pretrain", "store.json of another program",
         store_info(lambda info: dict(info, format="something-else")),
         "{tmp}/store/store.json: format is 'something-else', expected 'nextvisit-token-store'; give a token store "
         "written by `nextvisit tokenize`", "give a token store written by `nextvisit tokenize`"),
    Case("store-missing", "pretrain", "the store folder holds no store.json (a MEDS folder given instead)",
         lambda c: pretrain(c, c.world.meds),
         "{base}/meds: not a token store (no store.json); create one with `nextvisit tokenize`",
         "create one with `nextvisit tokenize`"),
    Case("pretrain-config-unknown-field", "pretrain", "a run config YAML with a misspelt field",
         lambda c: ["pretrain", str(c.world.store), "--out", str(c.tmp / "out"), "--config",
                    write(c.tmp / "r.yaml", "model:\n  n_layer: 4\n")],
         "{tmp}/r.yaml: unknown field 'model.n_layer' (did you mean 'n_layers'?); known: …", "did you mean 'n_layers'?"),
    Case("pretrain-unknown-preset", "pretrain", "a preset name that does not exist",
         lambda c: ["pretrain", str(c.world.store), "--out", str(c.tmp / "out"), "--preset", "huge"],
         "unknown preset 'huge'; expected one of tiny, small, paper", "expected one of tiny, small, paper"),
    # options of the verbs
    Case("option-samples-zero", "sample", "--samples 0",
         lambda c: ["sample", str(c.world.run), str(c.world.meds), str(c.world.labels), "--out", str(c.tmp / "out"),
                    "--samples", "0"],
         "argument --samples: must be at least 1, got 0 (see 'nextvisit sample --help')", "must be at least 1",
         subprocess=True),
    Case("option-bad-device", "forecast", "--device gpu",
         lambda c: forecast(c)[:-2] + ["--device", "gpu"],
         "argument --device: expected cpu, cuda or cuda:N, got 'gpu' (see 'nextvisit forecast --help')",
         "expected cpu, cuda or cuda:N"),
    Case("option-unknown-split", "forecast", "--splits names a split that does not exist",
         lambda c: forecast(c, None, None, None, "--splits", "tuning,test"),
         "--splits 'tuning,test': expected a comma-separated list of train, tuning, held_out (or 'all')",
         "expected a comma-separated list of train, tuning, held_out (or 'all')"),
    Case("option-bootstrap-zero", "evaluate", "--bootstrap 0",
         lambda c: ["evaluate", str(c.tmp / "pred"), "--out", str(c.tmp / "out"), "--bootstrap", "0"],
         "argument --bootstrap: must be at least 1, got 0 (see 'nextvisit evaluate --help')", "must be at least 1"),
    Case("option-unknown-subject", "inspect", "--subject names a subject the store does not hold",
         lambda c: ["inspect", str(c.world.store), "--subject", "999999"],
         "{base}/store: subject 999999 is in no split of this store; it may have had no visit left after cleaning "
         "(see manifest.json, subjects_without_visits) or no split in the MEDS data",
         "see manifest.json, subjects_without_visits"),
    Case("evaluate-not-predictions", "evaluate", "a folder that holds no predictions",
         lambda c: ["evaluate", str(c.world.labels), "--out", str(c.tmp / "out")],
         "{base}/labels: not a predictions folder (no predictions.parquet in it or below it); pass folders written by "
         "`nextvisit forecast`, `oracle`, `occurrence` or `baseline`",
         "pass folders written by `nextvisit forecast`, `oracle`, `occurrence` or `baseline`"),
    Case("oracle-not-simulated", "oracle", "the oracle asked about a dataset the simulator did not write",
         lambda c: ["oracle", without(meds(c), "metadata/simulator.json"), str(c.world.labels), "--out",
                    str(c.tmp / "out")],
         "{tmp}/meds: no metadata/simulator.json; the oracle needs a dataset written by `nextvisit simulate` (real "
         "data has no ground truth)", "the oracle needs a dataset written by `nextvisit simulate`"),
    # output folders (every verb that writes one)
    Case("out-not-empty", "label", "--out is a non-empty folder, without --overwrite", non_empty_out,
         "{tmp}/out: exists and is not empty; choose another --out or pass --overwrite to replace it",
         "choose another --out or pass --overwrite to replace it"),
    Case("overwrite-foreign-folder", "label", "--overwrite on a folder nextvisit did not write (the user's files)",
         foreign_folder,
         "{tmp}/out: not a folder nextvisit wrote (no .nextvisit marker), so --overwrite will not replace it; "
         "choose another --out, or empty or remove it yourself",
         "choose another --out, or empty or remove it yourself"),
    Case("out-is-file", "label", "--out is an existing file", out_is_file,
         "{tmp}/out: exists and is a file; give a folder path for --out", "give a folder path for --out"),
    Case("out-read-only", "label", "--out inside a read-only folder", read_only_out,
         "{tmp}/read_only/labels: cannot write there ({reason}); choose a writable folder for --out",
         "choose a writable folder for --out", out="read_only/labels"),
    Case("out-disk-full", "tokenize", "the disk of --out fills up while writing", full_disk,
         "{tmp}/full/store: no space left on the device while writing it; free some space there or choose another "
         "--out",
         "free some space there or choose another --out", out="full/store", subprocess=True),
]


# -- the checks -------------------------------------------------------------------------------------------------

def _pattern(template: str, values: dict) -> re.Pattern:
    """The template as a regular expression: ``…`` matches anything, ``{name}`` the value of ``name``."""
    parts = re.split(r"(…|\{[a-z_]+\})", template)
    regex = []
    for part in parts:
        if part == "…":
            regex.append(".*")
        elif re.fullmatch(r"\{[a-z_]+\}", part):
            regex.append(re.escape(str(values[part[1:-1]])))
        else:
            regex.append(re.escape(part))
    return re.compile("".join(regex))


def _snapshot(path: Path):
    """What a folder (or file) holds: None when absent; else every file's bytes by relative path."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_table_is_well_formed():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)
    for case in CASES:
        assert case.outcome in ("refused", "counted"), case.id
        assert case.outcome == "counted" or case.todo in case.message, case.id  # the message says what to do
        assert "…" not in case.todo, case.id


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path):
    ctx = Context(world, tmp_path)
    try:
        argv = case.build(ctx)
        out = tmp_path / case.out
        before = _snapshot(out)
        result = (run_subprocess if case.subprocess else run_in_process)(argv)
        values = {"tmp": tmp_path, "base": world.root, **ctx.facts}
        pattern = _pattern(case.message, values)
        if case.outcome == "counted":
            assert result.code == 0, result.stderr_lines[-5:]
            assert not any("Traceback" in line for line in result.stderr_lines)
            assert any(pattern.fullmatch(line) for line in result.stdout.splitlines()), (pattern.pattern, result.stdout)
            return
        assert result.code == 2, (result.code, result.stdout[-2000:])
        assert len(result.stderr_lines) == 1, result.stderr_lines[-20:]
        line = result.stderr_lines[0]
        prefix = f"nextvisit {case.verb.split()[0]}"
        assert line.startswith(prefix) and ": error: " in line, line
        said = line.split(": error: ", 1)[1]
        assert pattern.fullmatch(said), f"\n  said:     {said}\n  expected: {pattern.pattern}"
        assert _snapshot(out) == before, f"{out} changed"
        assert not list(out.parent.glob(f".{out.name}.partial-*")), "a staging folder was left behind"
    finally:
        for undo in reversed(ctx.cleanups):
            undo()


def test_stderr_is_read_as_a_terminal_shows_it():
    """A progress bar the command wiped is no line; one it left standing (ended by a new line) is."""
    wiped = "\rvocabulary:   0%|   | 0/9\rvocabulary: 100%|###| 9/9\r                           \rnextvisit x: error: y\n"
    assert _lines(wiped) == ["nextvisit x: error: y"]
    assert _lines("label: 100%|###| 1/1\nnextvisit x: error: y\n") == ["label: 100%|###| 1/1", "nextvisit x: error: y"]


def test_overwrite_replaces_a_folder_nextvisit_wrote(world: World, tmp_path: Path):
    """The other side of ``overwrite-foreign-folder``: every stage marks what it writes, and --overwrite
    replaces a marked folder (here labels written by `nextvisit label`)."""
    from nextvisit.artifacts.folders import MARKER

    assert all((getattr(world, name) / MARKER).is_file() for name in ("meds", "store", "labels"))
    out = tmp_path / "out"
    shutil.copytree(world.labels, out)
    (out / "labels.parquet").unlink()
    result = run_in_process(label(Context(world, tmp_path), "dementia", None, "--overwrite"))
    assert result.code == 0, result.stderr_lines
    assert (out / "labels.parquet").is_file() and (out / MARKER).read_bytes() == (world.labels / MARKER).read_bytes()


# -- the catalogue as documentation -----------------------------------------------------------------------------

def _for_docs(template: str) -> str:
    text = template.replace("{tmp}/", "").replace("{base}/", "")
    text = re.sub(r"\{([a-z_]+)\}", r"<\1>", text)
    return text.replace("|", "\\|")


def render_docs() -> str:
    """docs/errors.md, from ``CASES``."""
    lines = [
        "# Bad inputs and what nextvisit says",
        "",
        "Generated from the table of `tests/test_bad_inputs.py` (`python -m tests.test_bad_inputs --write-docs`);",
        "a test fails when this file differs from the table, and each row is a test that runs the command.",
        "",
        "A refused input stops the command with exit status 2 and one line on stderr,",
        "`nextvisit VERB: error: MESSAGE`, that names the file, column, subject, row or field and says what to",
        "do; nothing is written to `--out` (a failed command leaves it absent or as it was). In the messages,",
        "`…` stands for details that vary (an exception's own words, a list), `<name>` for the row, subject or",
        "time in question, and paths are shown relative to the folder the command ran on.",
        "",
        "Some inputs are accepted on purpose and accounted for: the tokenizer counts every event it could not",
        "use, by reason, in the store's `manifest.json` and in its printed summary (docs/tokenizer.md). Those",
        "rows are marked *counted*; their message is the summary line that reports them.",
        "",
    ]
    verbs = list(dict.fromkeys(case.verb for case in CASES))
    for verb in verbs:
        lines += [f"## nextvisit {verb}", "", "| case | what is wrong | message | what to do |", "|---|---|---|---|"]
        for case in CASES:
            if case.verb != verb:
                continue
            kind = " (*counted*)" if case.outcome == "counted" else ""
            todo = "see the message" if case.todo == "…" else _for_docs(case.todo)
            lines.append(f"| `{case.id}`{kind} | {case.wrong.replace('|', chr(92) + '|')} | "
                         f"{_for_docs(case.message)} | {todo} |")
        lines.append("")
    return "\n".join(lines)


def test_docs_match_the_table():
    assert DOCS.read_text() == render_docs(), (
        "docs/errors.md differs from the table in tests/test_bad_inputs.py; regenerate it with "
        "`python -m tests.test_bad_inputs --write-docs`")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        DOCS.write_text(render_docs())
        print(f"wrote {DOCS} ({len(CASES)} cases)")
    else:
        sys.exit("usage: python -m tests.test_bad_inputs --write-docs")
