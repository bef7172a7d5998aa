"""Tokenizer throughput and peak memory at 10k and 100k simulated subjects, beside a straightforward pandas
implementation of the same tokenization (the reference, written below).

    .venv/bin/python -m benchmarks.tokenize --skip-pandas-above 50000   # 10k and 100k subjects
    .venv/bin/python -m benchmarks.tokenize --subjects 10000 --workers 2

Data come from ``nextvisit simulate`` (cached under --data, default /tmp/nextvisit-bench). Each run is a fresh
subprocess, so its peak resident memory (``ru_maxrss``) is its own: for nextvisit the main process and the
largest worker process are reported separately (workers run concurrently, so the total peak is at most
main + workers x worker). Timings on a shared machine are noisy: the load average is printed beside them,
and so is the CPU time of each run (its processes together), which the load disturbs much less.
Targets (issue 3): at least 1M events/s on 2 cores, at least 5x the pandas reference, peak memory flat from
10k to 100k subjects.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve()
# This file's name shadows the standard library's `tokenize` (imported by pandas, linecache, ...): keep its
# folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402


# -- the pandas reference: the obvious implementation, whole dataset in memory -------------------------------
def pandas_reference(meds_dir: Path, min_count: int = 10) -> dict:
    """Same rules as nextvisit's tokenizer (train-only vocabulary and lab z-scores, 7 z bins, |z| > 10 dropped,
    calendar-day visits with duplicates collapsed, age token per visit, demographics on the first visit),
    written the way one would first write it with pandas: the whole dataset in memory, vectorized per column,
    arrays built in memory (no store written)."""
    import numpy as np
    import pandas as pd

    data = pd.concat([pd.read_parquet(p) for p in sorted((meds_dir / "data").glob("*.parquet"))], ignore_index=True)
    splits = pd.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    data = data.merge(splits, on="subject_id", how="inner")
    data["day"] = (data["time"].dt.floor("D") - pd.Timestamp("1970-01-01")).dt.days
    births = data[data["code"] == "MEDS_BIRTH"].groupby("subject_id")["day"].min().rename("birth_day")
    deaths = data[data["code"] == "MEDS_DEATH"].groupby("subject_id")["day"].min().rename("death_day")
    data = data.join(births, on="subject_id").join(deaths, on="subject_id")
    data = data[data["code"] != "MEDS_BIRTH"]
    static = data["time"].isna() | data["code"].str.startswith(("GENDER//", "RACE//", "ETHNICITY//"))
    data["demographic"] = static
    data = data[static | ~((data["day"] < data["birth_day"]) | (data["day"] > data["death_day"]))]

    train = data[data["split"] == "train"]
    values = train[train["numeric_value"].notna() & ~train["demographic"]]
    stats = values.groupby("code")["numeric_value"].agg(["count", "mean", "std"])
    stats = stats[(stats["count"] >= max(min_count, 2)) & (stats["std"] > 0)]
    counts = train.groupby("code").size()
    n_values = values.groupby("code").size().reindex(counts.index, fill_value=0)
    plain_counts = counts - n_values.where(counts.index.isin(stats.index), 0)
    edges = [-10, -3, -1, -0.5, 0.5, 1, 3, 10]
    labels = [f"z[{a:g},{b:g})" for a, b in zip(edges, edges[1:])]
    vocab = ["PAD", "SEP", "MASK", "CLS", "UNK", "EOW"]
    ages = [0, 1, 5, 10, 20, 30, 40, 50, 60, 65, 70, 75, 80, 85, 90, 95, 100]
    age_tokens = [f"AGE//{a}-{b}" for a, b in zip(ages, ages[1:])] + ["AGE//100+", "AGE//unknown"]
    vocab += age_tokens
    demographic_codes = set(train.loc[train["demographic"], "code"])
    vocab += sorted(c for c in demographic_codes if plain_counts.get(c, 0) >= min_count)
    for code in sorted(set(counts.index) - demographic_codes):
        if plain_counts[code] >= min_count or code == "MEDS_DEATH":
            vocab.append(code)
        if code in stats.index:
            vocab += [f"{code}|{label}" for label in labels]
    index = {token: i for i, token in enumerate(vocab)}

    data = data.join(stats[["mean", "std"]], on="code")
    z = (data["numeric_value"].astype("float64") - data["mean"]) / data["std"]
    lab = z.notna() & ~data["demographic"]
    data = data[~(lab & (z.abs() > 10))]
    z, lab = z[data.index], lab[data.index]
    bins = pd.cut(z[lab], bins=edges, labels=labels, right=False, include_lowest=True).astype(str)
    data["token"] = data["code"]
    data.loc[lab, "token"] = data.loc[lab, "code"] + "|" + bins
    data["token_id"] = data["token"].map(index).fillna(4).astype("int64")

    # visits: demographics join the first visit; duplicates collapse; an age token opens every visit
    data["rank"] = np.where(data["demographic"], 1, 2)
    first_day = data[~data["demographic"]].groupby("subject_id")["day"].min().rename("first_day")
    data = data.join(first_day, on="subject_id")
    data = data[data["first_day"].notna()]
    data["day"] = data["day"].where(~data["demographic"], data["first_day"])
    data = data.drop_duplicates(["subject_id", "day", "rank", "token_id"])
    visits = data.drop_duplicates(["subject_id", "day"])[["subject_id", "day", "birth_day", "split"]].copy()
    years = (visits["day"] - visits["birth_day"]) / 365.25
    bucket = np.clip(np.searchsorted(ages, years, side="right") - 1, 0, len(ages) - 1)
    bucket = np.where(visits["birth_day"].isna(), len(ages), bucket)
    visits["token_id"] = np.asarray([index[t] for t in age_tokens])[bucket]
    visits["rank"] = 0
    columns = ["split", "subject_id", "day", "rank", "token_id"]
    ordered = pd.concat([visits[columns], data[columns]]).sort_values(columns[1:])
    out = {}
    for split, frame in ordered.groupby("split"):
        tokens = frame["token_id"].to_numpy(np.int32)
        visit_lengths = frame.groupby(["subject_id", "day"], sort=False).size().to_numpy()
        subject_visits = frame.drop_duplicates(["subject_id", "day"]).groupby("subject_id", sort=False).size().to_numpy()
        assert visit_lengths.sum() == len(tokens) and subject_visits.sum() == len(visit_lengths)
        out[split] = len(tokens)
    return {"tokens": out, "vocab_size": len(vocab)}


# -- measuring in a fresh process ---------------------------------------------------------------------------
def _child(kind: str, meds_dir: str, workers: int, out: str) -> None:
    started = time.perf_counter()
    if kind == "nextvisit":
        from nextvisit.tokenize.config import TokenizerConfig
        from nextvisit.tokenize.dataset import tokenize_dataset

        manifest = tokenize_dataset(Path(meds_dir), Path(out), TokenizerConfig(), workers=workers or None,
                                    overwrite=True, progress=False)
        events = manifest["events_in"]
        tokens = {s: c["tokens_out"] for s, c in manifest["splits"].items()}
    else:
        result = pandas_reference(Path(meds_dir))
        import pyarrow.parquet as pq

        events = sum(pq.read_metadata(p).num_rows for p in (Path(meds_dir) / "data").glob("*.parquet"))
        tokens = result["tokens"]
    seconds = time.perf_counter() - started
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu, "events": events, "tokens": tokens,
        "peak_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def measure(kind: str, meds_dir: Path, workers: int, out: Path) -> dict:
    result = subprocess.run([sys.executable, str(HERE), "--child", kind, str(meds_dir), str(workers), str(out)],
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def dataset(n_subjects: int, root: Path, workers: int) -> Path:
    path = root / f"sim{n_subjects}"
    if not (path / "metadata" / "subject_splits.parquet").exists():
        from nextvisit.data.simulate import simulate

        print(f"simulating {n_subjects:,} subjects into {path} ...", file=sys.stderr)
        simulate(n_subjects, path, seed=0, workers=workers, overwrite=True, progress=False)
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=0,
                        help="nextvisit worker processes (default 0: its own choice, at most the CPUs)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/nextvisit-bench"))
    parser.add_argument("--skip-pandas-above", type=int, default=10**9, help="skip the pandas reference above this size")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.subjects:
        meds_dir = dataset(n, args.data, args.workers or None)
        load = os.getloadavg()[0]
        ours = measure("nextvisit", meds_dir, args.workers, args.data / f"store{n}")
        row = {"subjects": n, "events": ours["events"], "load": load, "nextvisit": ours}
        if n <= args.skip_pandas_above:
            row["pandas"] = measure("pandas", meds_dir, 1, args.data / "unused")
            if row["pandas"]["tokens"] != ours["tokens"]:
                print(f"note: token counts differ from the reference: {row['pandas']['tokens']} vs {ours['tokens']}",
                      file=sys.stderr)
        rows.append(row)
    print(f"{'subjects':>9} {'events':>12} {'impl':<10} {'seconds':>8} {'events/s':>12} {'speed-up':>9} "
          f"{'CPU s':>7} {'events/CPU s':>13} {'peak main MB':>13} {'peak worker MB':>15} {'load avg':>9}")
    for row in rows:
        for kind in ("nextvisit", "pandas"):
            if kind not in row:
                continue
            r = row[kind]
            rate = row["events"] / r["seconds"]
            speedup = row["pandas"]["seconds"] / r["seconds"] if "pandas" in row else float("nan")
            workers = f"{r['peak_worker_mb']:.0f}" if kind == "nextvisit" else "-"
            print(f"{row['subjects']:>9,} {row['events']:>12,} {kind:<10} {r['seconds']:>8.1f} {rate:>12,.0f} "
                  f"{speedup:>8.1f}x {r['cpu_seconds']:>7.1f} {row['events'] / r['cpu_seconds']:>13,.0f} "
                  f"{r['peak_main_mb']:>13.0f} {workers:>15} {row['load']:>9.1f}")


if __name__ == "__main__":
    main()
