"""report.html against metrics.json: every referenced image exists, every number shown equals the number
saved, n/a cells carry their reason; rendered in headless Chromium when it is installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nextvisit.evaluate import evaluation as ev
from nextvisit.evaluate.tables import format_metric, headline_table
from test_evaluate import write_predictions

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class _Page(HTMLParser):
    """Collects image sources and the text of every tagged cell (data-metric / data-count / data-number)."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.cells: list[tuple[str, str, str]] = []  # (attribute, metrics.json path, text)
        self._open: tuple[str, str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for name in ("data-metric", "data-count", "data-number"):
            if name in attrs:
                self._open, self._text = (name, attrs[name]), []

    def handle_data(self, data):
        if self._open:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._open:
            self.cells.append((*self._open, "".join(self._text)))
            self._open = None


def _lookup(metrics: dict, path: str):
    node = metrics
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


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


def test_every_image_exists_and_every_number_matches_metrics_json(report):
    metrics = json.loads((report / "metrics.json").read_text())
    page = _Page()
    page.feed((report / "report.html").read_text())
    # 3 task-horizons with ROC, PR and calibration, plus the inflation plot.
    assert len(page.images) == 3 * 3 + 1
    for src in page.images:
        assert (report / src).is_file() and (report / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    checked = {"metric": 0, "na": 0, "count": 0, "number": 0}
    for attribute, path, text in page.cells:
        value = _lookup(metrics, path)
        if attribute == "data-metric":
            if value["value"] is None:
                assert text == f"n/a ({value['reason']})", path
                checked["na"] += 1
                continue
            shown = [float(x) for x in re.findall(r"-?\d+\.\d+", text)]
            expected = [value["value"]] + (value["ci"] if value["ci"] and "[" in text else [])
            assert shown == pytest.approx(expected, abs=5e-4), path
            assert len(shown) == len(expected), path
            checked["metric"] += 1
        elif attribute == "data-count":
            assert int(text) == value, path
            checked["count"] += 1
        else:
            assert float(text) == pytest.approx(value, abs=5e-5), path
            checked["number"] += 1
    assert checked["metric"] > 50 and checked["na"] > 5 and checked["count"] > 20 and checked["number"] > 20
    # Every model's headline AUROC is on the page.
    paths = {path for _, path, _ in page.cells}
    for t, group in enumerate(metrics["tasks"]):
        for r in range(len(group["rows"])):
            assert f"tasks/{t}/rows/{r}/auroc" in paths
    assert "inflation/0/models/1/new_onsets/auroc" in paths


def test_report_shows_configurations_reasons_and_inflation(report):
    text = (report / "report.html").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert '&quot;repeat_floor&quot;: 0.1' in text and '&quot;preset&quot;: &quot;tiny&quot;' in text
    assert "n/a (no labels: column boolean_value is missing)" in text
    assert "n/a (info.json has no label_counts)" in text  # the counts model recorded no censoring
    assert "Inflation: all occurrences vs new onsets" in text
    assert "repeat_decay=1.0" in text and "repeat_decay=0.5" in text
    assert metrics["warnings"] and all(html.escape(w) in text for w in metrics["warnings"])


def test_headline_table_matches_metrics_json(report):
    metrics = json.loads((report / "metrics.json").read_text())
    table = headline_table(metrics)
    for group in metrics["tasks"]:
        for row in group["rows"]:
            line = next(l for l in table.splitlines() if l.strip().startswith(row["model"]) and
                        f"{row['counts']['positives']}/{row['counts']['negatives']}" in l)
            if row["auroc"]["value"] is not None:
                assert format_metric(row["auroc"]) in line
            else:
                assert "n/a" in line
    block = metrics["inflation"][0]
    assert format_metric(block["models"][0]["new_onsets"]["auroc"]) in table


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package 'chromium')")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "page.png"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (report / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "nextvisit evaluation report" in dom.stdout and dom.stdout.count("<img") == 10
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,3000", (report / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
