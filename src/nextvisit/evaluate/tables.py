"""How metric values are shown as text: `format_metric` for every number in the report and on stdout, and the
plain-text headline tables printed by ``nextvisit evaluate``.

Contract: functions of metric value dicts (``{"value", "ci", "reason"}``, see `nextvisit.evaluate.metrics`)
and of the metrics.json document only; they compute nothing and import nothing else of the package, so
the HTML report and the terminal share one formatting.
"""

from __future__ import annotations


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


# --------------------------------------------------------------------------------------------------------
# The headline table


HEADLINE_COLUMNS = (
    ("model", "model"), ("kind", "kind"), ("AUROC [95% CI]", "auroc"), ("AUPRC [95% CI]", "auprc"),
    ("F1", "f1"), ("age-sex AUROC", "auroc_age_sex_stratified"), ("oracle share", "oracle_share"),
    ("pos/neg", None),
)


def _short(m: dict, with_ci: bool = True) -> str:
    """A table cell: the number, or just 'n/a' (the reason is in the report and metrics.json)."""
    return format_metric(m, with_ci=with_ci) if m and m.get("value") is not None else "n/a"


def headline_table(metrics: dict) -> str:
    """The comparison tables (and the inflation table) as plain text, for the terminal."""
    lines = []
    for group in metrics["tasks"]:
        header = f"{group['task']}, {group['horizon_days']} days"
        if group["horizon_days"] == 0:
            header = f"{group['task']} (next visit)"
        lines.append(header)
        table = [[title for title, _ in HEADLINE_COLUMNS]]
        for r in group["rows"]:
            cells = [r["model"] + (" (oracle)" if r["is_oracle"] else ""), r["kind"]]
            for _, key in HEADLINE_COLUMNS[2:-1]:
                if key == "oracle_share" and r["is_oracle"]:
                    cells.append("ref")
                else:
                    cells.append(_short(r.get(key), with_ci=key in ("auroc", "auprc")))
            cells.append(f"{r['counts']['positives']}/{r['counts']['negatives']}")
            table.append(cells)
        lines += _text_table(table)
        for r in group["rows"]:  # why each n/a is n/a, one line per model
            reasons: dict[str, list[str]] = {}
            for title, key in HEADLINE_COLUMNS[2:-1]:
                m = r.get(key)
                if not (key == "oracle_share" and r["is_oracle"]) and isinstance(m, dict) and m.get("value") is None:
                    reasons.setdefault(m.get("reason") or "undefined", []).append(title.split(" [")[0])
            if reasons:
                lines.append(f"  n/a for {r['model']}: "
                             + "; ".join(f"{', '.join(titles)}: {reason}" for reason, titles in reasons.items()))
        lines.append("")
    for block in metrics["inflation"]:
        lines.append(f"Inflation: {block['task']} (AUROC, all occurrences vs new onsets)")
        table = [["model", "repeat regularization", "all occurrences", "new onsets", "difference"]]
        for m in block["models"]:
            table.append([m["model"], m["repeat_regularization"], _short(m["all_occurrences"]["auroc"]),
                          _short(m["new_onsets"]["auroc"]), _short(m["difference"])])
        lines += _text_table(table)
        lines.append("")
    if metrics["warnings"]:
        lines.append(f"{len(metrics['warnings'])} warning(s); see metrics.json or the report")
    return "\n".join(lines).rstrip() + "\n"


def _text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out

