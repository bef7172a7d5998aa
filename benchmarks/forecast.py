"""Subjects per second of the zero-shot horizon query on CPU, for the `tiny` and `small` presets, in float32
and in `forecast`'s default precision (bfloat16 autocast where the CPU supports it).

Weights are random (speed does not depend on them). Each synthetic subject has a paper-like history:
visits of about 11 tokens (METHOD.md section 1), enough of them that the query reads the full most recent
``query_max_tokens`` window, so the figure is the per-subject cost of one forward pass at full length.

    .venv/bin/python -m benchmarks.forecast [--subjects 256] [--batch-size 64] [--presets tiny,small]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# A script's own folder comes first on sys.path; benchmarks/tokenize.py would then shadow the standard
# library's tokenize module that torch imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
from dataclasses import dataclass

import numpy as np
import torch

from nextvisit.config import preset
from nextvisit.predict.horizon import score_queries
from nextvisit.model.transformer import NextVisitModel
from nextvisit.tokenize.store import SPECIAL_TOKENS, Subject
from nextvisit.model.run import autocast_for


@dataclass
class BenchmarkConfig:
    subjects: int = 128
    batch_size: int = 64
    vocab_size: int = 4000  # a mid-size clinical vocabulary
    visits_per_subject: int = 60  # long enough that the 511-token window is full
    tokens_per_visit: int = 11  # paper: 11.2 tokens per visit on average
    condition_tokens: int = 12  # tokens aggregated for the risk (e.g. a dementia code set)
    horizon_days: int = 730
    threads: int = 0  # torch CPU threads (0 = torch's default)
    seed: int = 0


def synthetic_subjects(config: BenchmarkConfig) -> list[Subject]:
    rng = np.random.default_rng(config.seed)
    first_code = len(SPECIAL_TOKENS)
    subjects = []
    for i in range(config.subjects):
        n = config.visits_per_subject
        lengths = rng.poisson(config.tokens_per_visit - 1, size=n) + 1
        days = 15_000 + np.cumsum(rng.integers(1, 120, size=n)).astype(np.int32)
        tokens = rng.integers(first_code, config.vocab_size, size=int(lengths.sum())).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        subjects.append(Subject(subject_id=i, birth_day=0, visit_days=days, visit_offsets=offsets, tokens=tokens))
    return subjects


def run(preset_name: str, config: BenchmarkConfig, precision: str = "fp32") -> dict:
    run_config = preset(preset_name)
    run_config.model.vocab_size = config.vocab_size
    torch.manual_seed(config.seed)
    model = NextVisitModel(run_config.model).eval()
    subjects = synthetic_subjects(config)
    condition = torch.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + config.condition_tokens)
    horizons = [config.horizon_days] * len(subjects)
    max_tokens = run_config.data.query_max_tokens
    autocast, used = autocast_for(precision, torch.device("cpu"))
    # warm-up on one batch (allocator, kernels), then the timed pass
    score_queries(model, subjects[: config.batch_size], horizons[: config.batch_size], condition, "sum_logits",
                  max_tokens, config.batch_size, "cpu", autocast=autocast)
    start = time.perf_counter()
    score_queries(model, subjects, horizons, condition, "sum_logits", max_tokens, config.batch_size, "cpu",
                  autocast=autocast)
    seconds = time.perf_counter() - start
    return {"preset": preset_name, "precision": used, "parameters": model.n_parameters(),
            "query_tokens": max_tokens + 1, "subjects": len(subjects), "seconds": seconds,
            "subjects_per_second": len(subjects) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=BenchmarkConfig.subjects)
    parser.add_argument("--batch-size", type=int, default=BenchmarkConfig.batch_size)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--threads", type=int, default=BenchmarkConfig.threads)
    args = parser.parse_args()
    config = BenchmarkConfig(subjects=args.subjects, batch_size=args.batch_size, threads=args.threads)
    if config.threads:
        torch.set_num_threads(config.threads)
    print(f"horizon query on CPU ({torch.get_num_threads()} threads), batch {config.batch_size}, "
          f"vocabulary {config.vocab_size}, random-init weights")
    print(f"{'preset':<8} {'precision':<9} {'parameters':>12} {'tokens':>7} {'subjects':>9} {'seconds':>8} "
          f"{'subjects/s':>11} {'vs fp32':>7}")
    for name in args.presets.split(","):
        base = None
        for precision in ("fp32", "auto"):  # auto: bf16 where the CPU supports it (forecast's default)
            r = run(name.strip(), config, precision)
            base = base or r["subjects_per_second"]
            print(f"{r['preset']:<8} {r['precision']:<9} {r['parameters']:>12,} {r['query_tokens']:>7} "
                  f"{r['subjects']:>9} {r['seconds']:>8.2f} {r['subjects_per_second']:>11.1f} "
                  f"{r['subjects_per_second'] / base:>6.2f}x")


if __name__ == "__main__":
    main()
