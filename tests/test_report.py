"""report.html against metrics.json: every referenced image exists, every number shown equals the number
saved and no number on the page is untraceable, n/a cells point to footnotes holding their reason, the summary
names the right winner, and the page fits a 1400 px wide window in headless Chromium when it is installed."""

from __future__ import annotations

import copy
import doctest
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nextvisit.evaluate import evaluation as ev
from nextvisit.evaluate import report as report_module
from nextvisit.evaluate import tables
from nextvisit.evaluate.report import calibration_axes, forest_lines, write_report
from nextvisit.evaluate.tables import cell_summary, format_metric, headline_table, plain
from test_evaluate import write_predictions

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
LAPTOP_WIDTH = 1400
TAGS = ("data-metric", "data-count", "data-number", "data-value", "data-difference", "data-reason", "data-warning")
UNTRACED_TAGS = ("pre", "code", "style", "script", "title")  # verbatim configs and paths, not figures
CHANCE = "0.5"  # the one constant the page states as a number (chance AUROC, in the oracle-share formula)


class _Page(HTMLParser):
    """Image sources, the text of every tagged element (one of ``TAGS``), footnotes by id, the text outside
    tagged elements, and the text of every cell of the comparison tables."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tagged: list[tuple[str, str, str, dict]] = []  # (attribute, metrics.json path, text, attributes)
        self.footnotes: dict[str, str] = {}  # li id -> text
        self.untraced: list[str] = []
        self.main_cells: list[str] = []
        self._stack: list[list] = []  # open elements: [tag, tagged?, attrs, text parts]
        self._skip = 0
        self._table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("img", "br", "meta"):
            return
        if tag in UNTRACED_TAGS:
            self._skip += 1
        if tag == "table":
            self._table = attrs.get("class")
        self._stack.append([tag, any(name in attrs for name in TAGS), attrs, []])

    def handle_data(self, data):
        for element in self._stack:
            element[3].append(data)
        if not self._skip and not any(e[1] for e in self._stack):
            self.untraced.append(data)

    def handle_endtag(self, tag):
        if tag in ("img", "br", "meta") or not self._stack:
            return
        name, tagged, attrs, text = self._stack.pop()
        assert name == tag, f"unbalanced HTML: <{name}> closed by </{tag}>"
        text = "".join(text)
        if tag in UNTRACED_TAGS:
            self._skip -= 1
        if tagged:
            attribute = next(a for a in TAGS if a in attrs)
            self.tagged.append((attribute, attrs[attribute], text, attrs))
        if tag == "li" and "id" in attrs:
            self.footnotes[attrs["id"]] = text
        if tag == "td" and self._table == "metrics":
            self.main_cells.append(text)


def _parse(folder: Path) -> _Page:
    page = _Page()
    page.feed((folder / "report.html").read_text())
    assert not page._stack
    return page


def _lookup(metrics: dict, path: str):
    node = metrics
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _decimals(text: str) -> list[str]:
    return re.findall(r"-?\d+\.\d+", text)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    paths = [
        write_predictions(tmp_path / "p" / "oracle", "oracle", kind="oracle", horizons=(730, 1825)),
        write_predictions(tmp_path / "p" / "nextvisit", "nextvisit", horizons=(730, 1825), seed=1,
                          config={"loss": {"repeat_decay": 0.5, "repeat_floor": 0.1}, "preset": "tiny"}),
        write_predictions(tmp_path / "p" / "counts", "counts", kind="count-features", horizons=(730, 1825), seed=2,
                          noise=2.0, label_counts={}),
        write_predictions(tmp_path / "p" / "nolabels", "unlabelled", horizons=(730,), drop=("boolean_value",)),
        write_predictions(tmp_path / "occ" / "with", "nextvisit", task="dementia_next_visit", horizons=(0,),
                          prior_occurrence=True, config={"loss": {"repeat_decay": 0.5}}),
        write_predictions(tmp_path / "occ" / "without", "nextvisit", task="dementia_next_visit", horizons=(0,),
                          prior_occurrence=True, config={"loss": {"repeat_decay": 1.0}}, seed=3),
    ]
    out = tmp_path / "report"
    ev.evaluate(paths, out, n_bootstrap=100, seed=0, progress=False)
    return out


def _curves(metrics: dict) -> list[list[dict]]:
    """Plot data for `write_report` from metrics.json alone (calibration bins; no ROC/PR points)."""
    return [[{"model": r["model"], "kind": r["kind"], "calibration": (r.get("calibration") or {}).get("bins")}
             for r in group["rows"]] for group in metrics["tasks"]]


@pytest.fixture(scope="module")
def enriched(report, tmp_path_factory):
    """The fixture's metrics with every optional part present: an observable reference that beats every
    compared model, a selection record, censoring by year and IPCW figures on every row."""
    metrics = json.loads((report / "metrics.json").read_text())
    group = metrics["tasks"][0]
    best = max((r for r in group["rows"] if not r["is_oracle"] and r["auroc"]["value"] is not None),
               key=lambda r: r["auroc"]["value"])
    reference = copy.deepcopy(best)
    reference.update(model="observable", kind="observable-reference", source="observable")
    reference["auroc"] = {"value": min(0.99, best["auroc"]["value"] + 0.02), "ci": [0.5, 0.995], "reason": None}
    group["rows"].append(reference)
    for g in metrics["tasks"]:
        for r in g["rows"]:
            r["auroc_ipcw"] = {"value": 0.7123, "ci": [0.6012, 0.8034], "reason": None}
    best["selection"] = {"method": "grid on tuning AUROC", "tuning_positive_subjects": 41, "C": 0.1}
    group["censoring"] = {"split": "held_out", "by_horizon_end_year": [
        {"year": 2018, "rows": 120, "censored": 6, "rate": 0.05},
        {"year": 2019, "rows": 80, "censored": 20, "rate": 0.25}, {"year": 2020, "rows": 0, "censored": 0, "rate": None}]}
    metrics["settings"]["interval_method"] = "percentile interval of subject-level resamples"
    out = tmp_path_factory.mktemp("enriched")
    metrics["figures"] = write_report(metrics, _curves(metrics), out)
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture(scope="module")
def bare(report, tmp_path_factory):
    """The fixture's metrics without any of the optional parts (an older metrics.json)."""
    metrics = json.loads((report / "metrics.json").read_text())
    metrics["settings"].pop("interval_method", None)
    for group in metrics["tasks"]:
        group.pop("censoring", None)
        for r in group["rows"]:
            for key in [k for k in r if "ipcw" in k or "one_landmark" in k or "final_year" in k] + ["selection"]:
                r.pop(key, None)
            for key in ("positive_subjects", "negative_subjects", "tuning_positive_subjects"):
                r["counts"].pop(key, None)
    out = tmp_path_factory.mktemp("bare")
    metrics["figures"] = write_report(metrics, _curves(metrics), out)
    (out / "metrics.json").write_text(json.dumps(metrics))
    return out


@pytest.fixture(params=["report", "enriched", "bare"])
def folder(request):
    return request.getfixturevalue(request.param)


def test_every_image_exists_and_every_number_matches_metrics_json(folder):
    metrics = json.loads((folder / "metrics.json").read_text())
    page = _parse(folder)
    # The summary forest plot, ROC, PR and calibration per task table, the inflation plot.
    assert len(page.images) == 1 + 3 * len(metrics["tasks"]) + len(metrics["inflation"])
    for src in page.images:
        assert (folder / src).is_file() and (folder / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    checked = dict.fromkeys(TAGS + ("na",), 0)
    for attribute, path, text, attrs in page.tagged:
        if attribute == "data-difference":
            a, b = (_lookup(metrics, p)["value"] for p in path.split())
            assert float(text) == pytest.approx(a - b, abs=5e-4), path
            checked[attribute] += 1
            continue
        value = _lookup(metrics, path)
        if attribute == "data-metric" and value["value"] is None:
            assert re.fullmatch(r"n/a\d+", text), (path, text)  # a short marker, the reason in a footnote
            assert page.footnotes[attrs["data-footnote"]] == value["reason"], path
            checked["na"] += 1
        elif attribute == "data-metric":
            shown = [float(x) for x in _decimals(text)]
            expected = [value["value"]] + (value["ci"] if value["ci"] and "[" in text else [])
            assert shown == pytest.approx(expected, abs=5e-4), path
            assert len(shown) == len(expected), path
        elif attribute == "data-count":
            assert int(text) == value, path
        elif attribute == "data-number":
            digits = len(text.split(".")[1])
            assert float(text) == pytest.approx(value, abs=0.5 * 10 ** -digits + 1e-12), path
        elif attribute == "data-reason":
            assert text == value["reason"], path
        else:  # data-value, data-warning
            assert text == str(value), path
        checked[attribute] += 1
    assert checked["data-metric"] > 50 and checked["na"] > 5 and checked["data-count"] > 20
    assert checked["data-number"] > 20 and checked["data-difference"] == len(metrics["tasks"])
    assert checked["data-warning"] == len(metrics["warnings"]) > 0
    # Every model's headline AUROC is on the page, and every footnote marker has its footnote.
    paths = {path for _, path, _, _ in page.tagged}
    for t, group in enumerate(metrics["tasks"]):
        for r in range(len(group["rows"])):
            assert f"tasks/{t}/rows/{r}/auroc" in paths
    assert "inflation/0/models/1/new_onsets/auroc" in paths
    assert all(attrs["data-footnote"] in page.footnotes for *_, attrs in page.tagged if "data-footnote" in attrs)


def test_no_number_on_the_page_is_untraceable(folder):
    """A decimal number outside a tagged element (configs and paths aside) would be one no test checks."""
    untraced = " ".join(_parse(folder).untraced)
    assert set(_decimals(untraced)) <= {CHANCE}, sorted(set(_decimals(untraced)) - {CHANCE})


def test_tables_hold_main_columns_and_short_cells(report, enriched, bare):
    text = (report / "report.html").read_text()
    header = re.search(r'<table class="metrics" id="table-0"><tr>(.*?)</tr>', text).group(1)
    titles = [re.sub(r"<[^>]+>", " ", h).split() for h in re.findall(r"<th[^>]*>(.*?)</th>", header)]
    assert [" ".join(t) for t in titles] == ["model", "AUROC [95% CI]", "AUPRC [95% CI]", "IPCW AUROC [95% CI]",
                                             "Brier", "oracle share", "positives rows / subjects"]
    for folder in (report, enriched, bare):
        cells = _parse(folder).main_cells
        assert cells and max(len(c) for c in cells) <= 40, max(cells, key=len)  # no reason text in a cell
    bare_text = (bare / "report.html").read_text()
    assert "IPCW AUROC" not in bare_text.split('id="table-0"')[1].split("</tr>")[0]  # not computed: no column
    assert "positive rows</th>" in bare_text and "positive subjects not recorded" in bare_text
    # The other figures are folded, one column per model.
    details = text.split('id="details-0"')[1].split("</table>")[0]
    for title in ("AUROC, subject-weighted", "AUROC, age-sex-stratified", "F1", "threshold", "negative rows"):
        assert f">{title}<" in details
    # Reasons are listed once per table, under it.
    reasons = re.findall(r'<ol class="footnotes">(.*?)</ol>', text)
    assert reasons and all(len(set(r.split("</li>"))) == len(r.split("</li>")) for r in reasons)


def test_optional_parts_are_shown_folded(enriched):
    text = (enriched / "report.html").read_text()
    metrics = json.loads((enriched / "metrics.json").read_text())
    censoring = text.split("Censoring by calendar year of the horizon end")[1].split("</details>")[0]
    assert 'data-value="tasks/0/censoring/by_horizon_end_year/1/year">2019<' in censoring
    assert 'data-number="tasks/0/censoring/by_horizon_end_year/1/rate">0.250<' in censoring
    assert "n/a" in censoring  # a year without rows has no rate
    assert "Censoring by calendar year" not in text.split('id="task-1"')[1]  # only where metrics.json has it
    assert "grid on tuning AUROC" in text and ">41</span>" in text
    assert metrics["settings"]["interval_method"] in text.split('id="task-0"')[0]  # near the summary
    # The observable reference's row is marked apart, and the summary names it as a reference, not the winner.
    reference = next(i for i, r in enumerate(metrics["tasks"][0]["rows"]) if r["kind"] == "observable-reference")
    row = text.split('<tr class="observable-reference">')[1].split("</tr>")[0]
    assert f'data-metric="tasks/0/rows/{reference}/auroc"' in row
    assert "The observable reference (observable) reaches" in text.split('id="summary"')[1].split("</li>")[0]


def test_report_shows_configurations_and_inflation(report):
    text = (report / "report.html").read_text()
    assert "&quot;repeat_floor&quot;: 0.1" in text and "&quot;preset&quot;: &quot;tiny&quot;" in text
    assert "Inflation: all occurrences vs new onsets" in text
    assert ">repeat_decay=0.5<" in text and ">off (repeat_decay=1.0)<" in text
    assert "info.json has no label_counts" in text  # the counts model recorded no censoring: a footnote


def _group(rows: list[tuple[str, str, float | None, list | None]], horizon: int = 730) -> dict:
    return {"task": "dementia", "horizon_days": horizon, "rows": [
        {"model": name, "kind": kind, "is_oracle": kind == "oracle",
         "auroc": {"value": value, "ci": ci, "reason": None if value is not None else "0 positives"},
         "counts": {"positives": 30, "positive_subjects": 12, "subjects": 400}}
        for name, kind, value, ci in rows]}


def test_summary_names_the_winner_the_margin_and_whether_it_is_clear():
    references = [("oracle", "oracle", 0.95, [0.9, 0.97]), ("obs", "observable-reference", 0.93, [0.9, 0.96])]
    clear = plain(cell_summary(_group(references + [("a", "zero-shot", 0.70, [0.65, 0.75]),
                                                   ("b", "fine-tuned", 0.85, [0.80, 0.90])]), 0))
    # The references score higher but are never the winner.
    assert clear.startswith("b has the highest AUROC, 0.850 [0.800, 0.900], 0.150 above a")
    assert "do not overlap: a clear lead" in clear
    assert "The oracle reaches 0.950" in clear and "observable reference (obs) reaches 0.930" in clear
    assert "30 positive rows from 12 positive subjects among 400 subjects" in clear
    close = plain(cell_summary(_group([("a", "zero-shot", 0.80, [0.72, 0.86]), ("b", "zero-shot", 0.78, [0.70, 0.84]),
                                       ("c", "zero-shot", None, None)]), 0))
    assert "a has the highest AUROC" in close and "0.020 above b" in close and "overlap, so the lead is not clear" in close
    alone = plain(cell_summary(_group([("a", "zero-shot", 0.8, None), ("b", "zero-shot", None, None)], horizon=0), 0))
    assert alone.startswith("All occurrences") and "a is the only compared model with an AUROC: 0.800" in alone
    none = plain(cell_summary(_group([("oracle", "oracle", 0.9, None), ("a", "zero-shot", None, None)]), 0))
    assert "no compared model has an AUROC (0 positives)" in none


def test_summary_comes_first_with_a_forest_plot_of_every_model(enriched):
    metrics = json.loads((enriched / "metrics.json").read_text())
    text = (enriched / "report.html").read_text()
    summary = text.split('id="summary"')[1].split("<table")[0]
    assert metrics["figures"]["summary"] in summary and (enriched / metrics["figures"]["summary"]).is_file()
    assert summary.count("<li>") == len(metrics["tasks"])
    lines = forest_lines(metrics)
    assert sum(ln["role"] == "header" for ln in lines) == len(metrics["tasks"])
    drawn = [(ln["task"], ln["row"], ln["role"]) for ln in lines if ln["role"] != "header"]
    assert drawn == [(t, r, "oracle" if row["is_oracle"] else "observable-reference"
                      if row["kind"] == "observable-reference" else "compared")
                     for t, g in enumerate(metrics["tasks"]) for r, row in enumerate(g["rows"])]
    assert {"oracle", "observable-reference", "compared"} <= {role for *_, role in drawn}


def _bins(predicted: list[float], positives: list[int], rows: int = 200) -> list[dict]:
    return [{"mean_predicted": p, "observed_rate": k / rows, "rows": rows, "positives": k} for p, k in zip(predicted, positives)]


def test_calibration_axes_follow_the_predictions():
    # A rare outcome: nine bins within a few percent, the top bin far above, two bins without a positive.
    rare = [{"calibration": _bins([0.002, 0.004, 0.006, 0.008, 0.01, 0.013, 0.017, 0.024, 0.04, 0.25],
                                  [0, 1, 1, 0, 2, 3, 3, 5, 8, 46])}]
    scale, low, high = calibration_axes(rare)
    points = [b[k] for b in rare[0]["calibration"] for k in ("mean_predicted", "observed_rate")]
    assert scale == "log" and max(points) <= high <= 2 * max(points)  # not the mostly empty [0, 1] square
    assert all(low <= p <= high for p in points if p > 0)  # zeros are drawn at the low edge
    # The median bin lies mid-axis (in log units), not squeezed into a corner.
    median = sorted(points)[len(points) // 2]
    assert 0.3 < math.log(median / low) / math.log(high / low) < 0.8
    # Common risks: linear axes around the points.
    common = [{"calibration": _bins([0.3, 0.4, 0.5, 0.6], [55, 85, 100, 125])}]
    scale, low, high = calibration_axes(common)
    assert scale == "linear" and 0.2 < low < 0.275 and 0.625 < high < 0.7  # the points: 0.275 to 0.625


def test_doctests_of_the_formatting_and_report_modules():
    for module in (tables, report_module):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_headline_table_matches_metrics_json(report):
    metrics = json.loads((report / "metrics.json").read_text())
    table = headline_table(metrics)
    for t, group in enumerate(metrics["tasks"]):
        section = table.split(tables.title(group) + "\n")[1].split("\n\n")[0]
        assert " ".join(plain(cell_summary(group, t)).split()) in " ".join(section.split())
        for row in group["rows"]:
            table_rows = section.split("-\n", 1)[1]  # below the table's rule of dashes
            line = next(ln for ln in table_rows.splitlines() if ln.strip().startswith(row["model"]))
            assert f"{row['counts']['positives']}/{row['counts']['positive_subjects']}" in line
            if row["auroc"]["value"] is not None:
                assert format_metric(row["auroc"]) in line
            else:
                number = re.search(r"n/a\[(\d+)\]", line).group(1)
                assert f"  [{number}] {row['auroc']['reason']}" in section
    block = metrics["inflation"][0]
    assert format_metric(block["models"][0]["new_onsets"]["auroc"]) in table


# The page measured in the browser: every folded part opened, then the document's and the widest element's
# width written into the DOM for --dump-dom to print.
LAYOUT_SCRIPT = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const root = document.documentElement;
  const rights = [...document.body.querySelectorAll("*")].map(e => e.getBoundingClientRect().right);
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({scrollWidth: root.scrollWidth, clientWidth: root.clientWidth,
    rightmost: Math.max(...rights), images: document.images.length,
    loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length});
  document.body.appendChild(out);
});
</script>"""


def _layout(folder: Path, extra: str = "") -> dict:
    probe = folder / ".layout_probe.html"  # beside report.html, so its images load
    probe.write_text((folder / "report.html").read_text().replace("</body>", extra + LAYOUT_SCRIPT + "</body>"))
    try:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              f"--window-size={LAPTOP_WIDTH},900", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120, check=False)
    finally:
        probe.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="layout">([^<]*)</pre>', dom.stdout)
    assert found, "the layout probe did not run: " + dom.stdout[-500:]
    return json.loads(found.group(1))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package 'chromium', "
                                            "/usr/bin/chromium); the layout check needs a browser")
def test_report_fits_a_laptop_screen_in_headless_chromium(report, enriched, tmp_path):
    for folder in (report, enriched):
        layout = _layout(folder)
        assert layout["clientWidth"] > LAPTOP_WIDTH - 50  # the window size was honoured (minus a scrollbar)
        assert layout["images"] == layout["loaded"] == len(_parse(folder).images)
        # No horizontal overflow, with every <details> open: the page and its widest element fit the window.
        assert layout["scrollWidth"] <= layout["clientWidth"], layout
        assert layout["rightmost"] <= layout["clientWidth"], layout
    # The probe sees an overflow when there is one (a table wider than the window).
    wide = _layout(report, '<table><tr><td style="white-space: nowrap">' + "0.123 [0.100, 0.150] " * 120 + "</td></tr></table>")
    assert wide["scrollWidth"] > wide["clientWidth"] + 1000
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    f"--window-size={LAPTOP_WIDTH},3000", (enriched / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
