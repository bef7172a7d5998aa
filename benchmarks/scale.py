"""The whole chain at health-system scale: wall time and peak memory of every stage at 10k, 100k and 1M
simulated subjects, and how each grows with N.

    .venv/bin/python -m benchmarks.scale                          # 10k and 100k (about 25 minutes on 2 cores)
    .venv/bin/python -m benchmarks.scale --sizes 1000000          # the 1M run (hours on 2 cores; resumable)
    .venv/bin/python -m benchmarks.scale --sizes 10000 100000 1000000 --table   # print what is measured so far

Stages per size, each the real command in a fresh process: ``simulate`` (2 workers), ``tokenize`` (2 workers),
``pretrain`` (the tiny preset: builds the training plan over the whole store, then 50 optimizer steps),
``label`` dementia and knee OA, ``forecast`` 100,000 label rows (dementia's, a seeded sample; all of them when
there are fewer), ``counts`` (the count baseline on the same rows: fit on their train rows, selected on tuning,
scored on all), ``evaluate`` the forecast with 1,000 subject-level bootstrap resamples.

**Resumable by stage.** Each stage writes ``WORK/<size>/<stage>/`` and, when it succeeded, ``<stage>.json``
(seconds, peak memory, exit status); a rerun skips finished stages, so a 1M study can span sessions. A failed
or interrupted stage is rerun from scratch (its half-written output is replaced: every command writes through
a staging folder). ``--redo STAGE`` reruns one stage.

**Peak memory** is the largest resident set of any one process of the stage (``ru_maxrss`` of the waited
children): for the stages with worker processes (simulate, tokenize) the main process and the workers run
at the same time, so their total can be up to main + 2 x that figure; the table prints the stage's CPU
seconds beside its wall time (the machine is shared: CPU time is the steadier figure).

**Growth exponent**: log(t_1M / t_100k) / log(10) (1 = linear in N; 0 = flat), for time and for memory, once
both sizes are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("simulate", "tokenize", "pretrain", "label_dementia", "label_knee_oa", "subset", "forecast", "counts",
          "evaluate")
SCORED_ROWS = 100_000

WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": done.returncode, "seconds": time.perf_counter() - start,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}))
"""

SUBSET = r"""
import shutil, sys
from pathlib import Path
import polars as pl
source, out, rows, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
labels = pl.read_parquet(source / "labels.parquet")
decided = labels.filter(pl.col("boolean_value").is_not_null())
chosen = decided.sample(n=min(rows, decided.height), seed=seed).sort("subject_id", "prediction_time")
tmp = out.with_name(out.name + ".partial")
shutil.rmtree(tmp, ignore_errors=True)
shutil.copytree(source, tmp)
chosen.write_parquet(tmp / "labels.parquet")
(tmp / "SUBSET.txt").write_text(f"{chosen.height} of the {decided.height} decided rows of {source}, seed {seed}\n")
shutil.rmtree(out, ignore_errors=True)
tmp.rename(out)
print(f"{chosen.height} rows")
"""


def commands(size: int, work: Path) -> dict[str, list[str]]:
    nv = [sys.executable, "-m", "nextvisit.cli"]
    w = work / str(size)
    return {
        "simulate": nv + ["simulate", "--subjects", str(size), "--out", str(w / "meds"), "--workers", "2",
                          "--overwrite"],
        "tokenize": nv + ["tokenize", str(w / "meds"), "--out", str(w / "store"), "--workers", "2", "--overwrite"],
        "pretrain": nv + ["pretrain", str(w / "store"), "--out", str(w / "run"), "--preset", "tiny", "--max-steps",
                          "50", "--device", "cpu"],
        "label_dementia": nv + ["label", str(w / "meds"), "dementia", "--out", str(w / "labels_dementia"),
                                "--overwrite"],
        "label_knee_oa": nv + ["label", str(w / "meds"), "knee_oa", "--out", str(w / "labels_knee_oa"), "--overwrite"],
        "subset": [sys.executable, "-c", SUBSET, str(w / "labels_dementia"), str(w / "labels_scored"),
                   str(SCORED_ROWS), "0"],
        "forecast": nv + ["forecast", str(w / "run"), str(w / "meds"), str(w / "labels_scored"), "--out",
                          str(w / "forecast"), "--splits", "all", "--device", "cpu", "--overwrite"],
        "counts": nv + ["baseline", "counts", str(w / "meds"), str(w / "labels_scored"), "--out", str(w / "counts"),
                        "--overwrite"],
        "evaluate": nv + ["evaluate", str(w / "forecast"), "--out", str(w / "report"), "--bootstrap", "1000",
                          "--overwrite"],
    }


def run_stage(size: int, stage: str, work: Path, redo: bool) -> dict | None:
    folder = work / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{stage}.json"
    if record.exists() and not redo:
        result = json.loads(record.read_text())
        print(f"  {size:>9,} {stage:<15} done before: {result['seconds']:8.1f} s, {result['peak_mib']:7.0f} MiB")
        return result
    if stage == "pretrain" and (folder / "run").exists():
        shutil.rmtree(folder / "run")  # an interrupted pretraining: start over (50 steps, no resume needed)
    command = commands(size, work)[stage]
    log = folder / f"{stage}.log"
    print(f"  {size:>9,} {stage:<15} running ... (log {log})", flush=True)
    out = subprocess.run([sys.executable, "-c", WRAPPER, str(log), *command], capture_output=True, text=True,
                         env={**os.environ, "TQDM_MININTERVAL": "30"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(size=size, stage=stage, load_average=os.getloadavg()[0])
    if result["rc"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print(f"  {size:>9,} {stage:<15} FAILED (exit {result['rc']}): {' | '.join(tail)}")
        return None
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  {size:>9,} {stage:<15} {result['seconds']:8.1f} s wall, {result['cpu_seconds']:8.1f} s CPU, "
          f"{result['peak_mib']:7.0f} MiB peak", flush=True)
    return result


# The paper's system ("Foundation Models for Clinical Records at Health System Scale", arXiv 2507.00574):
# 1.29M patients, about 611M tokens.
PAPER_SUBJECTS, PAPER_TOKENS = 1_290_000, 611_000_000


def _tokens(work: Path, size: int) -> int | None:
    store = work / str(size) / "store" / "store.json"
    if not store.exists():
        return None
    return sum(split["tokens"] for split in json.loads(store.read_text())["splits"].values())


def projection(results: dict, work: Path) -> list[str]:
    """Each stage at the paper's scale from the 1M measurement and the 100k->1M exponents, N taken as tokens
    (the paper's 611M against the 1M store's): CPU seconds (steadier than wall time on a shared machine) and peak
    memory. forecast, counts and evaluate score a fixed 100,000 rows at every size; so does the projection."""
    tokens = _tokens(work, 1_000_000)
    if not tokens:
        return []
    ratio = PAPER_TOKENS / tokens
    lines = ["", f"Projected to the paper's scale ({PAPER_SUBJECTS / 1e6:.2f}M subjects, {PAPER_TOKENS / 1e6:.0f}M tokens: "
             f"{ratio:.2f}x the 1M store's {tokens / 1e6:.1f}M tokens), t_1M x ratio^exponent:",
             "| stage | CPU s | peak MiB |", "|---|---|---|"]
    for stage in STAGES:
        a, b = results.get((100_000, stage)), results.get((1_000_000, stage))
        if not (a and b) or min(a["cpu_seconds"], b["cpu_seconds"]) <= 0:
            continue
        cpu_exponent = math.log(b["cpu_seconds"] / a["cpu_seconds"]) / math.log(10)
        memory_exponent = math.log(b["peak_mib"] / a["peak_mib"]) / math.log(10)
        lines.append(f"| {stage} | {b['cpu_seconds'] * ratio ** cpu_exponent:,.0f} | "
                     f"{b['peak_mib'] * ratio ** memory_exponent:,.0f} |")
    return lines


def _events(work: Path, size: int) -> int | None:
    manifest = work / str(size) / "store" / "manifest.json"
    return json.loads(manifest.read_text())["events_in"] if manifest.exists() else None


def table(sizes: list[int], work: Path) -> str:
    results = {}
    for size in sizes:
        for stage in STAGES:
            record = work / str(size) / f"{stage}.json"
            if record.exists():
                results[size, stage] = json.loads(record.read_text())
    lines = ["| stage | " + " | ".join(f"{s:,}: s (CPU s), MiB" for s in sizes) + " | growth 100k->1M: time, memory |",
             "|---|" + "---|" * len(sizes) + "---|"]
    for stage in STAGES:
        cells = []
        for size in sizes:
            r = results.get((size, stage))
            cells.append(f"{r['seconds']:.1f} ({r['cpu_seconds']:.0f}), {r['peak_mib']:.0f}" if r else "–")
        growth = "–"
        a, b = results.get((100_000, stage)), results.get((1_000_000, stage))
        if a and b:
            growth = (f"{math.log(b['seconds'] / a['seconds']) / math.log(10):.2f}, "
                      f"{math.log(b['peak_mib'] / a['peak_mib']) / math.log(10):.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")
    totals = []
    for size in sizes:
        done = [results[size, s]["seconds"] for s in STAGES if (size, s) in results]
        events = _events(work, size)
        rate = ""
        if (size, "tokenize") in results and events:
            rate = f", tokenize {events / results[size, 'tokenize']['seconds'] / 1e6:.2f}M events/s ({events:,} events)"
        totals.append(f"{size:,}: {len(done)}/{len(STAGES)} stages, {sum(done) / 60:.1f} min{rate}")
    return "\n".join(lines + ["", "; ".join(totals)] + projection(results, work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/nextvisit-scale"),
                        help="working folder, one subfolder per size (default /tmp/nextvisit-scale)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run (default all)")
    parser.add_argument("--redo", default="", help="comma-separated stages to rerun even when finished")
    parser.add_argument("--table", action="store_true", help="print the table of what is measured, run nothing")
    args = parser.parse_args()
    wanted = [s for s in args.stages.split(",") if s]
    unknown = [s for s in wanted + [s for s in args.redo.split(",") if s] if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    if not args.table:
        for size in args.sizes:
            started = time.perf_counter()
            for stage in STAGES:
                if stage in wanted and run_stage(size, stage, args.work, stage in args.redo.split(",")) is None:
                    break
            print(f"  {size:>9,} chain this run: {(time.perf_counter() - started) / 60:.1f} min")
    print(table(sorted(set(args.sizes) | {s for s in (10_000, 100_000, 1_000_000) if (args.work / str(s)).exists()}),
                args.work))


if __name__ == "__main__":
    main()
