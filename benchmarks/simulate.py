"""Throughput and peak memory of `nextvisit simulate`.

    .venv/bin/python -m benchmarks.simulate [--sizes 10000 100000] [--workers N]

Each size runs in a fresh process (so peak memory is that run's alone) and prints subjects per second and
the peak resident memory of the main process and of the largest worker. Memory must not grow with N: the
dataset is streamed by chunks into shards of at most 50,000 subjects. On a shared machine the figures are
noisy; run twice and compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from nextvisit.data.simulate import simulate
n, out, workers = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
stats = simulate(n, out, seed=0, workers=workers, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "visits": stats["visits"], "events": stats["events"],
                  "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    print(f"{'subjects':>9} {'workers':>7} {'seconds':>8} {'subjects/s':>10} {'events/s':>10} "
          f"{'main MiB':>8} {'worker MiB':>10}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run([sys.executable, "-c", CHILD, str(n), str(Path(tmp) / "meds"), str(workers)],
                                    capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{n:>9} {workers:>7} {r['seconds']:>8.1f} {n / r['seconds']:>10.0f} {r['events'] / r['seconds']:>10.0f} "
              f"{r['main_peak_mib']:>8.0f} {r['worker_peak_mib']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
