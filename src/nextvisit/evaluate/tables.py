"""How metric values are shown as text: `format_metric` for every number in the report and on stdout, the
per-cell summary sentence (`cell_summary`), the numbered n/a footnotes (`Footnotes`) and the plain-text
headline tables printed by ``nextvisit evaluate``.

Contract: functions of metric value dicts (``{"value", "ci", "reason"}``, see `nextvisit.evaluate.metrics`)
and of the metrics.json document only; they compute nothing but the difference of two shown AUROCs, and of
the package they import only the model kind names (`nextvisit.artifacts.predictions`), so the HTML report
and the terminal share one formatting. A number in a summary is a `Shown` piece that names its path in
metrics.json, so the HTML can tag it and a test can check it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from nextvisit.artifacts.predictions import OBSERVABLE_REFERENCE, ORACLE

CHANCE_AUROC = 0.5
# Kinds that are references, never competitors: the oracle (the simulator's true risk, unreachable) and the
# best model of what is observable (reachable). A summary names the best *compared* model.
REFERENCE_KINDS = (ORACLE, OBSERVABLE_REFERENCE)
NOT_IN_METRICS = "not in metrics.json (not computed by this evaluation)"
# Figures shown with four decimals: small numbers for rare outcomes (a Brier score of 0.03, a threshold of 0.02).
FOUR_DIGITS = ("threshold", "brier", "brier_ipcw", "mean_predicted", "observed_rate")
SUMMARY_WIDTH = 110  # characters per line of a summary sentence on the terminal
NO_BREAK = "\u00a0"  # textwrap splits on ASCII whitespace only


def format_metric(m: dict | None, digits: int = 3, with_ci: bool = True) -> str:
    """The one way a metric is shown, in the report and on stdout.

    >>> format_metric({"value": 0.81234, "ci": [0.8, 0.83], "reason": None})
    '0.812 [0.800, 0.830]'
    >>> format_metric({"value": None, "ci": None, "reason": "0 positives"})
    'n/a (0 positives)'
    """
    if m is None:
        return "n/a"
    if m.get("value") is None:
        return f"n/a ({m['reason']})" if m.get("reason") else "n/a"
    text = f"{m['value']:.{digits}f}"
    if with_ci and m.get("ci"):
        text += f" [{m['ci'][0]:.{digits}f}, {m['ci'][1]:.{digits}f}]"
    return text


def digits_for(key: str) -> int:
    """Decimals for the figure named ``key`` (its last path part).

    >>> digits_for("tasks/0/rows/1/brier"), digits_for("auroc")
    (4, 3)
    """
    return 4 if key.rsplit("/", 1)[-1] in FOUR_DIGITS else 3


def title(group: dict) -> str:
    """A task table's title.

    >>> title({"task": "dementia", "horizon_days": 730}), title({"task": "oa_next_visit", "horizon_days": 0})
    ('dementia, 730 days', 'oa_next_visit (next visit)')
    """
    if group["horizon_days"] == 0:
        return f"{group['task']} (next visit)"
    return f"{group['task']}, {group['horizon_days']} days"


def is_reference(row: dict) -> bool:
    return bool(row.get("is_oracle")) or row.get("kind") in REFERENCE_KINDS


def role(row: dict) -> str:
    """'oracle', 'observable-reference' or 'compared'."""
    if row.get("is_oracle") or row.get("kind") == ORACLE:
        return ORACLE
    return OBSERVABLE_REFERENCE if row.get("kind") == OBSERVABLE_REFERENCE else "compared"


class Footnotes:
    """Numbered n/a reasons of one table: each distinct reason gets one number, in order of first use.

    >>> notes = Footnotes()
    >>> notes.number("0 positives", "tasks/0/rows/1/auroc"), notes.number("no oracle", "x"), notes.number("0 positives", "y")
    (1, 2, 1)
    >>> notes.items
    [('0 positives', 'tasks/0/rows/1/auroc'), ('no oracle', 'x')]
    """

    def __init__(self):
        self.items: list[tuple[str, str | None]] = []  # (reason, metrics.json path of its first use)
        self._numbers: dict[str, int] = {}

    def number(self, reason: str, path: str | None) -> int:
        if reason not in self._numbers:
            self.items.append((reason, path))
            self._numbers[reason] = len(self.items)
        return self._numbers[reason]


# --------------------------------------------------------------------------------------------------------
# The summary sentence of a task table


@dataclass(frozen=True)
class Shown:
    """A number (or reason) in a summary, with its path in metrics.json. ``attribute`` says how the path reads:
    'metric' (a value dict), 'count' (an integer), 'difference' ("pathA pathB": A's value minus B's),
    'reason' (the reason of a value dict)."""

    text: str
    path: str
    attribute: str


def _ci_overlap(a: dict, b: dict) -> bool | None:
    if not a.get("ci") or not b.get("ci"):
        return None
    return a["ci"][0] <= b["ci"][1] and b["ci"][0] <= a["ci"][1]


def cell_summary(group: dict, t: int) -> list[str | Shown]:
    """One sentence for ``metrics['tasks'][t]``: which compared (non-reference) model has the highest
    held-out AUROC, by how much over the next one, whether their intervals overlap, the references' AUROC,
    and the positives (rows and subjects) the cell rests on. Pieces are text or `Shown` numbers."""
    rows = group["rows"]
    base = f"tasks/{t}/rows"
    scored = sorted((r for r, row in enumerate(rows) if not is_reference(row) and _value(row, "auroc") is not None),
                    key=lambda r: -rows[r]["auroc"]["value"])
    out: list[str | Shown] = []

    def auroc(r: int) -> Shown:
        return Shown(format_metric(rows[r]["auroc"]), f"{base}/{r}/auroc", "metric")

    if group["horizon_days"] == 0:
        out.append("All occurrences (recurrences included; new onsets in the inflation table): ")
    if not scored:
        compared = [r for r, row in enumerate(rows) if not is_reference(row)]
        first = rows[compared[0]].get("auroc") if compared else None
        if isinstance(first, dict):
            out += ["no compared model has an AUROC (", Shown(first.get("reason") or "undefined",
                                                          f"{base}/{compared[0]}/auroc", "reason"), "). "]
        elif compared:
            out.append(f"no compared model has an AUROC ({NOT_IN_METRICS}). ")
        else:
            out.append("no compared model, only references. ")
    elif len(scored) == 1:
        out += [f"{rows[scored[0]]['model']} is the only compared model with an AUROC: ", auroc(scored[0]), ". "]
    else:
        win, next_ = scored[0], scored[1]
        diff = rows[win]["auroc"]["value"] - rows[next_]["auroc"]["value"]
        out += [f"{rows[win]['model']} has the highest AUROC, ", auroc(win), ", ",
                Shown(f"{diff:.3f}", f"{base}/{win}/auroc {base}/{next_}/auroc", "difference"),
                f" above {rows[next_]['model']} (", auroc(next_), "); "]
        overlap = _ci_overlap(rows[win]["auroc"], rows[next_]["auroc"])
        out.append("no intervals to judge the lead by. " if overlap is None else
                   "the intervals overlap, so the lead is not clear. " if overlap else
                   "the intervals do not overlap: a clear lead. ")
    for r, row in enumerate(rows):
        if is_reference(row) and _value(row, "auroc") is not None:
            name = "oracle" if role(row) == ORACLE else "observable reference"
            named = name if row["model"] == name else f"{name} ({row['model']})"
            out += [f"The {named} reaches ", auroc(r), ". "]
    counted = scored[0] if scored else 0
    if rows:
        out += _positives(rows, counted, base)
    return out


def _positives(rows: list[dict], r: int, base: str) -> list[str | Shown]:
    counts = rows[r]["counts"]
    out: list[str | Shown] = [Shown(str(counts["positives"]), f"{base}/{r}/counts/positives", "count"),
                              " positive rows"]
    if counts.get("positive_subjects") is not None:
        out += [" from ", Shown(str(counts["positive_subjects"]), f"{base}/{r}/counts/positive_subjects", "count"),
                " positive subjects"]
    else:
        out.append(" (positive subjects not recorded)")
    out += [" among ", Shown(str(counts["subjects"]), f"{base}/{r}/counts/subjects", "count"), " subjects"]
    keys = ("positives", "positive_subjects", "subjects")
    if any(tuple(o["counts"].get(k) for k in keys) != tuple(counts.get(k) for k in keys) for o in rows):
        out.append(f" (counts of {rows[r]['model']}; the models were not scored on the same rows)")
    out.append(".")
    return out


def _value(row: dict, key: str):
    m = row.get(key)
    return m.get("value") if isinstance(m, dict) else None


def plain(pieces: list[str | Shown]) -> str:
    return "".join(p.text if isinstance(p, Shown) else p for p in pieces)


def _wrapped(pieces: list[str | Shown]) -> str:
    """A summary for the terminal, wrapped, never inside a number with its interval."""
    nowrap = "".join(p.text.replace(" ", NO_BREAK) if isinstance(p, Shown) else p for p in pieces)
    text = textwrap.fill(nowrap, SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="  ")
    return text.replace(NO_BREAK, " ")


# --------------------------------------------------------------------------------------------------------
# The headline table


HEADLINE_COLUMNS = (  # (title, key in a row, show CI)
    ("AUROC [95% CI]", "auroc", True), ("AUPRC [95% CI]", "auprc", True), ("IPCW AUROC", "auroc_ipcw", False),
    ("Brier", "brier", False), ("oracle share", "oracle_share", False),
)


def present_columns(group: dict, columns=HEADLINE_COLUMNS) -> tuple:
    """The columns some row of the group has (a metric this evaluation did not compute is left out)."""
    return tuple(c for c in columns if any(c[1] in row for row in group["rows"]))


def headline_table(metrics: dict) -> str:
    """The summary sentences, the comparison tables and the inflation tables as plain text, for the
    terminal; an n/a cell shows a footnote number and the reason is listed under its table."""
    lines = []
    for t, group in enumerate(metrics["tasks"]):
        lines.append(title(group))
        lines.append(_wrapped(cell_summary(group, t)))
        notes = Footnotes()
        columns = present_columns(group)
        table = [["model", "kind", *(c[0] for c in columns), "positives rows/subjects"]]
        for r, row in enumerate(group["rows"]):
            cells = [row["model"] + (" (oracle)" if row["is_oracle"] else ""), row["kind"]]
            for _, key, with_ci in columns:
                if key == "oracle_share" and row["is_oracle"]:
                    cells.append("ref")
                else:
                    cells.append(_short(row.get(key), notes, f"tasks/{t}/rows/{r}/{key}", with_ci))
            subjects = row["counts"].get("positive_subjects")
            cells.append(f"{row['counts']['positives']}/{'?' if subjects is None else subjects}")
            table.append(cells)
        lines += _text_table(table) + _footnote_lines(notes)
        lines.append("")
    for block in metrics["inflation"]:
        lines.append(f"Inflation: {block['task']} (AUROC, all occurrences vs new onsets)")
        notes = Footnotes()
        table = [["model", "repeat regularization", "all occurrences", "new onsets", "difference"]]
        for m in block["models"]:
            table.append([m["model"], m["repeat_regularization"], _short(m["all_occurrences"]["auroc"], notes),
                          _short(m["new_onsets"]["auroc"], notes), _short(m["difference"], notes)])
        lines += _text_table(table) + _footnote_lines(notes)
        lines.append("")
    if metrics["warnings"]:
        lines.append(f"{len(metrics['warnings'])} warning(s); see metrics.json or the report")
    return "\n".join(lines).rstrip() + "\n"


def _short(m: dict | None, notes: Footnotes, path: str | None = None, with_ci: bool = True) -> str:
    """A table cell: the number, or n/a with the number of its footnote."""
    if m is None:
        return f"n/a[{notes.number(NOT_IN_METRICS, None)}]"
    if m.get("value") is None:
        return f"n/a[{notes.number(m.get('reason') or 'undefined', path)}]"
    return format_metric(m, digits=digits_for(path or ""), with_ci=with_ci)


def _footnote_lines(notes: Footnotes) -> list[str]:
    return [f"  [{i}] {reason}" for i, (reason, _) in enumerate(notes.items, start=1)]


def _text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out
