"""`nextvisit simulate` and `nextvisit oracle`."""

from __future__ import annotations

import sys


def run(args) -> int:
    from nextvisit.data.simulate.dataset import simulate

    stats = simulate(args.subjects, args.out, seed=args.seed, workers=args.workers, overwrite=args.overwrite)
    incident = stats["incident"]
    sys.stderr.write(
        f"wrote {args.out}: {stats['subjects']} subjects, {stats['visits']} visits "
        f"({stats['visits'] / stats['subjects']:.1f} per subject), {stats['events']} events, {stats['deaths']} deaths; "
        f"new diagnoses after the first visit: dementia {incident['dementia']}, knee OA {incident['knee_oa']}\n")
    return 0


def oracle_run(args) -> int:
    from nextvisit.data.simulate.oracle import OracleConfig, write_oracle_predictions

    config = OracleConfig(n_samples=getattr(args, "samples", OracleConfig.n_samples))
    write_oracle_predictions(args.meds_dir, args.labels, args.out, overwrite=args.overwrite, config=config,
                             workers=getattr(args, "workers", None))
    return 0
