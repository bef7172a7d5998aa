"""`nextvisit simulate` (`nextvisit oracle` lives in ``nextvisit.baselines.oracle``)."""

from __future__ import annotations

import sys


def run(args) -> int:
    from nextvisit.data.simulate.dataset import simulate

    stats = simulate(args.subjects, args.out, seed=args.seed, first_subject_id=args.first_subject_id,
                     split=args.split, workers=args.workers, overwrite=args.overwrite)
    incident = stats["incident"]
    sys.stderr.write(
        f"wrote {args.out}: {stats['subjects']} subjects, {stats['visits']} visits "
        f"({stats['visits'] / stats['subjects']:.1f} per subject), {stats['events']} events, {stats['deaths']} deaths; "
        f"new diagnoses after the first visit: dementia {incident['dementia']}, knee OA {incident['knee_oa']}\n")
    return 0
