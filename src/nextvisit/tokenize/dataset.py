"""The whole dataset: ``nextvisit tokenize`` (``tokenize_dataset``, ``run_cli``) over MEDS shards in parallel.

Contract: ``tokenize_dataset(meds_dir, out, ...)`` validates every shard, fits the vocabulary and lab
statistics on the train split (``fit_statistics``; or reuses those of ``vocab_from``), tokenizes every split
and writes the token store described in ``nextvisit.tokenize.store`` at ``out`` through
``nextvisit.artifacts.folders.atomic_folder``: a file or (without ``overwrite``) a non-empty folder at ``out``
is refused before any work, and a failure leaves ``out`` untouched. It returns the manifest, in which per
split ``events_in = tokens_from_events + duplicates_collapsed + sum(dropped)``. The store's content does not
depend on ``workers`` or ``chunk_rows``.

Two passes read the shards in row-group ranges of whole subjects (``nextvisit.tokenize.shards``), each range a
task for a pool of spawned worker processes (``_Workers``); the task functions are module-level so that the
workers can import them. Pass 2 writes part folders inside the staging folder, joined per split in task order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from nextvisit.artifacts.folders import atomic_folder
from nextvisit.data import meds
from nextvisit.errors import UserError
from nextvisit.tokenize.config import VOCABULARY_FIELDS, TokenizerConfig
from nextvisit.tokenize.events import check_future
from nextvisit.tokenize.shards import read_chunks, shard_ranges
from nextvisit.tokenize.store import SPLITS, SplitWriter, write_store_info
from nextvisit.tokenize.tokenizer import Tokenizer, add_counts, balance_gap, empty_counts
from nextvisit.tokenize.vocabulary import code_statistics, lab_statistics, merge_statistics, with_quantile_edges, z_histogram

# Without --workers, one worker process per this many events (up to the CPUs): starting a process (about
# 0.4 CPU-seconds of imports) costs more than it saves on smaller datasets.
ROWS_PER_WORKER = 2_000_000


# -- worker functions (module level so that spawned processes can run them) ------------------------------
_WORKER_CACHE: dict = {}


class SplitLookup:
    """Split of each event's subject by binary search in the sorted subject ids of the splits file: cost per
    chunk grows with the chunk, not with the number of subjects in the dataset."""

    def __init__(self, splits: pl.DataFrame):
        splits = splits.sort("subject_id")
        self.subject_ids = splits.get_column("subject_id").to_numpy()
        code = {name: i for i, name in enumerate(SPLITS)}
        self.codes = splits.get_column("split").replace_strict(code, return_dtype=pl.Int8).to_numpy()

    def of(self, subject_ids: np.ndarray) -> np.ndarray:
        """Index into SPLITS per event, -1 for a subject without a split."""
        if len(self.subject_ids) == 0:
            return np.full(len(subject_ids), -1, dtype=np.int8)
        position = np.minimum(np.searchsorted(self.subject_ids, subject_ids), len(self.subject_ids) - 1)
        return np.where(self.subject_ids[position] == subject_ids, self.codes[position], -1).astype(np.int8)


def _split_lookup(meds_dir: str) -> SplitLookup:
    key = ("splits", meds_dir)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = SplitLookup(meds.read_splits_checked(Path(meds_dir)))
    return _WORKER_CACHE[key]


def _chunk_splits(chunk: pl.DataFrame, lookup: SplitLookup) -> np.ndarray:
    """Split index per row of a chunk sorted by subject: looked up once per subject."""
    subjects = chunk.get_column("subject_id").to_numpy()
    if len(subjects) == 0:
        return np.zeros(0, dtype=np.int8)
    starts = np.flatnonzero(np.concatenate([[True], subjects[1:] != subjects[:-1]]))
    return np.repeat(lookup.of(subjects[starts]), np.diff(np.concatenate([starts, [len(subjects)]])))


def _statistics_task(task: dict) -> dict:
    """Pass 1 over one shard: validate every row, and per-code statistics of the train split."""
    config = TokenizerConfig.from_dict(task["config"])
    max_time = config.max_time_value()
    lookup = _split_lookup(task["meds_dir"])
    labs = pl.DataFrame(task["labs"]) if task.get("labs") is not None else None
    parts, histograms, rows = [], [], 0
    for chunk in read_chunks(Path(task["path"]), config.chunk_rows, task["row_groups"]):
        rows += chunk.height
        check_future(chunk, config, max_time, task["path"], row_column="row")
        chunk = chunk.filter(pl.Series(_chunk_splits(chunk, lookup) == SPLITS.index("train")))
        if labs is None:
            parts.append(code_statistics(chunk, config, max_time))
        else:
            histograms.append(z_histogram(chunk, labs, config, max_time))
    result = {"rows": rows}
    if labs is None:
        result["stats"] = merge_statistics(parts)
    else:
        result["histogram"] = np.sum(histograms, axis=0) if histograms else None
    return result


def _tokenize_task(task: dict) -> dict:
    """Pass 2 over one shard: tokenize each split's subjects into part folders under ``task['part']``."""
    key = ("tokenizer", task["tokenizer"])
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = Tokenizer.load(Path(task["tokenizer"]))
    tokenizer: Tokenizer = _WORKER_CACHE[key]
    lookup = _split_lookup(task["meds_dir"])
    part = Path(task["part"])
    writers: dict[str, SplitWriter] = {}
    counts = {split: empty_counts() for split in SPLITS}
    unassigned = {"events": 0, "subjects": 0}
    rows = 0
    for chunk in read_chunks(Path(task["path"]), tokenizer.config.chunk_rows, task["row_groups"],
                             validate=not task["validated"]):
        rows += chunk.height
        check_future(chunk, tokenizer.config, tokenizer.max_time, task["path"], row_column="row")
        split_of_row = _chunk_splits(chunk, lookup)
        chunk = chunk.select(meds.CORE_COLUMNS)
        missing = split_of_row < 0
        if missing.any():
            unassigned["events"] += int(missing.sum())
            unassigned["subjects"] += chunk.filter(pl.Series(missing)).get_column("subject_id").n_unique()
            chunk, split_of_row = chunk.filter(pl.Series(~missing)), split_of_row[~missing]
        for split, batch in zip(SPLITS, tokenizer.tokenize_groups(chunk, split_of_row, len(SPLITS))):
            if batch.counts["events_in"] == 0:
                continue
            if split not in writers:
                writers[split] = SplitWriter(part / split)
            batch.write(writers[split])
            add_counts(counts[split], batch.counts)
    for writer in writers.values():
        writer.close()
    return {"rows": rows, "counts": counts, "unassigned": unassigned, "splits": sorted(writers)}


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Workers:
    """A pool of spawned worker processes, started on first use and shared by the passes over the data.
    Polars in each worker gets its share of the CPUs so that workers do not oversubscribe them."""

    def __init__(self, workers: int, progress: bool):
        self.workers = max(1, workers)
        self.progress = progress
        self._pool = None

    def run(self, function, tasks: list[dict], description: str, total_rows: int):
        """``function`` over ``tasks``; results in task order (in this process when one worker suffices)."""
        from tqdm import tqdm

        bar = tqdm(total=total_rows, desc=description, unit=" events", unit_scale=True, disable=not self.progress,
                   file=sys.stderr, leave=False)
        try:
            if self.workers == 1 or len(tasks) == 1:
                results = map(function, tasks)
            else:
                results = self._start().imap(function, tasks)
            for result in results:
                bar.update(result["rows"])
                yield result
        finally:
            bar.close()

    def _start(self):
        if self._pool is None:
            previous = os.environ.get("POLARS_MAX_THREADS")
            os.environ["POLARS_MAX_THREADS"] = str(max(1, _default_workers() // self.workers))
            try:
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
            finally:
                if previous is None:
                    os.environ.pop("POLARS_MAX_THREADS", None)
                else:
                    os.environ["POLARS_MAX_THREADS"] = previous
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read_tasks(files: list[Path], config: TokenizerConfig, workers: int, total_rows: int) -> list[dict]:
    """Units of work: row-group ranges of the shards, small enough to give every worker several."""
    rows_per_task = max(1, min(config.chunk_rows, -(-total_rows // (4 * workers))))
    return [{"path": str(path), "row_groups": rows} for path in files for rows in shard_ranges(path, rows_per_task)]


# -- the whole dataset -------------------------------------------------------------------------------------
def fit_statistics(meds_dir: Path, reads: list[dict], config: TokenizerConfig, pool: _Workers, total_rows: int) -> Tokenizer:
    """The vocabulary pass: per-code train statistics, shard by shard, merged exactly; for quantile bins a
    second streaming pass reads the train z histograms."""
    base = {"meds_dir": str(meds_dir), "config": config.to_dict()}
    tasks = [dict(base, **read) for read in reads]
    stats = merge_statistics([r["stats"] for r in pool.run(_statistics_task, tasks, "vocabulary", total_rows)])
    labs = lab_statistics(stats, config)
    if config.lab_binning == "quantile":
        lab_table = labs.select("code", "mean", "std").to_dict(as_series=False)
        tasks = [dict(task, labs=lab_table) for task in tasks]
        histograms = [r["histogram"] for r in pool.run(_statistics_task, tasks, "lab quantiles", total_rows)
                      if r["histogram"] is not None]
        labs = with_quantile_edges(labs, histograms, config)
    return Tokenizer.from_statistics(stats, labs, config)


def _check_unique_subjects(folder: Path, split: str) -> None:
    path = folder / "subject_ids.bin"
    if not path.exists() or path.stat().st_size == 0:
        return
    ids = np.memmap(path, dtype=np.int64, mode="r")
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        unique, counts = np.unique(np.asarray(ids), return_counts=True)
        if (counts > 1).any():
            raise UserError(f"subject {int(unique[counts > 1][0])} ({split}) appears in more than one data shard; "
                            "MEDS keeps each subject in one shard: merge its rows into one shard")


def _reused_tokenizer(vocab_from: Path, config: TokenizerConfig | None) -> Tokenizer:
    """The tokenizer of ``vocab_from``, with ``config`` in place of its own when given; ``config`` may not
    change the fields that define its vocabulary."""
    tokenizer = Tokenizer.load(vocab_from)
    if config is not None:
        changed = [name for name in VOCABULARY_FIELDS if getattr(config, name) != getattr(tokenizer.config, name)]
        if changed:
            raise UserError(f"--config changes {', '.join(changed)}, which define the vocabulary of {vocab_from}; "
                            "drop them from the config or tokenize without --vocab-from")
        tokenizer = Tokenizer(config.resolved(), tokenizer.vocab, tokenizer.lab_stats)
    return tokenizer


def _write_code_descriptions(meds_dir: Path, tokenizer: Tokenizer, folder: Path) -> None:
    """``codes.parquet``: the MEDS descriptions of the vocabulary's codes."""
    vocab_codes = pl.DataFrame({"code": sorted({tokenizer.vocab.code_of(i) for i in range(len(tokenizer.vocab))})})
    meds.read_code_descriptions(meds_dir).join(vocab_codes, on="code", how="semi").write_parquet(folder / "codes.parquet")


def _tokenize_splits(meds_dir: Path, reads: list[dict], staging: Path, pool: _Workers, total_rows: int,
                     validated: bool) -> tuple[dict, dict, dict]:
    """The tokenizing pass (the tokenizer saved in ``staging``): each task writes a part folder, the parts are
    joined per split in task order. Returns counts per split, the unassigned events and the split sizes."""
    parts = staging / "parts"
    base = {"meds_dir": str(meds_dir), "tokenizer": str(staging), "validated": validated}
    tasks = [dict(base, part=str(parts / f"{i:05d}"), **read) for i, read in enumerate(reads)]
    counts = {split: empty_counts() for split in SPLITS}
    unassigned = {"events": 0, "subjects": 0}
    split_parts: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for task, result in zip(tasks, pool.run(_tokenize_task, tasks, "tokenize", total_rows)):
        for split in SPLITS:
            add_counts(counts[split], result["counts"][split])
        for split in result["splits"]:
            split_parts[split].append(Path(task["part"]) / split)
        add_counts(unassigned, result["unassigned"])
    sizes = {}
    for split in SPLITS:
        writer = SplitWriter(staging / split)
        for folder in split_parts[split]:
            writer.append_split(folder)
        sizes[split] = writer.close()
        _check_unique_subjects(staging / split, split)
    shutil.rmtree(parts)
    return counts, unassigned, sizes


def _complete_counts(counts: dict, splits: pl.DataFrame) -> None:
    """Add the per-split figures that need the whole dataset: subjects listed, subjects without events, UNK
    share and the balance gap."""
    listed = splits.group_by("split").len()
    listed = dict(zip(listed["split"].to_list(), listed["len"].to_list()))
    for split in SPLITS:
        counts[split]["subjects_listed"] = int(listed.get(split, 0))
        counts[split]["subjects_without_events"] = max(0, counts[split]["subjects_listed"] - counts[split]["subjects_in"])
        counts[split]["unk_share"] = (counts[split]["replaced"]["unknown_code"] / counts[split]["events_in"]
                                      if counts[split]["events_in"] else 0.0)
        counts[split]["balance_gap"] = balance_gap(counts[split])


def _manifest(meds_dir: Path, vocab_from: Path | None, tokenizer: Tokenizer, n_shards: int, counts: dict,
              unassigned: dict, total_rows: int, workers: int, started: float) -> dict:
    events_in = sum(c["events_in"] for c in counts.values()) + unassigned["events"]
    if events_in != total_rows:
        raise RuntimeError(f"read {events_in} events but the shards hold {total_rows}")
    elapsed = time.perf_counter() - started
    return {
        "source": str(meds_dir.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vocab_from": str(Path(vocab_from).resolve()) if vocab_from is not None else None,
        "vocab_size": len(tokenizer.vocab),
        "events_in": events_in,
        "shards": n_shards,
        "splits": counts,
        "unassigned": unassigned,  # events of subjects absent from subject_splits.parquet (dropped)
        "unk_share": sum(c["replaced"]["unknown_code"] for c in counts.values()) / max(1, events_in),
        "seconds": round(elapsed, 3),
        "events_per_second": round(events_in / elapsed) if elapsed > 0 else None,
        "workers": workers,
    }


def tokenize_dataset(meds_dir: Path, out: Path, config: TokenizerConfig | None = None, vocab_from: Path | None = None,
                     workers: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Validate a MEDS dataset and write a token store at ``out`` (atomically: built in a staging folder
    beside it, then renamed; ``nextvisit.artifacts.folders``). Returns the manifest."""
    started = time.perf_counter()
    meds_dir = Path(meds_dir)
    files = meds.data_files(meds_dir)
    total_rows = sum(meds.check_shard_schema(path) for path in files)
    if total_rows == 0:
        raise UserError(f"{meds_dir}: the dataset is empty (its {len(files)} data shard(s) hold no rows); give a MEDS "
                        "dataset with events (check that its export finished)")
    splits = meds.read_splits_checked(meds_dir)
    workers = workers or max(1, min(_default_workers(), total_rows // ROWS_PER_WORKER))

    tokenizer = None
    if vocab_from is not None:
        tokenizer = _reused_tokenizer(vocab_from, config)
        config = tokenizer.config
    else:
        config = (config or TokenizerConfig()).validate().resolved()
        if splits.filter(pl.col("split") == "train").height == 0:
            raise UserError(f"{meds_dir}/metadata/subject_splits.parquet: no train subjects; the vocabulary is fit "
                            "on train (or pass --vocab-from to reuse one)")
    # the pool closes (its workers stop writing) before the staging folder is published or discarded
    with atomic_folder(out, overwrite) as staging, _Workers(workers, progress) as pool:
        reads = _read_tasks(files, config, workers, total_rows)
        if tokenizer is None:
            tokenizer = fit_statistics(meds_dir, reads, config, pool, total_rows)
        tokenizer.save(staging)
        _write_code_descriptions(meds_dir, tokenizer, staging)
        counts, unassigned, sizes = _tokenize_splits(meds_dir, reads, staging, pool, total_rows,
                                                     validated=vocab_from is None)
        _complete_counts(counts, splits)
        manifest = _manifest(meds_dir, vocab_from, tokenizer, len(files), counts, unassigned, total_rows, workers, started)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        write_store_info(staging, sizes, len(tokenizer.vocab), {"tokenizer": Tokenizer.__module__})
    return manifest


def tokenizer_config(config: Path | dict | None = None, max_time: str | None = None,
                     vocab_from: Path | None = None) -> TokenizerConfig | None:
    """The config the options ask for: the reused store's (``vocab_from``) or the defaults, overridden field by
    field by ``config`` (a YAML file or a mapping of its fields), then ``max_time`` (``now``, ``none`` or an ISO
    date); None when no option changes anything."""
    if config is None and max_time is None:
        return None
    base = Tokenizer.load(vocab_from).config if vocab_from is not None else None
    if isinstance(config, dict):
        config = TokenizerConfig.from_dict(config, source="tokenizer config", base=base)
    elif config is not None:
        config = TokenizerConfig.load(config, base=base)
    if max_time is not None:
        config = replace(config or base or TokenizerConfig(), max_time=None if max_time == "none" else max_time).validate()
    return config


# -- command line ---------------------------------------------------------------------------------------------


def _max_time_rule(config: TokenizerConfig) -> str:
    if config.max_time is None:
        return "max_time none: no check for future dates"
    return f"max_time {config.max_time}: events after it are {'errors' if config.future_events == 'error' else 'dropped'}"


def run_cli(args) -> int:
    config = tokenizer_config(args.config, args.max_time, args.vocab_from)
    manifest = tokenize_dataset(args.meds_dir, args.out, config=config, vocab_from=args.vocab_from,
                                workers=args.workers, overwrite=args.overwrite, progress=True)
    print(f"token store written to {args.out} ({manifest['vocab_size']} tokens in the vocabulary; "
          f"{_max_time_rule(TokenizerConfig.load(args.out / 'tokenizer.yaml'))})")
    print(f"{'split':<10}{'subjects':>10}{'visits':>12}{'tokens':>14}{'events in':>14}{'dropped':>12}{'UNK share':>11}")
    for split, c in manifest["splits"].items():
        print(f"{split:<10}{c['subjects_out']:>10,}{c['visits']:>12,}{c['tokens_out']:>14,}{c['events_in']:>14,}"
              f"{sum(c['dropped'].values()):>12,}{c['unk_share']:>11.2%}")
    dropped = {}
    for c in manifest["splits"].values():
        add_counts(dropped, {"dropped": c["dropped"], "replaced": c["replaced"], "duplicates": c["duplicates_collapsed"]})
    reasons = ", ".join(f"{k} {v:,}" for k, v in dropped["dropped"].items() if v)
    print(f"dropped by reason: {reasons or 'none'}; duplicates collapsed within a visit: {dropped['duplicates']:,}")
    replaced = ", ".join(f"{k} {v:,}" for k, v in dropped["replaced"].items() if v)
    print(f"replaced: {replaced or 'none'}")
    without_events = sum(c["subjects_without_events"] for c in manifest["splits"].values())
    without_visits = sum(c.get("subjects_without_visits", 0) for c in manifest["splits"].values())
    if without_events or without_visits:
        print(f"subjects in subject_splits.parquet without any event: {without_events:,}; "
              f"subjects with only static rows (no visit): {without_visits:,}")
    if manifest["unassigned"]["events"]:
        print(f"events of subjects without a split (dropped): {manifest['unassigned']['events']:,} "
              f"({manifest['unassigned']['subjects']:,} subjects)")
    if args.vocab_from is not None:
        print(f"share of events that became UNK with the vocabulary of {args.vocab_from}: {manifest['unk_share']:.2%}")
    print(f"{manifest['events_in']:,} events in {manifest['seconds']:.1f}s ({manifest['events_per_second']:,} events/s)")
    return 0
