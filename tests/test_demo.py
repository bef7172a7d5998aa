"""End to end: `nextvisit demo --quick` runs every stage on a small simulated cohort and the report holds
every model for every task and horizon. Figures at this size are not meaningful; the wiring is."""

import json
import re

from nextvisit.cli import main


def test_quick_demo_runs_the_whole_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--subjects", "1000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out / "report"
    assert f"Report: {(report / 'report.html').resolve()}" in printed

    metrics = json.loads((report / "metrics.json").read_text())
    groups = {(g["task"], g["horizon_days"]): {r["model"] for r in g["rows"]} for g in metrics["tasks"]}
    for task in ("dementia", "knee_oa"):
        for horizon in (730, 1825):
            assert groups[(task, horizon)] == {"oracle", "observable_reference", "nextvisit", "counts-logistic",
                                               "masked-tiny"}
        # the inflation analysis compares the model with and without repeat regularization, beside age and sex
        assert groups[(f"{task}_next_visit", 0)] == {"nextvisit", "nextvisit_no_repeat_reg", "age_sex_reference"}
    assert {g["task"] for g in metrics["inflation"]} == {"dementia_next_visit", "knee_oa_next_visit"}

    html = (report / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images and all((report / src).is_file() for src in images)

    # the same seed gives the same figures: every number of a second demo's metrics.json (its own paths aside)
    again = tmp_path / "again"
    assert main(["demo", "--quick", "--subjects", "1000", "--out", str(again)]) == 0
    capsys.readouterr()

    def figures(folder):
        document = json.loads((folder / "report" / "metrics.json").read_text().replace(str(folder), "DEMO"))
        document.pop("created")
        return document

    assert figures(again) == figures(out)

    # a rerun replaces the demo's own folder, but a folder the demo did not make is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    assert main(["demo", "--quick", "--out", str(foreign)]) == 2
    assert (foreign / "keep.txt").read_text() == "user data"
    assert "not a folder made by `nextvisit demo`" in capsys.readouterr().err
