"""``RUN/metrics.csv``: one row per logged step (training columns, and the validation's when it ran)."""

from __future__ import annotations

import csv
from pathlib import Path

from nextvisit.artifacts.folders import atomic_write

METRIC_FIELDS = ["step", "epoch", "tokens", "lr", "loss", "grad_norm", "tokens_per_s", "elapsed_s"]


class MetricsWriter:
    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=fields).writeheader()

    def write(self, row: dict):
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(row)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after the checkpoint's step: a resumed run recomputes them. A row cut short by a killed run (it
    can only be the last, which is after the checkpoint) is dropped too, whatever its first digits say."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= step]
    atomic_write(path, lambda p: p.write_text("".join(",".join(_csv_cell(c) for c in r) + "\n" for r in kept)))


def _csv_cell(cell: str) -> str:
    return f'"{cell}"' if ("," in cell or '"' in cell) else cell
