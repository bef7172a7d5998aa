"""The evaluation report: ``report.html`` with the comparison tables, the inflation table, ROC,
precision-recall and calibration plots (PNG files beside it) and every model's configuration.

Every number in a table cell carries ``data-metric="<path in metrics.json>"``, so a test (or a reader) can
check the page against ``metrics.json``; numbers are formatted by `nextvisit.evaluate.tables.format_metric` only.

Contract: `write_report` takes the metrics.json document and the plot data and writes files into the report
folder; it computes no metric, and of the package it imports only the formatting module
(`nextvisit.evaluate.tables`), so the driver (`nextvisit.evaluate.evaluation`) can import it.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
from matplotlib.figure import Figure  # noqa: E402

from nextvisit.evaluate.tables import format_metric  # noqa: E402

FIGURE_SIZE = (5.0, 4.2)  # inches
FIGURE_DPI = 100
CHANCE_STYLE = {"color": "0.6", "linestyle": "--", "linewidth": 1}

MAIN_COLUMNS = (  # (title, key in a row, show CI)
    ("AUROC [95% CI]", "auroc", True),
    ("AUPRC [95% CI]", "auprc", True),
    ("AUROC, subject-weighted", "auroc_subject_weighted", True),
    ("AUPRC, subject-weighted", "auprc_subject_weighted", True),
    ("AUROC, age-sex-stratified", "auroc_age_sex_stratified", True),
    ("F1", "f1", False),
    ("precision", "precision", False),
    ("recall", "recall", False),
    ("threshold (tuning)", "threshold", False),
    ("Brier", "brier", False),
    ("oracle share", "oracle_share", True),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
td.na { color: #a33; font-size: 0.85em; text-align: left; max-width: 16em; }
tr.oracle { background: #f6f9ff; }
.figures img { width: 32%; min-width: 300px; margin-right: 0.5%; }
.warnings { background: #fff6e0; border: 1px solid #e0c060; padding: 0.5em 1em; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.85em; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def slug(text: str) -> str:
    """A file-name-safe version of a task name.

    >>> slug("knee_oa next/visit")
    'knee_oa_next_visit'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def write_report(metrics: dict, plots: list[list[dict]], out_dir: Path) -> dict:
    """Write the PNG figures and ``report.html`` into ``out_dir``; return the figure file names per task
    (recorded in metrics.json under ``figures``). ``plots[i]`` holds the curves of ``metrics['tasks'][i]``."""
    out_dir = Path(out_dir)
    figures: dict = {"tasks": [], "inflation": []}
    for group, curves in zip(metrics["tasks"], plots):
        stem = f"{slug(group['task'])}_{group['horizon_days']}d"
        files = {}
        for kind, draw in (("roc", _draw_roc), ("pr", _draw_pr), ("calibration", _draw_calibration)):
            name = f"{stem}_{kind}.png"
            draw(curves, _title(group), out_dir / name)
            files[kind] = name
        figures["tasks"].append(files)
    for block in metrics["inflation"]:
        name = f"{slug(block['task'])}_inflation.png"
        _draw_inflation(block, out_dir / name)
        figures["inflation"].append(name)
    page = _page(metrics, figures)
    tmp = out_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_dir / "report.html")
    return figures


def _title(group: dict) -> str:
    if group["horizon_days"] == 0:
        return f"{group['task']} (next visit)"
    return f"{group['task']}, {group['horizon_days']} days"


# --------------------------------------------------------------------------------------------------------
# Figures


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    os.replace(tmp, path)


def _label(curve: dict, key: str) -> str:
    value = curve.get(key)
    return f"{curve['model']} ({value:.3f})" if value is not None else curve["model"]


def _legend(ax, location: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=location)


def _draw_roc(curves: list[dict], title: str, path: Path) -> None:
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], **CHANCE_STYLE, label="chance")
    drawn = 0
    for c in curves:
        if "roc" in c:
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=_label(c, "auroc"))
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no model has both classes", ha="center")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title}", xlim=(0, 1), ylim=(0, 1))
    _legend(ax, "lower right")
    _save(fig, path)


def _draw_pr(curves: list[dict], title: str, path: Path) -> None:
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.add_subplot()
    prevalence = next((c["prevalence"] for c in curves if "prevalence" in c), None)
    if prevalence is not None:
        ax.axhline(prevalence, **CHANCE_STYLE, label=f"prevalence ({prevalence:.3f})")
    for c in curves:
        if "pr" in c:
            ax.plot(c["pr"]["recall"], c["pr"]["precision"], label=_label(c, "auprc"), drawstyle="steps-post")
    if not any("pr" in c for c in curves):
        ax.text(0.5, 0.5, "no model has both classes", ha="center")
    ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall: {title}", xlim=(0, 1), ylim=(0, 1.02))
    _legend(ax, "upper right")
    _save(fig, path)


def _draw_calibration(curves: list[dict], title: str, path: Path) -> None:
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.add_subplot()
    top = 0.0
    for c in curves:
        bins = c.get("calibration")
        if not bins:
            continue
        x = [b["mean_predicted"] for b in bins]
        y = [b["observed_rate"] for b in bins]
        # Wilson bounds at a rate of exactly 0 or 1 can land a rounding error on the wrong side of the rate
        low = [max(0.0, b["observed_rate"] - b["observed_ci"][0]) for b in bins]
        high = [max(0.0, b["observed_ci"][1] - b["observed_rate"]) for b in bins]
        ax.errorbar(x, y, yerr=[low, high], marker="o", markersize=3, capsize=2, label=c["model"])
        top = max(top, max(x), max(y))
    if top == 0:
        ax.text(0.5, 0.5, "no calibration curve (see the table)", ha="center")
    top = min(1.0, top * 1.1) if top > 0 else 1.0
    ax.plot([0, top], [0, top], **CHANCE_STYLE, label="perfect calibration")
    ax.set(xlabel="mean predicted risk (equal-count bins)", ylabel="observed rate (95% Wilson CI)",
           title=f"Calibration: {title}", xlim=(0, top), ylim=(0, top))
    _legend(ax, "upper left")
    _save(fig, path)


def _draw_inflation(block: dict, path: Path) -> None:
    fig = Figure(figsize=(max(5.0, 1.6 * len(block["models"]) + 2), 4.2))
    ax = fig.add_subplot()
    width = 0.38
    for offset, key, label in ((-width / 2, "all_occurrences", "all occurrences"), (width / 2, "new_onsets", "new onsets")):
        xs, ys, errs = [], [], [[], []]
        for i, m in enumerate(block["models"]):
            a = m[key]["auroc"]
            if a["value"] is None:
                continue
            xs.append(i + offset)
            ys.append(a["value"])
            ci = a["ci"] or [a["value"], a["value"]]
            errs[0].append(a["value"] - ci[0])
            errs[1].append(ci[1] - a["value"])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=label)
    ax.axhline(0.5, **CHANCE_STYLE)
    ax.set_xticks(range(len(block["models"])))
    ax.set_xticklabels([f"{m['model']}\n{m['repeat_regularization']}" for m in block["models"]], fontsize=7)
    ax.set(ylabel="AUROC (95% CI)", ylim=(0.4, 1.0), title=f"Inflation: {block['task']}")
    ax.legend(fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# HTML


def _e(text) -> str:
    return html.escape(str(text))


FOUR_DIGITS = ("threshold", "brier")  # small numbers for rare outcomes


def _cell(m: dict | None, path: str, with_ci: bool = True) -> str:
    """A metric cell: the formatted value, or n/a with its reason, tagged with its metrics.json path."""
    text = format_metric(m, digits=4 if path.rsplit("/", 1)[-1] in FOUR_DIGITS else 3, with_ci=with_ci)
    css = "na" if not m or m.get("value") is None else ""
    return f'<td class="{css}" data-metric="{_e(path)}">{_e(text)}</td>'


def _count_cell(value, path: str) -> str:
    return f'<td data-count="{_e(path)}">{_e(value)}</td>'


def _page(metrics: dict, figures: dict) -> str:
    s = metrics["settings"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>nextvisit evaluation report</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>nextvisit evaluation report</h1>",
        f"<p>Created {_e(metrics['created'])} by nextvisit {_e(metrics['nextvisit_version'])}. "
        f"Reported split: <b>{_e(s['report_split'])}</b>; F1 threshold picked on <b>{_e(s['threshold_split'])}</b>. "
        f"{int(s['confidence'] * 100)}% CIs from {s['n_bootstrap']:,} stratified bootstrap resamples "
        f"(seed {s['seed']}). All numbers are in <a href=\"metrics.json\">metrics.json</a>.</p>",
        '<p class="note">AUROC/AUPRC count every row once (sample-weighted); subject-weighted figures give each '
        "subject weight 1 shared over its rows. The age-sex-stratified AUROC counts only (positive, negative) "
        "pairs of the same sex and age band, so age and sex alone score 0.5. Oracle share = (AUROC - 0.5) / "
        "(oracle AUROC - 0.5): the part of the true risk's margin over chance that a model recovers. "
        "n/a cells give the reason the metric is undefined. Method: docs/evaluation.md.</p>",
    ]
    if metrics["warnings"]:
        parts.append('<div class="warnings"><b>Warnings</b><ul>')
        parts += [f"<li>{_e(w)}</li>" for w in metrics["warnings"]]
        parts.append("</ul></div>")

    for t, (group, files) in enumerate(zip(metrics["tasks"], figures["tasks"])):
        parts.append(f'<h2 id="task-{t}">{_e(_title(group))}</h2>')
        parts.append(_main_table(group, t))
        parts.append('<div class="figures">' + "".join(
            f'<img src="{_e(files[k])}" alt="{_e(k)} plot, {_e(_title(group))}">' for k in ("roc", "pr", "calibration"))
            + "</div>")
        parts.append(_calibration_tables(group, t))

    if metrics["inflation"]:
        parts.append('<h2 id="inflation">Inflation: all occurrences vs new onsets</h2>')
        parts.append('<p class="note">"Any code of the condition in the next visit", scored on every visit boundary '
                     "(all occurrences, recurrences included) and on boundaries where the subject had no earlier code "
                     "of the condition (new onsets). Recurring chronic codes are easy to predict, so the all-occurrence "
                     "AUROC overstates what the model knows about new disease. Difference CIs are paired (the same "
                     "resamples).</p>")
        for i, (block, image) in enumerate(zip(metrics["inflation"], figures["inflation"])):
            parts.append(_inflation_table(block, i))
            parts.append(f'<div class="figures"><img src="{_e(image)}" alt="inflation plot, {_e(block["task"])}"></div>')

    parts.append('<h2 id="models">Models</h2>')
    for name, model in metrics["models"].items():
        sources = ", ".join(f"<code>{_e(source)}</code>" for source in model["sources"])
        parts.append(f"<h3>{_e(name)}</h3><p>kind: {_e(model['kind'])}; repeat regularization: "
                     f"{_e(model['repeat_regularization'])}; predictions: {sources}</p>")
        if len(model["configs"]) > 1:
            parts.append(f"<p>{len(model['configs'])} different configurations across its prediction folders:</p>")
        parts += [f"<pre>{_e(json.dumps(c, indent=2, default=str))}</pre>" for c in model["configs"]]
    parts.append("<h2>Inputs</h2><ul>")
    parts += [f"<li><code>{_e(i['file'])}</code>: {_e(i['model'])} ({_e(i['kind'])})</li>" for i in metrics["inputs"]]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def _main_table(group: dict, t: int) -> str:
    head = ['<th class="name">model</th><th class="name">kind</th>']
    head += [f"<th>{_e(title)}</th>" for title, _, _ in MAIN_COLUMNS]
    head += ["<th>positives</th><th>negatives</th><th>censored</th><th>subjects</th>"]
    rows = [f'<table class="metrics" id="table-{t}"><tr>{"".join(head)}</tr>']
    for r, row in enumerate(group["rows"]):
        base = f"tasks/{t}/rows/{r}"
        cells = [f'<td class="name">{_e(row["model"])}</td><td class="name">{_e(row["kind"])}</td>']
        for _, key, with_ci in MAIN_COLUMNS:
            if key == "oracle_share" and row["is_oracle"]:
                cells.append("<td>reference</td>")
            else:
                cells.append(_cell(row.get(key), f"{base}/{key}", with_ci))
        c = row["counts"]
        cells.append(_count_cell(c["positives"], f"{base}/counts/positives"))
        cells.append(_count_cell(c["negatives"], f"{base}/counts/negatives"))
        if c["censored"]["value"] is None:
            cells.append(_cell(c["censored"], f"{base}/counts/censored"))
        else:
            cells.append(f'<td data-count="{base}/counts/censored/value" title="{_e(c["censored_scope"])}">'
                         f'{int(c["censored"]["value"])}</td>')
        cells.append(_count_cell(c["subjects"], f"{base}/counts/subjects"))
        css = ' class="oracle"' if row["is_oracle"] else ""
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _calibration_tables(group: dict, t: int) -> str:
    parts = ["<details><summary>Calibration bins (counts per bin)</summary>"]
    for r, row in enumerate(group["rows"]):
        cal = row.get("calibration") or {}
        parts.append(f"<h4>{_e(row['model'])}</h4>")
        if not cal.get("bins"):
            parts.append(f'<p class="na">n/a ({_e(cal.get("reason"))})</p>')
            continue
        parts.append("<table><tr><th>predicted risk range</th><th>rows</th><th>positives</th>"
                     "<th>mean predicted</th><th>observed rate</th></tr>")
        for b, item in enumerate(cal["bins"]):
            base = f"tasks/{t}/rows/{r}/calibration/bins/{b}"
            parts.append(
                f"<tr><td>{item['lower']:.4g} to {item['upper']:.4g}</td>"
                + _count_cell(item["rows"], f"{base}/rows") + _count_cell(item["positives"], f"{base}/positives")
                + f'<td data-number="{base}/mean_predicted">{item["mean_predicted"]:.4f}</td>'
                + f'<td data-number="{base}/observed_rate">{item["observed_rate"]:.4f}</td></tr>')
        parts.append("</table>")
    parts.append("</details>")
    return "\n".join(parts)


def _inflation_table(block: dict, i: int) -> str:
    title = block["task"]
    rows = [f"<h3>{_e(title)}</h3>", f'<table class="inflation" id="inflation-{i}"><tr><th class="name">model</th>'
            '<th class="name">repeat regularization</th><th>AUROC, all occurrences</th><th>positives</th>'
            "<th>AUROC, new onsets</th><th>positives</th><th>difference [95% CI]</th>"
            "<th>share of positives that recur</th></tr>"]
    for m, model in enumerate(block["models"]):
        base = f"inflation/{i}/models/{m}"
        new = model["new_onsets"]
        rows.append(
            f'<tr><td class="name">{_e(model["model"])}</td><td class="name">{_e(model["repeat_regularization"])}</td>'
            + _cell(model["all_occurrences"]["auroc"], f"{base}/all_occurrences/auroc")
            + _count_cell(model["all_occurrences"]["positives"], f"{base}/all_occurrences/positives")
            + _cell(new["auroc"], f"{base}/new_onsets/auroc")
            + (_count_cell(new["positives"], f"{base}/new_onsets/positives") if "positives" in new else "<td>n/a</td>")
            + _cell(model["difference"], f"{base}/difference")
            + (_cell(model["recurrence_share_of_positives"], f"{base}/recurrence_share_of_positives", False)
               if "recurrence_share_of_positives" in model else "<td>n/a</td>")
            + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)
