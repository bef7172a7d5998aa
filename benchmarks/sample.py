"""Monte Carlo trajectories per second of ``nextvisit sample`` (``nextvisit.predict.sample``) with its KV cache,
beside re-encoding the window at every step, for the ``tiny`` and ``small`` presets.

    .venv/bin/python -m benchmarks.sample [--presets tiny,small] [--repeats 3] [--device cpu] [--json FILE]

**Model and data** (cached in ``--work``; a rerun skips what is built, the stages of ``benchmarks.quality``):
``nextvisit simulate`` (``--subjects``, seed 0), ``tokenize``, ``label ... dementia``, and per preset a short
``nextvisit pretrain`` so that trajectories look like records (a random-init model draws half the vocabulary at
every visit, the death token included, so every trajectory ends at its first visit). The pretraining uses the
BCE loss (``--loss``) with the output bias at the code-frequency baseline, which for BCE is each code's
calibrated base rate, so a few steps already give records of realistic size (small: ``model.output_bias:
true``, 4 contexts per step, a 5-step warm-up; tiny's preset as it is). ``--loss focal`` (the presets' own)
works as well: the sampler reads each logit back as the probability it stands for under the run's loss
(``nextvisit.model.losses.implied_probability``); 150 focal steps of tiny gave 14.0 codes per sampled visit.
Histories: ``--histories`` distinct (subject, prediction time) pairs of the tuning and
held_out label rows, drawn with ``--seed``, read and tokenized as ``sample()`` does (``read_histories`` +
``tokenized_histories``), horizons from their label rows (730 and 1825 days).

**Tables**, per preset:

1. *KV cache vs recompute*: ``Sampler.roll`` on the same histories with the same seed, ``SampleConfig(cache=True)``
   and ``cache=False`` (every step re-encodes the whole window), taking turns for ``--repeats`` rounds after
   one warm-up roll each, so a busy neighbour slows both alike. Trajectories/s and generated tokens/s (the
   tokens of the generated visits, age token included, as ``sampling.json`` counts them) from the median
   seconds; the speedup (median / median, and the lowest and highest of a single round) against the 5x
   target; and the number of trajectories whose days, visit tokens or end differ between the two (the cache
   must give what the recompute gives; a mismatch is printed with its first differing visit, never hidden).
2. *Cost of N* (cached): samples N = ``--grid`` (1, 4, 16, 64) per history on ``--grid-histories``
   histories, one pass each, ``--batch-size`` trajectories at most per batch (the sampler's default 256):
   seconds, seconds per history, trajectories/s, tokens/s, the batch the sampler filled, the size of its KV
   cache (``KVCache.nbytes`` of one batch), and peak memory during the roll: the process's peak RSS on CPU
   (Linux's VmHWM, reset before each roll through ``/proc/self/clear_refs``; where that cannot be reset, the
   process's peak since start, labelled) or torch's allocator peak on CUDA, with its rise over the level before
   the roll (the roll's own working memory: the cache, up to two copies of it while finished rows leave the
   batch, and the activations). On CPU the rise also grows with the batches a roll goes through at one batch
   size (tiny, 16 histories x 64 at batch 64: about 720 MB, against 230 MB for one batch of 64) while
   Python-side memory stays under 10 MB (tracemalloc) and the RSS after a roll settles instead of growing from
   roll to roll: the heap fragments under the cache's copies, nothing leaks. The last column counts trajectories that differ from the same (history, sample)
   at the previous N: a trajectory depends only on its seed, not on what else is in its batch (up to float
   rounding, which bfloat16 makes visible).
3. *End to end*: ``nextvisit.predict.sample.sample()`` on a labels folder holding only those histories' rows, at
   the comparison's N (model loading, reading, tokenizing, rolling, risks and trajectory files), beside the
   cached ``Sampler.roll`` of table 1, and whether it generated the same number of tokens.

Per-preset defaults (``PRESET_DEFAULTS``; every option given overrides them for all presets): ``small`` rolls
4 histories (1 for the cost of N) and stops each trajectory after 8 generated visits (``--max-visits``; both
modes alike), since its recompute costs most of a second per trajectory-visit on 2 cores. ``--json FILE`` writes every row.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like standard modules (tokenize.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.quality import Runner  # noqa: E402
from nextvisit.compare import Labels  # noqa: E402
from nextvisit.data.histories import history_table, read_histories  # noqa: E402
from nextvisit.errors import UserError  # noqa: E402
from nextvisit.model.run import load_next_visit_run, read_tokenizer, resolve_device  # noqa: E402
from nextvisit.predict.horizon import rows_to_score, tokenized_histories  # noqa: E402
from nextvisit.predict.sample import Counts, History, SampleConfig, Sampler, Trajectory, sample  # noqa: E402
from nextvisit.predict.scoring import SCORED_SPLITS, condition_token_ids  # noqa: E402
from nextvisit.tasks import labels_path  # noqa: E402

TASK = "dementia"
SPEEDUP_TARGET = 5.0
MB = 2**20


@dataclass
class PresetPlan:
    """What one preset is measured with (``PRESET_DEFAULTS``, then the command line)."""

    pretrain_steps: int
    histories: int  # table 1 and 3
    samples: int  # N of table 1 and 3
    max_visits: int  # generated visits per trajectory (both modes alike)
    grid_histories: int  # table 2
    pretrain: dict  # the pretraining YAML over the preset


# The sampler's own max_visits (500) is no cap in practice: horizons of 730 and 1825 days end trajectories first.
PRESET_DEFAULTS = {
    "tiny": PresetPlan(pretrain_steps=150, histories=16, samples=4, max_visits=500, grid_histories=16,
                       pretrain={}),
    # 4 contexts per step and a 5-step warm-up: the preset's 64 contexts and 500 warm-up steps take hours on CPU
    "small": PresetPlan(pretrain_steps=16, histories=4, samples=2, max_visits=8, grid_histories=1,
                        pretrain={"model": {"output_bias": True},
                                  "train": {"batch_contexts": 4, "micro_batch": 4, "warmup_steps": 5,
                                            "eval_contexts": 8}}),
}


def plan_for(preset_name: str, args) -> PresetPlan:
    if preset_name not in PRESET_DEFAULTS:
        raise UserError(f"--presets: no benchmark defaults for preset {preset_name!r}; expected "
                        f"{', '.join(PRESET_DEFAULTS)}")
    plan = PRESET_DEFAULTS[preset_name]
    given = {name: getattr(args, name) for name in ("pretrain_steps", "histories", "samples", "max_visits",
                                                    "grid_histories") if getattr(args, name) is not None}
    return replace(plan, **given)


def pretrain_yaml(plan: PresetPlan, loss: str) -> dict:
    """The pretraining overrides: the plan's, the loss kind, and a cosine decay that ends at the last step."""
    config = json.loads(json.dumps(plan.pretrain))
    config.setdefault("loss", {})["kind"] = loss
    config.setdefault("train", {})["decay_steps"] = plan.pretrain_steps
    return config


# -- data and runs --------------------------------------------------------------------------------------------


def build(runner: Runner, args, presets: list[str]) -> tuple[Path, Path, dict[str, Path]]:
    """(MEDS folder, labels folder, run folder per preset), each built once per ``--work``."""
    import yaml

    simulated = runner.stage("simulate", {"subjects": args.subjects, "seed": 0})
    runner.cli(simulated, f"simulate {args.subjects:,} subjects",
               ["simulate", "--subjects", args.subjects, "--seed", 0, "--out", simulated.out])
    store = runner.stage("tokenize", {}, meds=simulated)
    runner.cli(store, "tokenize", ["tokenize", simulated.out, "--out", store.out])
    labels = runner.stage(f"label_{TASK}", {}, meds=simulated)
    runner.cli(labels, f"label {TASK}", ["label", simulated.out, TASK, "--out", labels.out])
    runs = {}
    for name in presets:
        plan = plan_for(name, args)
        config = pretrain_yaml(plan, args.loss)
        stage = runner.stage(f"pretrain_{name}", {"preset": name, "steps": plan.pretrain_steps, "config": config,
                                                  "device": args.device}, store=store)
        runner.cli(stage, f"pretrain {name} ({plan.pretrain_steps} steps, {args.loss} loss)",
                   ["pretrain", store.out, "--out", stage.out, "--preset", name, "--config",
                    stage.folder / "pretrain.yaml", "--max-steps", plan.pretrain_steps, "--device", args.device],
                   files={"pretrain.yaml": yaml.safe_dump(config, sort_keys=False)})
        runs[name] = stage.out
    return simulated.out, labels.out, runs


def chosen_histories(labels_dir: Path, count: int, seed: int) -> pl.DataFrame:
    """``count`` distinct (subject_id, prediction_time) of the labelled tuning and held_out rows, drawn with
    ``seed``, as the scored label rows that hold them (``sample()``'s own selection of rows)."""
    labels = Labels.load(labels_dir, require_train=False)
    rows, _ = rows_to_score(labels.rows.drop("row", "history_id"), SCORED_SPLITS)
    keys = rows.select("subject_id", "prediction_time").unique().sort("subject_id", "prediction_time")
    if keys.height < count:
        raise UserError(f"{labels_path(labels_dir)}: {keys.height} labelled tuning/held_out histories, fewer than "
                        f"--histories {count}; simulate more subjects (--subjects)")
    keys = keys.sample(n=count, seed=seed).sort("subject_id", "prediction_time")
    return rows.join(keys, on=["subject_id", "prediction_time"], how="semi")


def read_histories_of(rows: pl.DataFrame, meds_dir: Path, labels_dir: Path, tokenizer) -> list[History]:
    """The ``History`` of each distinct (subject, prediction time) of ``rows``, cut and tokenized as ``sample()``
    does, in (subject, prediction time) order, with the sorted horizons of its rows."""
    task = Labels.load(labels_dir, require_train=False).task
    horizons = {(s, p): sorted(h) for s, p, h in rows.group_by("subject_id", "prediction_time").agg(
        pl.col("horizon_days").unique()).iter_rows()}
    histories = []
    for _, tokenized in tokenized_histories(read_histories(meds_dir, history_table(rows), task.remove_from_inputs),
                                            tokenizer):
        histories += [History(subject, subject_id, when, horizons[(subject_id, when)])
                      for _, subject_id, when, subject in tokenized]
    return sorted(histories, key=lambda h: (h.subject_id, h.prediction_time))


# -- measuring ------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of one measured block: torch's allocator on CUDA; on CPU the process's peak RSS (VmHWM),
    reset before the block by writing 5 to /proc/self/clear_refs (Linux), else the peak since the process
    started (``kind`` says which). Before the block, freed heap goes back to the system (glibc's malloc_trim)
    so that the rise over the level before is memory the block itself needed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda allocator" if device.type == "cuda" else "peak RSS"
        self.before = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the rise may then be understated
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "peak RSS since start"
        self.before = _status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_roll(sampler: Sampler, histories: list[History], memory: PeakMemory | None = None) -> tuple[dict, list]:
    """(figures, trajectories) of one ``Sampler.roll``."""
    if memory is not None:
        memory.start()
    _synchronize(sampler.device)
    started = time.perf_counter()
    trajectories = sampler.roll(histories)
    _synchronize(sampler.device)
    seconds = time.perf_counter() - started
    counts = Counts()
    for t in trajectories:
        counts.add(t)
    figures = {"seconds": seconds, "trajectories": counts.trajectories, "visits": counts.visits,
               "generated_tokens": counts.generated_tokens, "slides": counts.slides, "ended": counts.ended}
    if memory is not None:
        peak = memory.peak()
        figures.update(memory=memory.kind, peak_bytes=peak, peak_rise_bytes=peak - memory.before)
    return figures, trajectories


def trajectory_key(t: Trajectory) -> tuple:
    return t.history.subject_id, t.history.prediction_time, t.sample


def differences(reference: list[Trajectory], other: list[Trajectory]) -> tuple[int, str | None]:
    """(trajectories of ``reference`` whose days, visit tokens or end differ in ``other``, where the first one
    differs). Trajectories are matched by (subject, prediction time, sample); one missing from ``other``
    counts as a difference."""
    by_key = {trajectory_key(t): t for t in other}
    count, first = 0, None
    for a in reference:
        b = by_key.get(trajectory_key(a))
        where = "missing" if b is None else _first_difference(a, b)
        if where is None:
            continue
        count += 1
        if first is None:
            first = f"subject {a.history.subject_id} at {a.history.prediction_time}, sample {a.sample}: {where}"
    return count, first


def _first_difference(a: Trajectory, b: Trajectory) -> str | None:
    for i, (day_a, day_b, visit_a, visit_b) in enumerate(zip(a.days, b.days, a.visits, b.visits)):
        if day_a != day_b or not np.array_equal(visit_a, visit_b):
            return (f"visit {i + 1}: day {day_a} with {len(visit_a)} tokens vs day {day_b} with {len(visit_b)} "
                    f"tokens ({len(np.setxor1d(visit_a, visit_b))} tokens in one only)")
    if len(a.visits) != len(b.visits) or a.end != b.end:
        return f"{len(a.visits)} visits ending in {a.end} vs {len(b.visits)} ending in {b.end}"
    return None


def cache_nbytes(sampler: Sampler, rows: int) -> int:
    """``KVCache.nbytes`` of the cache the sampler allocates for a batch of ``rows`` trajectories (built on the
    meta device: its size, no memory)."""
    dtype = torch.bfloat16 if sampler.precision == "bf16" else sampler.model.embed.weight.dtype
    return sampler.model.new_cache(rows, sampler.capacity, torch.device("meta"), dtype).nbytes()


def batch_rows(histories: int, samples: int, batch_size: int) -> int:
    """The largest batch ``Sampler.roll`` forms: whole histories' samples, at most ``batch_size`` trajectories.

    >>> batch_rows(16, 4, 256), batch_rows(16, 64, 256), batch_rows(1, 64, 16), batch_rows(3, 100, 256)
    (64, 256, 16, 200)
    """
    per_batch = min(max(1, batch_size // samples), histories)
    return min(per_batch * samples, batch_size)


def rates(figures: dict) -> dict:
    seconds = max(figures["seconds"], 1e-9)
    return {"trajectories_per_s": figures["trajectories"] / seconds,
            "generated_tokens_per_s": figures["generated_tokens"] / seconds}


# -- the tables -----------------------------------------------------------------------------------------------


def compare_cache(name, model, vocab, tokenizer, run_config, condition, histories, plan, args) -> dict:
    """Table 1: cached and recomputed rolls of the same histories, taking turns."""
    samplers = {cache: Sampler(model, vocab, tokenizer, run_config, SampleConfig(
        samples=plan.samples, seed=args.seed, batch_size=args.batch_size, max_visits=plan.max_visits,
        precision=args.precision, cache=cache), condition) for cache in (True, False)}
    for sampler in samplers.values():  # warm-up: allocator, kernels, first-call costs
        sampler.roll(histories[:1])
    seconds = {True: [], False: []}
    figures, trajectories = {}, {}
    repeat_differences = 0
    for _ in range(args.repeats):
        for cache, sampler in samplers.items():
            f, rolled = timed_roll(sampler, histories)
            seconds[cache].append(f["seconds"])
            if cache in trajectories:
                repeat_differences += differences(trajectories[cache], rolled)[0]
            figures[cache], trajectories[cache] = f, rolled
    mismatches, first = differences(trajectories[True], trajectories[False])
    rows = []
    for cache in (True, False):
        f = dict(figures[cache], seconds=float(np.median(seconds[cache])), all_seconds=seconds[cache])
        rows.append({"preset": name, "mode": "cache" if cache else "recompute", "histories": len(histories),
                     "samples": plan.samples, "max_visits": plan.max_visits, **f, **rates(f)})
    per_round = [off / on for on, off in zip(seconds[True], seconds[False])]
    return {"rows": rows, "speedup": rows[1]["seconds"] / rows[0]["seconds"], "speedup_rounds": per_round,
            "mismatches": mismatches, "first_mismatch": first, "repeat_differences": repeat_differences,
            "precision": samplers[True].precision, "window_tokens": samplers[True].limit,
            "cache_capacity": samplers[True].capacity}


def cost_of_n(name, model, vocab, tokenizer, run_config, condition, histories, plan, args) -> list[dict]:
    """Table 2: cached rolls at each N, one pass each, with peak memory and the batch's KV cache size."""
    memory = PeakMemory(next(model.parameters()).device)
    Sampler(model, vocab, tokenizer, run_config, SampleConfig(samples=1, seed=args.seed, max_visits=plan.max_visits,
                                                              precision=args.precision), condition).roll(histories[:1])
    rows, previous = [], None
    for n in args.grid:
        sampler = Sampler(model, vocab, tokenizer, run_config, SampleConfig(
            samples=n, seed=args.seed, batch_size=args.batch_size, max_visits=plan.max_visits,
            precision=args.precision), condition)
        f, rolled = timed_roll(sampler, histories, memory)
        batch = batch_rows(len(histories), n, args.batch_size)
        differ = None
        if previous is not None:
            smaller = {trajectory_key(t) for t in previous}
            differ = differences([t for t in rolled if trajectory_key(t) in smaller], previous)[0]
        rows.append({"preset": name, "samples": n, "histories": len(histories), "max_visits": plan.max_visits,
                     "batch": batch, "kv_cache_bytes": cache_nbytes(sampler, batch),
                     "seconds_per_history": f["seconds"] / len(histories), "differ_from_previous_n": differ,
                     **f, **rates(f)})
        previous = rolled
        del rolled
    return rows


def end_to_end(name, run: Path, meds_dir: Path, labels_dir: Path, rows: pl.DataFrame, plan, args, work: Path) -> dict:
    """Table 3: ``sample()`` on a labels folder holding only the chosen histories' rows."""
    folder = work / f"end_to_end_{name}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "labels").mkdir(parents=True)
    keys = rows.select("subject_id", "prediction_time").unique()
    pl.read_parquet(labels_path(labels_dir)).join(keys, on=["subject_id", "prediction_time"], how="semi") \
        .write_parquet(folder / "labels" / "labels.parquet")
    shutil.copy(labels_dir / "task.yaml", folder / "labels" / "task.yaml")
    config = SampleConfig(samples=plan.samples, seed=args.seed, batch_size=args.batch_size,
                          max_visits=plan.max_visits, precision=args.precision)
    started = time.perf_counter()
    summary = sample(run, meds_dir, folder / "labels", folder / "sample", config, args.device, overwrite=True,
                     progress=False)
    seconds = time.perf_counter() - started
    return {"preset": name, "histories": summary["histories"], "samples": plan.samples, "seconds": seconds,
            "trajectories": summary["trajectories"], "generated_tokens": summary["generated_tokens"],
            "trajectories_per_s": summary["trajectories"] / seconds,
            "generated_tokens_per_s": summary["generated_tokens"] / seconds, "out": str(folder / "sample")}


# -- printing -------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / MB:,.1f}"


def print_comparison(result: dict) -> None:
    print(f"{'preset':<6} {'mode':<9} {'hist':>4} {'N':>3} {'traj':>5} {'visits':>7} {'tokens':>8} {'slides':>6} "
          f"{'seconds':>8} {'traj/s':>8} {'tokens/s':>9} {'speedup':>8} {'rounds':>12}")
    cache = result["rows"][0]
    for row in result["rows"]:
        cached = row is cache
        speed = f"{result['speedup']:.2f}x" if cached else "1.00x"
        spread = f"{min(result['speedup_rounds']):.2f}-{max(result['speedup_rounds']):.2f}x" if cached else ""
        print(f"{row['preset']:<6} {row['mode']:<9} {row['histories']:>4} {row['samples']:>3} "
              f"{row['trajectories']:>5} {row['visits']:>7,} {row['generated_tokens']:>8,} {row['slides']:>6,} "
              f"{row['seconds']:>8.2f} {row['trajectories_per_s']:>8.2f} {row['generated_tokens_per_s']:>9,.0f} "
              f"{speed:>8} {spread:>12}")
    verdict = "met" if result["speedup"] >= SPEEDUP_TARGET else "NOT met"
    ended = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in cache["ended"].items() if v)
    print(f"  speedup (cache over recompute, median seconds) {result['speedup']:.2f}x: target {SPEEDUP_TARGET:g}x "
          f"{verdict}; trajectories differing between cache and recompute: {result['mismatches']} of "
          f"{cache['trajectories']}; between repeats: {result['repeat_differences']}; ended: {ended}")
    if result["first_mismatch"]:
        print(f"  first mismatch: {result['first_mismatch']}")


def print_grid(rows: list[dict]) -> None:
    memory = rows[0]["memory"] if rows else ""
    print(f"{'preset':<6} {'N':>3} {'hist':>4} {'traj':>5} {'batch':>5} {'seconds':>8} {'s/hist':>7} {'traj/s':>8} "
          f"{'tokens/s':>9} {'KV MB':>8} {'peak MB':>8} {'rise MB':>8} {'differ':>6}   ({memory})")
    for row in rows:
        differ = "" if row["differ_from_previous_n"] is None else f"{row['differ_from_previous_n']}"
        print(f"{row['preset']:<6} {row['samples']:>3} {row['histories']:>4} {row['trajectories']:>5} "
              f"{row['batch']:>5} {row['seconds']:>8.2f} {row['seconds_per_history']:>7.2f} "
              f"{row['trajectories_per_s']:>8.2f} {row['generated_tokens_per_s']:>9,.0f} "
              f"{_mb(row['kv_cache_bytes']):>8} {_mb(row['peak_bytes']):>8} {_mb(max(row['peak_rise_bytes'], 0)):>8} "
              f"{differ:>6}")


# -- main -----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets (default tiny,small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for pretraining and sampling (default cpu)")
    parser.add_argument("--histories", type=int, default=None,
                        help="histories of the cache comparison and the end-to-end run (default: tiny 16, small 4)")
    parser.add_argument("--samples", type=int, default=None,
                        help="N of the cache comparison and the end-to-end run (default: tiny 4, small 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the cache comparison (median; default 3)")
    parser.add_argument("--grid", default="1,4,16,64", help="samples per history of the cost-of-N table")
    parser.add_argument("--grid-histories", type=int, default=None,
                        help="histories of the cost-of-N table (default: tiny 16, small 1)")
    parser.add_argument("--max-visits", type=int, default=None,
                        help="generated visits per trajectory at most (default: tiny 500, the sampler's own; small 8)")
    parser.add_argument("--batch-size", type=int, default=SampleConfig.batch_size,
                        help=f"trajectories per batch at most (default {SampleConfig.batch_size}, the sampler's)")
    parser.add_argument("--precision", default=SampleConfig.precision, choices=["auto", "fp32", "bf16"],
                        help="sampling precision (default: the sampler's, fp32; auto: bfloat16 autocast where supported)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed and the draw of histories (default 0)")
    parser.add_argument("--subjects", type=int, default=2000, help="simulated subjects (default 2000)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: tiny 150, small 16)")
    parser.add_argument("--loss", default="bce", choices=["bce", "focal"],
                        help="pretraining loss (default bce: calibrated probabilities; focal: the presets' own)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nextvisit-sample-benchmark"),
                        help="folder of the cached data and runs (default /tmp/nextvisit-sample-benchmark)")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip table 3")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, for the pretraining too (default: torch's); on 2 cores another job "
                             "shares, 1 thread rolled tiny about 10x faster than 2 (measured)")
    parser.add_argument("--json", type=Path, default=None, help="write every row to this JSON file")
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        args.grid = [int(n) for n in args.grid.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--grid: expected comma-separated whole numbers, got {args.grid!r}")
    for name in ("histories", "samples", "grid_histories", "max_visits", "pretrain_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.repeats < 1 or args.batch_size < 1 or not args.grid or min(args.grid) < 1:
        parser.error("--repeats, --batch-size and every --grid value must be at least 1")
    for name in args.presets:
        if name not in PRESET_DEFAULTS:
            parser.error(f"--presets: no benchmark defaults for {name!r}; expected {', '.join(PRESET_DEFAULTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the pretraining processes too
    device = resolve_device(args.device)
    runner = Runner(args.work, rerun="python -m benchmarks.sample " + " ".join(sys.argv[1:]))
    meds_dir, labels_dir, runs = build(runner, args, args.presets)
    print(f"\nsample benchmark on {device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"precision {args.precision}, task {TASK}, seed {args.seed}, {args.loss}-pretrained runs in {args.work}")
    results = {"device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "presets": {}}
    for name in args.presets:
        plan = plan_for(name, args)
        model, vocab, run_config = load_next_visit_run(runs[name], device)
        tokenizer = read_tokenizer(runs[name], vocab=vocab)
        condition = condition_token_ids(Labels.load(labels_dir, require_train=False).task, vocab, str(runs[name]))
        rows = chosen_histories(labels_dir, max(plan.histories, plan.grid_histories), args.seed)
        histories = read_histories_of(rows, meds_dir, labels_dir, tokenizer)
        # histories and keys are in the same (subject, prediction time) order: the comparison's are the first ones
        keys = rows.select("subject_id", "prediction_time").unique().sort("subject_id", "prediction_time")
        comparison_rows = rows.join(keys.head(plan.histories), on=["subject_id", "prediction_time"], how="semi")
        print(f"\n== {name}: {model.n_parameters() / 1e6:.2f}M parameters, vocabulary {len(vocab)}, "
              f"history visits {np.median([h.subject.n_visits for h in histories]):.0f} (median)", flush=True)
        # the cost-of-N rolls first, so their memory figures start from a heap the recompute has not grown
        grid = cost_of_n(name, model, vocab, tokenizer, run_config, condition, histories[:plan.grid_histories],
                         plan, args)
        comparison = compare_cache(name, model, vocab, tokenizer, run_config, condition, histories[:plan.histories],
                                   plan, args)
        print(f"-- KV cache vs recompute: median of {args.repeats} rounds taking turns, {comparison['precision']}, "
              f"window {comparison['window_tokens']} tokens, cache capacity {comparison['cache_capacity']} tokens, "
              f"max {plan.max_visits} generated visits")
        print_comparison(comparison)
        print(f"-- cost of N (cached, one pass each, batches of at most {args.batch_size}; differ: trajectories "
              "unlike the same sample at the previous N)")
        print_grid(grid)
        result = {"plan": asdict(plan), "comparison": comparison, "cost_of_n": grid}
        if not args.no_end_to_end:
            e2e = end_to_end(name, runs[name], meds_dir, labels_dir, comparison_rows, plan, args, args.work)
            cache = comparison["rows"][0]
            same = "same" if e2e["generated_tokens"] == cache["generated_tokens"] else \
                f"NOT the same ({e2e['generated_tokens']:,} vs {cache['generated_tokens']:,})"
            print(f"-- end to end: sample() on {e2e['histories']} histories x {e2e['samples']}: {e2e['seconds']:.2f} s, "
                  f"{e2e['trajectories_per_s']:.2f} trajectories/s, {e2e['generated_tokens_per_s']:,.0f} tokens/s "
                  f"({e2e['trajectories_per_s'] / cache['trajectories_per_s']:.2f}x the cached roll alone); "
                  f"generated tokens {same} as the roll")
            result["end_to_end"] = e2e
        results["presets"][name] = result
        del model
    print()
    for line in runner.timing_lines():
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as exc:
        raise SystemExit(f"error: {exc}")
