"""The evaluation report: ``report.html`` opening with a summary (a forest plot of held-out AUROC and one
sentence per task and horizon), then per task and horizon the comparison table, its details folded, ROC,
precision-recall and calibration plots (PNG files beside it), the inflation tables and every model's
configuration.

The page fits a laptop screen (1400 px wide, no horizontal scrolling): the comparison table holds the main
columns only (`MAIN_COLUMNS`); the other figures are in a folded table with one column per model
(`DETAIL_SECTIONS`); an n/a cell shows a footnote number and the reason is listed once under its table.

Every number on the page is an element that names where it is in metrics.json, so a test (or a reader) can
check the page against it: ``data-metric`` (a value dict: value and CI), ``data-count`` (an integer),
``data-number`` (a float), ``data-value`` (any scalar, shown as is), ``data-difference`` ("pathA pathB": A's
value minus B's) and ``data-reason`` / ``data-warning`` (texts that may hold numbers). Numbers are formatted by
`nextvisit.evaluate.tables` only.

Contract: `write_report` takes the metrics.json document and the plot data and writes files into the report
folder; it computes no metric, and of the evaluation package it imports only the formatting module
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
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from nextvisit.evaluate.tables import (  # noqa: E402
    CHANCE_AUROC, NOT_IN_METRICS, Footnotes, Shown, cell_summary, digits_for, format_metric, present_columns, role,
    title,
)

FIGURE_SIZE = (5.0, 4.2)  # inches
FIGURE_DPI = 100
CHANCE_STYLE = {"color": "0.6", "linestyle": "--", "linewidth": 1}
SUMMARY_FIGURE = "summary_auroc.png"
FOREST_WIDTH = 9.0  # inches: 900 px, inside a 1400 px window with the page margins
FOREST_LINE_HEIGHT = 0.24  # inches per model line
FOREST_EXTRA_HEIGHT = 1.3  # inches for the legend and the axis
FOREST_MARGIN = (0.03, 0.02)  # AUROC left of the lowest and right of the highest point or interval end
# References drawn apart from the compared models (colour, marker, line style of their line over the group).
REFERENCE_STYLE = {"oracle": ("black", "D", ":"), "observable-reference": ("0.45", "s", "--")}
# Calibration axes: log-log when the predictions and observed rates span more than this factor (rare
# outcomes put most bins within a few percent and one or two far above), else linear; the margin around
# the points is a factor on log axes and a share of the range on linear ones.
LOG_SPAN = 10.0
LOG_MARGIN = 1.6
LINEAR_MARGIN = 0.08

MAIN_COLUMNS = (  # (title, key in a row); every figure with its CI where it has one
    ("AUROC [95% CI]", "auroc"), ("AUPRC [95% CI]", "auprc"), ("IPCW AUROC [95% CI]", "auroc_ipcw"),
    ("Brier", "brier"), ("oracle share", "oracle_share"),
)
DETAIL_SECTIONS = (  # (section, ((title, path below the row), ...)): the folded table, one column per model
    ("Weighting and stratification", (
        ("AUROC, subject-weighted", "auroc_subject_weighted"), ("AUPRC, subject-weighted", "auprc_subject_weighted"),
        ("AUROC, age-sex-stratified", "auroc_age_sex_stratified"),
        ("AUROC, one landmark per subject", "auroc_one_landmark"))),
    ("Censoring-weighted (IPCW)", (("AUPRC, IPCW", "auprc_ipcw"), ("Brier, IPCW", "brier_ipcw"))),
    ("Sensitivity: landmarks whose horizon ends within {final_days} of the data end dropped", (
        ("AUROC", "auroc_excluding_final_year"), ("IPCW AUROC", "auroc_ipcw_excluding_final_year"))),
    ("At the threshold picked on the tuning split", (
        ("threshold", "threshold"), ("F1", "f1"), ("precision", "precision"), ("recall", "recall"))),
    ("Calibration in the large", (("mean predicted risk", "mean_predicted"), ("observed rate", "observed_rate"))),
    ("Counts (reported split)", (
        ("positive rows", "counts/positives"), ("positive subjects", "counts/positive_subjects"),
        ("negative rows", "counts/negatives"), ("negative subjects", "counts/negative_subjects"),
        ("rows", "counts/rows"), ("subjects", "counts/subjects"), ("censored rows", "counts/censored"))),
    ("Counts (tuning split)", (
        ("positive rows", "counts/tuning_positives"), ("positive subjects", "counts/tuning_positive_subjects"))),
)

STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; line-height: 1.35;
       overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; } td.name, th.name { text-align: left; }
td.name { overflow-wrap: break-word; }  /* a model name breaks only where it cannot fit */
th.section { text-align: left; background: #fafafa; font-weight: 600; }
td.na { color: #777; } td.na sup a { color: #777; }
.ci { white-space: nowrap; color: #555; }
.kind { display: block; color: #666; font-size: 0.85em; }
tr.oracle { background: #f3f6fc; } tr.observable-reference { background: #f4f9f1; }
ol.footnotes { font-size: 0.82em; color: #555; margin: 0.2em 0 1em; padding-left: 2em; }
details { margin: 0.4em 0; } summary { cursor: pointer; color: #235; }
.scroll { overflow-x: auto; max-width: 100%; }
.figures img { width: 32%; min-width: 300px; margin-right: 0.5%; vertical-align: top; }
.bins { display: flex; flex-wrap: wrap; column-gap: 2em; } .bins h4 { margin: 0.6em 0 0.2em; }
img.forest { max-width: 100%; height: auto; }
ul.verdicts li { margin: 0.3em 0; max-width: 72em; }
.warnings { background: #fff6e0; border: 1px solid #e0c060; padding: 0.5em 1em; }
pre { background: #f7f7f7; padding: 0.5em; font-size: 0.85em; white-space: pre-wrap; }
p.note { color: #555; font-size: 0.9em; max-width: 72em; }
"""


def slug(text: str) -> str:
    """A file-name-safe version of a task name.

    >>> slug("knee_oa next/visit")
    'knee_oa_next_visit'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def write_report(metrics: dict, plots: list[list[dict]], out_dir: Path) -> dict:
    """Write the PNG figures and ``report.html`` into ``out_dir``; return the figure file names (recorded in
    metrics.json under ``figures``). ``plots[i]`` holds the curves of ``metrics['tasks'][i]``."""
    out_dir = Path(out_dir)
    colors = model_colors(metrics)
    figures: dict = {"summary": SUMMARY_FIGURE, "tasks": [], "inflation": []}
    _draw_forest(metrics, colors, out_dir / SUMMARY_FIGURE)
    for group, curves in zip(metrics["tasks"], plots):
        stem = f"{slug(group['task'])}_{group['horizon_days']}d"
        files = {}
        for kind, draw in (("roc", _draw_roc), ("pr", _draw_pr), ("calibration", _draw_calibration)):
            name = f"{stem}_{kind}.png"
            draw(curves, colors, title(group), out_dir / name)
            files[kind] = name
        figures["tasks"].append(files)
    for block in metrics["inflation"]:
        name = f"{slug(block['task'])}_inflation.png"
        _draw_inflation(block, out_dir / name)
        figures["inflation"].append(name)
    figures["visit_time"] = {}
    for model_name, model in metrics["models"].items():
        if model.get("visit_time_calibration"):
            name = f"{slug(model_name)}_visit_time.png"
            _draw_visit_time(model["visit_time_calibration"], model_name, out_dir / name)
            figures["visit_time"][model_name] = name
    page = _page(metrics, figures)
    tmp = out_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_dir / "report.html")
    return figures


# --------------------------------------------------------------------------------------------------------
# Figures


def model_colors(metrics: dict) -> dict[str, str]:
    """One colour per model name across every plot; the references keep their own (`REFERENCE_STYLE`)."""
    palette = matplotlib.colormaps["tab10"].colors
    colors: dict[str, str] = {}
    compared = 0
    for group in metrics["tasks"]:
        for row in group["rows"]:
            if row["model"] in colors:
                continue
            if role(row) in REFERENCE_STYLE:
                colors[row["model"]] = REFERENCE_STYLE[role(row)][0]
            else:
                colors[row["model"]] = to_hex(palette[compared % len(palette)])
                compared += 1
    return colors


def _save(fig: Figure, path: Path, tight_box: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tight_box:  # texts placed outside the axes (the forest plot's values) are kept in the picture
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png", bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    os.replace(tmp, path)


def forest_lines(metrics: dict) -> list[dict]:
    """The forest plot's lines, top to bottom: per task table a header, then one line per model with its
    role ('compared', 'oracle', 'observable-reference') and its AUROC value dict."""
    lines = []
    for t, group in enumerate(metrics["tasks"]):
        label = title(group) + (", all occurrences" if group["horizon_days"] == 0 else "")
        lines.append({"task": t, "row": None, "label": label, "role": "header", "auroc": None})
        for r, row in enumerate(group["rows"]):
            lines.append({"task": t, "row": r, "label": f"{row['model']} ({row['kind']})", "model": row["model"],
                          "role": role(row), "auroc": row.get("auroc")})
    return lines


def _draw_forest(metrics: dict, colors: dict[str, str], path: Path) -> None:
    lines = forest_lines(metrics)
    fig = Figure(figsize=(FOREST_WIDTH, FOREST_LINE_HEIGHT * len(lines) + FOREST_EXTRA_HEIGHT))
    ax = fig.add_subplot()
    shown = [ln["auroc"] for ln in lines if ln["auroc"] and ln["auroc"].get("value") is not None]
    ends = [v for m in shown for v in [m["value"], *(m.get("ci") or [])]]
    low = max(0.0, min([CHANCE_AUROC, *ends]) - FOREST_MARGIN[0])
    high = min(1.0, max([CHANCE_AUROC, *ends]) + FOREST_MARGIN[1])
    ax.axvline(CHANCE_AUROC, **CHANCE_STYLE)
    groups: dict[int, list[int]] = {}
    for y, ln in enumerate(lines):
        if ln["role"] == "header":
            if y:
                ax.axhline(y - 0.5, color="0.85", linewidth=0.8)
            continue
        groups.setdefault(ln["task"], []).append(y)
    for y, ln in enumerate(lines):
        m = ln["auroc"]
        if ln["role"] == "header":
            continue
        if not m or m.get("value") is None:
            ax.text(low + 0.005, y, "n/a (see the table)", va="center", fontsize=7, color="0.5")
            continue
        color, marker, linestyle = REFERENCE_STYLE.get(ln["role"], (colors.get(ln["model"], "C0"), "o", None))
        ci = m.get("ci") or [m["value"], m["value"]]
        ax.errorbar(m["value"], y, xerr=[[m["value"] - ci[0]], [ci[1] - m["value"]]], fmt=marker, color=color,
                    markersize=5, capsize=2, linewidth=1.2)
        if linestyle:  # the reference's AUROC as a line over its whole task table
            ys = groups[ln["task"]]
            ax.vlines(m["value"], min(ys) - 0.45, max(ys) + 0.45, colors=color, linestyles=linestyle, linewidth=1)
        ax.text(1.01, y, format_metric(m), transform=ax.get_yaxis_transform(), va="center", fontsize=7.5)
    ax.set_yticks(range(len(lines)), [ln["label"] for ln in lines], fontsize=8)
    for tick, ln in zip(ax.get_yticklabels(), lines):
        if ln["role"] == "header":
            tick.set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(max(len(lines), 1) - 0.5, -0.5)  # the first task on top
    ax.set_xlim(low, high)
    ax.set_xlabel(f"AUROC on {metrics['settings']['report_split']} (95% CI)")
    handles = [Line2D([], [], color="C0", marker="o", linestyle="none", label="compared model"),
               Line2D([], [], color="black", marker="D", linestyle=":", label="oracle (true risk)"),
               Line2D([], [], color="0.45", marker="s", linestyle="--", label="observable reference"),
               Line2D([], [], **CHANCE_STYLE, label=f"chance ({CHANCE_AUROC})")]
    ax.legend(handles=handles, fontsize=7.5, ncol=4, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    _save(fig, path, tight_box=True)


def _label(curve: dict, key: str) -> str:
    value = curve.get(key)
    return f"{curve['model']} ({value:.3f})" if value is not None else curve["model"]


def _legend(ax, location: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=location)


def _draw_roc(curves: list[dict], colors: dict[str, str], title_: str, path: Path) -> None:
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], **CHANCE_STYLE, label="chance")
    drawn = 0
    for c in curves:
        if "roc" in c:
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=_label(c, "auroc"), color=colors.get(c["model"]))
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no model has both classes", ha="center")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title_}", xlim=(0, 1), ylim=(0, 1))
    _legend(ax, "lower right")
    _save(fig, path)


def _draw_pr(curves: list[dict], colors: dict[str, str], title_: str, path: Path) -> None:
    fig = Figure(figsize=FIGURE_SIZE)
    ax = fig.add_subplot()
    prevalence = next((c["prevalence"] for c in curves if "prevalence" in c), None)
    if prevalence is not None:
        ax.axhline(prevalence, **CHANCE_STYLE, label=f"prevalence ({prevalence:.3f})")
    for c in curves:
        if "pr" in c:
            ax.plot(c["pr"]["recall"], c["pr"]["precision"], label=_label(c, "auprc"), drawstyle="steps-post",
                    color=colors.get(c["model"]))
    if not any("pr" in c for c in curves):
        ax.text(0.5, 0.5, "no model has both classes", ha="center")
    ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall: {title_}", xlim=(0, 1), ylim=(0, 1.02))
    _legend(ax, "upper right")
    _save(fig, path)


def calibration_axes(curves: list[dict]) -> tuple[str, float, float]:
    """(scale, low, high) of both calibration axes: the range of the bins' mean predicted risks and observed
    rates with a margin, on log axes when they span more than `LOG_SPAN`, else linear. On log axes no point
    below half the finest observed rate a bin can show (1 / its rows) sets the range: a prediction below that
    cannot be checked, so it is drawn at the edge with the zeros.

    >>> bins = [{"mean_predicted": p, "observed_rate": p, "rows": 1000} for p in (0.004, 0.01, 0.02, 0.2)]
    >>> scale, low, high = calibration_axes([{"calibration": bins}])
    >>> scale, round(low, 4), round(high, 2)
    ('log', 0.0025, 0.32)
    >>> bins[0]["mean_predicted"] = 1e-7  # far below what 1,000 rows can show: the axis starts at 0.0005 / 1.6
    >>> round(calibration_axes([{"calibration": bins}])[1], 5)
    0.00031
    >>> calibration_axes([{"calibration": [{"mean_predicted": 0.3, "observed_rate": 0.5, "rows": 50}]}])[0]
    'linear'
    """
    bins = [b for c in curves for b in (c.get("calibration") or [])]
    values = [b[k] for b in bins for k in ("mean_predicted", "observed_rate")]
    finest = 1 / (2 * max(b["rows"] for b in bins)) if bins else 0.0
    positive = [v for v in values if v > 0]
    if not positive:
        return "linear", 0.0, 1.0
    low, high = max(min(positive), finest), max(positive)
    if high / low > LOG_SPAN:
        return "log", low / LOG_MARGIN, min(1.0, high * LOG_MARGIN)
    low = min(values)
    margin = LINEAR_MARGIN * (high - low) or LINEAR_MARGIN * high
    return "linear", max(0.0, low - margin), min(1.0, high + margin)


def _draw_calibration(curves: list[dict], colors: dict[str, str], title_: str, path: Path) -> None:
    fig = Figure(figsize=(FIGURE_SIZE[0], FIGURE_SIZE[1] + 0.6))  # room for the legend below
    ax = fig.add_subplot()
    scale, low, high = calibration_axes(curves)
    floor = low if scale == "log" else float("-inf")  # where a zero (or an unresolvable risk) is drawn
    at_floor = False
    for c in curves:
        bins = c.get("calibration")
        if not bins:
            continue
        x = [max(b["mean_predicted"], floor) for b in bins]
        y = [max(b["observed_rate"], floor) for b in bins]
        edge = [min(b["mean_predicted"], b["observed_rate"]) < floor for b in bins]
        # Wilson bounds at a rate of exactly 0 or 1 can land a rounding error on the wrong side of the rate
        down = [max(0.0, yi - max(b["observed_ci"][0], floor)) for yi, b in zip(y, bins)]
        up = [max(0.0, b["observed_ci"][1] - yi) for yi, b in zip(y, bins)]
        color = colors.get(c["model"])
        ax.errorbar(x, y, yerr=[down, up], fmt="o", markersize=3, capsize=2, elinewidth=0.8, label=c["model"],
                    color=color)
        # a light line through the bins of one model, broken where a point sits at the edge
        ax.plot(x, [float("nan") if e else yi for yi, e in zip(y, edge)], color=color, linewidth=0.8, alpha=0.5)
        if any(edge):
            at_floor = True
            ax.plot([xi for xi, e in zip(x, edge) if e], [yi for yi, e in zip(y, edge) if e], linestyle="none",
                    marker="v", markersize=6, markerfacecolor="none", color=color, clip_on=False)
    if not any(c.get("calibration") for c in curves):
        ax.text(0.5, 0.5, "no calibration curve (see the table)", ha="center", transform=ax.transAxes)
    ax.plot([low, high], [low, high], **CHANCE_STYLE, label="perfect calibration")
    ax.set_xscale(scale)
    ax.set_yscale(scale)
    if scale == "log":
        subs = (1.0, 2.0, 5.0) if high / low < 100 else (1.0,)
        for axis in (ax.xaxis, ax.yaxis):  # 0.002, 0.005, 0.01 ... rather than powers of ten
            axis.set_major_locator(LogLocator(subs=subs))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    if at_floor:
        ax.plot([], [], linestyle="none", marker="v", markerfacecolor="none", color="0.3",
                label="0, or below the axis (drawn at the edge)")
    ax.set(xlabel=f"mean predicted risk, equal-count bins ({scale} scale)", ylabel="observed rate (95% Wilson CI)",
           title=f"Calibration: {title_}", xlim=(low, high), ylim=(low, high))
    if ax.get_legend_handles_labels()[0]:  # below the axes: points fill every corner of a calibration plot
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    _save(fig, path)


def _draw_visit_time(calibration: dict, model_name: str, path: Path) -> None:
    """Predicted against observed share of next visits within each checked gap (the visit-time head that dates a
    sampled trajectory's visits), on the run's validation visits."""
    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    days = calibration["days"]
    ax.plot(days, calibration["observed_share"], marker="o", color="black", label="observed")
    ax.plot(days, calibration["predicted_share"], marker="s", label="predicted (visit-time head)")
    ax.set_xscale("log")
    ax.set_xlabel("days to the next visit")
    ax.set_ylabel("share of next visits within")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{model_name}: visit-time calibration", fontsize=9)
    _legend(ax, "lower right")
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
    ax.axhline(CHANCE_AUROC, **CHANCE_STYLE)
    ax.set_xticks(range(len(block["models"])))
    ax.set_xticklabels([f"{m['model']}\n{m['repeat_regularization']}" for m in block["models"]], fontsize=7)
    ax.set(ylabel="AUROC (95% CI)", ylim=(0.4, 1.0), title=f"Inflation: {block['task']}")
    ax.legend(fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# HTML pieces


def _e(text) -> str:
    return html.escape(str(text))


def _lookup(node, path: str):
    """The value at a metrics.json path below ``node`` ('counts/positives'), or None where it is absent."""
    for part in path.split("/"):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _metric_html(m: dict, key: str) -> str:
    """A value, with its CI in a span that wraps as a whole onto the next line in a narrow column."""
    text = format_metric(m, digits=digits_for(key))
    value, _, ci = text.partition(" [")
    return _e(value) + (f' <span class="ci">[{_e(ci)}</span>' if ci else "")


class _Table:
    """Cells of one HTML table with its numbered n/a footnotes (listed by `footnotes` under the table)."""

    def __init__(self, anchor: str):
        self.anchor = anchor
        self.notes = Footnotes()

    def na(self, reason: str, path: str | None) -> str:
        """An n/a cell: the marker and its footnote number; tagged with the metric's path where it has one."""
        n = self.notes.number(reason, path)
        target = f"{self.anchor}-fn{n}"
        tagged = f' data-metric="{_e(path)}"' if path else ""
        return (f'<td class="na"{tagged} data-footnote="{target}" title="{_e(reason)}">'
                f'n/a<sup><a href="#{target}">{n}</a></sup></td>')

    def metric(self, m, path: str) -> str:
        """A metric cell: the value with its CI, or n/a with a footnote; tagged with its metrics.json path."""
        if not isinstance(m, dict):
            return self.na(NOT_IN_METRICS, None)
        if m.get("value") is None:
            return self.na(m.get("reason") or "undefined", path)
        return f'<td data-metric="{_e(path)}">{_metric_html(m, path.rsplit("/", 1)[-1])}</td>'

    def count(self, value, path: str) -> str:
        if value is None:
            return self.na(NOT_IN_METRICS, None)
        return f'<td data-count="{_e(path)}">{int(value)}</td>'

    def censored(self, counts: dict, path: str) -> str:
        """The censored count: a value dict (n/a with the reason where no writer recorded it)."""
        c = counts.get("censored")
        if not isinstance(c, dict) or c.get("value") is None:
            return self.metric(c, path)
        scope = counts.get("censored_scope") or ""
        return f'<td data-count="{_e(path)}/value" title="{_e(scope)}">{int(c["value"])}</td>'

    def footnotes(self) -> str:
        if not self.notes.items:
            return ""
        items = []
        for n, (reason, path) in enumerate(self.notes.items, start=1):
            text = f'<span data-reason="{_e(path)}">{_e(reason)}</span>' if path else _e(reason)
            items.append(f'<li id="{self.anchor}-fn{n}">{text}</li>')
        return f'<ol class="footnotes">{"".join(items)}</ol>'


def _shown(pieces) -> str:
    """A summary sentence: text, with each number tagged by its metrics.json path."""
    out = []
    for p in pieces:
        if isinstance(p, Shown):
            out.append(f'<span data-{p.attribute}="{_e(p.path)}">{_e(p.text)}</span>')
        else:
            out.append(_e(p))
    return "".join(out)


def _model_cell(row: dict) -> str:
    return f'<td class="name">{_e(row["model"])}<span class="kind">{_e(row["kind"])}</span></td>'


def _positives_cell(counts: dict, path: str, with_subjects: bool) -> str:
    """'rows / subjects' of the positives ('?' for subjects where metrics.json does not record them)."""
    text = f'<span data-count="{path}/positives">{int(counts["positives"])}</span>'
    if with_subjects:
        subjects = counts.get("positive_subjects")
        text += " / " + (f'<span data-count="{path}/positive_subjects">{int(subjects)}</span>'
                         if subjects is not None else "?")
    return f"<td>{text}</td>"


def _scalars(node, path: str) -> str:
    """A small dict (a model's selection) as 'key: value' lines, each scalar tagged with its path."""
    if isinstance(node, dict):
        return "<br>".join(f"{_e(k)}: {_scalars(v, f'{path}/{k}')}" for k, v in node.items())
    if isinstance(node, list):
        return f"<code>{_e(json.dumps(node))}</code>"  # verbatim; not a figure of the evaluation
    return f'<span data-value="{_e(path)}">{_e(node)}</span>'


# --------------------------------------------------------------------------------------------------------
# The page


def _page(metrics: dict, figures: dict) -> str:
    s = metrics["settings"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>nextvisit evaluation report</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>nextvisit evaluation report</h1>",
        f'<p>Created <span data-value="created">{_e(metrics["created"])}</span> by nextvisit '
        f'<span data-value="nextvisit_version">{_e(metrics["nextvisit_version"])}</span>. '
        f"Reported split: <b>{_e(s['report_split'])}</b>; F1 threshold picked on <b>{_e(s['threshold_split'])}</b>. "
        f'All numbers are in <a href="metrics.json">metrics.json</a>; method: docs/evaluation.md.</p>',
    ]
    parts += _summary(metrics, figures)
    if metrics["warnings"]:
        parts.append(f'<div class="warnings"><b>Warnings ({len(metrics["warnings"])})</b><ul>')
        parts += [f'<li data-warning="warnings/{i}">{_e(w)}</li>' for i, w in enumerate(metrics["warnings"])]
        parts.append("</ul></div>")
    parts.append(
        '<p class="note">AUROC/AUPRC count every row once (sample-weighted). IPCW figures weigh each labelled row '
        "by the inverse probability of staying under observation long enough for its label to be known, for "
        "what the figure would be without censoring. Oracle share = (AUROC - 0.5) / (oracle AUROC - 0.5): the "
        "part of the true risk's margin over chance that a model recovers. A number in superscript after n/a "
        "points to the reason under the table. Subject-weighted, age-sex-stratified, one-landmark and "
        "sensitivity figures, threshold metrics and all counts are in each table's folded details.</p>")

    for t, (group, files) in enumerate(zip(metrics["tasks"], figures["tasks"])):
        parts.append(f'<h2 id="task-{t}">{_e(title(group))}</h2>')
        parts.append(_main_table(group, t))
        parts.append(_details_table(group, t, s))
        parts.append(_censoring_table(group, t))
        parts.append('<div class="figures">' + "".join(
            f'<img src="{_e(files[k])}" alt="{_e(k)} plot, {_e(title(group))}">' for k in ("roc", "pr", "calibration"))
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
                     f'<span data-value="models/{_e(name)}/repeat_regularization">{_e(model["repeat_regularization"])}'
                     f"</span>; predictions: {sources}</p>")
        if len(model["configs"]) > 1:
            parts.append(f"<p>{len(model['configs'])} different configurations across its prediction folders:</p>")
        parts += [f"<details><summary>configuration</summary><pre>{_e(json.dumps(c, indent=2, default=str))}</pre>"
                  "</details>" for c in model["configs"]]
        if name in figures.get("visit_time", {}):
            c = model["visit_time_calibration"]
            cells = "".join(
                f'<tr><td>{_e(d)}</td><td data-number="models/{_e(name)}/visit_time_calibration/predicted_share/{i}">'
                f"{format_metric({'value': p})}</td><td data-number=\"models/{_e(name)}/visit_time_calibration/"
                f"observed_share/{i}\">{format_metric({'value': o})}</td></tr>"
                for i, (d, p, o) in enumerate(zip(c["days"], c["predicted_share"], c["observed_share"])))
            parts.append(f"<p>Visit-time head (dates the sampled visits): predicted against observed share of next "
                         f"visits within each gap, on {c['visits']:,} {_e(c['split'])} visits of the run's last "
                         "validation.</p>"
                         f'<div class="figures"><img src="{_e(figures["visit_time"][name])}" alt="visit-time '
                         f'calibration, {_e(name)}"></div><table><tr><th>days</th><th>predicted</th><th>observed</th>'
                         f"</tr>{cells}</table>")
    parts.append("<h2>Inputs</h2><ul>")
    parts += [f"<li><code>{_e(i['file'])}</code>: {_e(i['model'])} ({_e(i['kind'])})</li>" for i in metrics["inputs"]]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def _interval_text(settings: dict) -> str:
    method = settings.get("interval_method") or "percentile interval of bootstrap resamples"
    return (f"{round(settings['confidence'] * 100)}% intervals: {method}; {settings['n_bootstrap']:,} resamples, "
            f"seed {settings['seed']}.")


def _summary(metrics: dict, figures: dict) -> list[str]:
    split = metrics["settings"]["report_split"]
    parts = [f'<h2 id="summary">Summary: {_e(split)} AUROC</h2>',
             f'<p class="note">{_e(_interval_text(metrics["settings"]))} The best compared model is named '
             "per task and horizon; the oracle (the simulator's true risk) and the observable reference (the best "
             "model of what is observable) are references, never winners. Overlapping intervals mean the lead "
             "may be noise.</p>", '<ul class="verdicts">']
    for t, group in enumerate(metrics["tasks"]):
        parts.append(f'<li><a href="#task-{t}"><b>{_e(title(group))}</b></a>: {_shown(cell_summary(group, t))}</li>')
    parts.append("</ul>")
    parts.append(f'<img class="forest" src="{_e(figures["summary"])}" alt="forest plot of {_e(split)} AUROC with '
                 '95% intervals, one line per model and task">')
    return parts


def _main_table(group: dict, t: int) -> str:
    columns = present_columns(group, MAIN_COLUMNS)
    with_subjects = any(row["counts"].get("positive_subjects") is not None for row in group["rows"])
    table = _Table(f"t{t}")
    head = ['<th class="name">model</th>'] + [f"<th>{_e(name)}</th>" for name, _ in columns]
    head.append("<th>positives<br>rows / subjects</th>" if with_subjects else "<th>positive rows</th>")
    rows = [f'<table class="metrics" id="table-{t}"><tr>{"".join(head)}</tr>']
    for r, row in enumerate(group["rows"]):
        base = f"tasks/{t}/rows/{r}"
        cells = [_model_cell(row)]
        for _, key in columns:
            if key == "oracle_share" and row["is_oracle"]:
                cells.append("<td>reference</td>")
            else:
                cells.append(table.metric(row.get(key), f"{base}/{key}"))
        cells.append(_positives_cell(row["counts"], f"{base}/counts", with_subjects))
        rows.append(f'<tr class="{role(row)}">{"".join(cells)}</tr>')
    rows.append("</table>")
    return "\n".join(rows) + table.footnotes()


def _details_table(group: dict, t: int, settings: dict) -> str:
    """Every other figure, one column per model, folded."""
    table = _Table(f"t{t}d")
    head = '<th class="name">figure</th>' + "".join(f'<th>{_e(row["model"])}</th>' for row in group["rows"])
    out = ["<details><summary>More figures and counts per model</summary>", '<div class="scroll">',
           f'<table class="details" id="details-{t}"><tr>{head}</tr>']
    days = settings.get("final_days_excluded")
    final_days = (f'<span data-value="settings/final_days_excluded">{_e(days)}</span> days' if days is not None
                  else "a year")
    for section, figures in DETAIL_SECTIONS:
        shown = [(title_, path, [_lookup(row, path) for row in group["rows"]]) for title_, path in figures]
        shown = [item for item in shown if any(v is not None for v in item[2])]  # what this evaluation computed
        if shown:
            out.append(f'<tr><th class="section" colspan="{len(group["rows"]) + 1}">'
                       f"{section.format(final_days=final_days)}</th></tr>")  # the sections are our own text
        for title_, path, values in shown:
            out.append(_detail_row(table, group, t, title_, path, values))
    if any(row.get("selection") for row in group["rows"]):
        out.append(f'<tr><th class="section" colspan="{len(group["rows"]) + 1}">Selection (from the model\'s '
                   "info.json)</th></tr>")
        cells = [f'<td class="name">{_scalars(row["selection"], f"tasks/{t}/rows/{r}/selection")}</td>'
                 if row.get("selection") else '<td class="name">not recorded</td>' for r, row in enumerate(group["rows"])]
        out.append(f'<tr><td class="name">how it was chosen</td>{"".join(cells)}</tr>')
    out.append("</table></div>" + table.footnotes() + "</details>")
    return "\n".join(out)


def _detail_row(table: _Table, group: dict, t: int, title_: str, path: str, values: list) -> str:
    cells = []
    for r, (row, value) in enumerate(zip(group["rows"], values)):
        full = f"tasks/{t}/rows/{r}/{path}"
        if path == "counts/censored":
            cells.append(table.censored(row["counts"], full))
        elif path.startswith("counts/"):
            cells.append(table.count(value, full))
        else:
            cells.append(table.metric(value, full))
    return f'<tr><td class="name">{_e(title_)}</td>{"".join(cells)}</tr>'


def _censoring_table(group: dict, t: int) -> str:
    """Censored rows by calendar year of the horizon end, folded; nothing when metrics.json has none."""
    censoring = group.get("censoring")
    years = (censoring or {}).get("by_horizon_end_year") or []
    if not years:
        return ""
    table = _Table(f"t{t}c")
    base = f"tasks/{t}/censoring/by_horizon_end_year"
    out = [f"<details><summary>Censoring by calendar year of the horizon end "
           f"({_e(censoring.get('split', ''))})</summary>",
           '<table class="censoring"><tr><th>year</th><th>rows</th><th>censored</th><th>rate</th></tr>']
    for i, year in enumerate(years):
        rate = (f'<td data-number="{base}/{i}/rate">{year["rate"]:.3f}</td>' if year.get("rate") is not None
                else table.na("no rows that year", None))
        out.append(f'<tr><td data-value="{base}/{i}/year">{_e(year["year"])}</td>'
                   + table.count(year["rows"], f"{base}/{i}/rows") + table.count(year["censored"], f"{base}/{i}/censored")
                   + rate + "</tr>")
    out.append("</table>" + table.footnotes() + "</details>")
    return "\n".join(out)


def _calibration_tables(group: dict, t: int) -> str:
    parts = ['<details><summary>Calibration bins (counts per bin)</summary><div class="bins">']
    for r, row in enumerate(group["rows"]):
        cal = row.get("calibration") or {}
        parts.append(f"<div><h4>{_e(row['model'])}</h4>")
        if not cal.get("bins"):
            path = f"tasks/{t}/rows/{r}/calibration"
            parts.append(f'<p class="note">no calibration curve: <span data-reason="{path}">'
                         f'{_e(cal.get("reason") or "undefined")}</span></p></div>')
            continue
        parts.append("<table><tr><th>predicted risk range</th><th>rows</th><th>positives</th>"
                     "<th>mean predicted</th><th>observed rate [95% Wilson CI]</th></tr>")
        for b, item in enumerate(cal["bins"]):
            base = f"tasks/{t}/rows/{r}/calibration/bins/{b}"
            low, high = item["observed_ci"]
            parts.append(
                f'<tr><td><span data-number="{base}/lower">{item["lower"]:.4f}</span> to '
                f'<span data-number="{base}/upper">{item["upper"]:.4f}</span></td>'
                f'<td data-count="{base}/rows">{item["rows"]}</td><td data-count="{base}/positives">{item["positives"]}</td>'
                f'<td data-number="{base}/mean_predicted">{item["mean_predicted"]:.4f}</td>'
                f'<td><span data-number="{base}/observed_rate">{item["observed_rate"]:.4f}</span> '
                f'<span class="ci">[<span data-number="{base}/observed_ci/0">{low:.4f}</span>, '
                f'<span data-number="{base}/observed_ci/1">{high:.4f}</span>]</span></td></tr>')
        parts.append("</table></div>")
    parts.append("</div></details>")
    return "\n".join(parts)


def _inflation_table(block: dict, i: int) -> str:
    table = _Table(f"inflation{i}")
    with_subjects = any(m["all_occurrences"].get("positive_subjects") is not None for m in block["models"])
    positives = "<th>positives<br>rows / subjects</th>" if with_subjects else "<th>positive rows</th>"
    rows = [f"<h3>{_e(block['task'])}</h3>", f'<table class="inflation" id="inflation-{i}"><tr><th class="name">model</th>'
            f'<th class="name">repeat regularization</th><th>AUROC, all occurrences</th>{positives}'
            f"<th>AUROC, new onsets</th>{positives}<th>difference [95% CI]</th>"
            "<th>share of positives that recur</th></tr>"]
    for m, model in enumerate(block["models"]):
        base = f"inflation/{i}/models/{m}"
        new = model["new_onsets"]
        rows.append(
            f'<tr><td class="name">{_e(model["model"])}<span class="kind">{_e(model.get("kind", ""))}</span></td>'
            f'<td class="name" data-value="{base}/repeat_regularization">{_e(model["repeat_regularization"])}</td>'
            + table.metric(model["all_occurrences"]["auroc"], f"{base}/all_occurrences/auroc")
            + _positives_cell(model["all_occurrences"], f"{base}/all_occurrences", with_subjects)
            + table.metric(new["auroc"], f"{base}/new_onsets/auroc")
            + (_positives_cell(new, f"{base}/new_onsets", with_subjects) if "positives" in new
               else table.count(None, f"{base}/new_onsets/positives"))
            + table.metric(model["difference"], f"{base}/difference")
            + table.metric(model.get("recurrence_share_of_positives"), f"{base}/recurrence_share_of_positives")
            + "</tr>")
    rows.append("</table>")
    return "\n".join(rows) + table.footnotes()
