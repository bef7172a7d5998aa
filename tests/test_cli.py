"""The command line: every verb explains itself, and bad options give one line that says what to do."""

import subprocess
import sys

import pytest

from nextvisit.cli import build_parser, main

VERBS = [
    ["simulate"], ["tokenize"], ["inspect"], ["pretrain"], ["label"], ["forecast"], ["occurrence"], ["oracle"],
    ["baseline"], ["baseline", "masked"], ["baseline", "masked", "pretrain"], ["baseline", "masked", "finetune"],
    ["baseline", "counts"], ["evaluate"], ["export-meds-eval"], ["export-aces"], ["medsdev"],
    ["medsdev", "unsupervised-train"], ["medsdev", "supervised-train"], ["medsdev", "predict"],
    ["medsdev", "model-dir"], ["convert"], ["convert", "omop"], ["demo"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: nextvisit " + " ".join(verb))
    assert len(text.splitlines()) > 3  # a description and options, not just a usage line


def test_unknown_option_is_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "nextvisit.cli", "evaluate", "x", "--out", "y", "--no-such-option"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--no-such-option" in lines[0] and "--help" in lines[0]
    assert "Traceback" not in result.stderr


def test_zero_or_negative_subjects_refused(capsys):
    for value in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_info:
            main(["simulate", "--subjects", value, "--out", "unused"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--subjects" in err and "at least 1" in err


def test_top_level_help_lists_every_verb():
    help_text = build_parser().format_help()
    for verb in {v[0] for v in VERBS}:
        assert verb in help_text


DEVICE_VERBS = [
    ["pretrain", "STORE", "--out", "RUN"], ["forecast", "RUN", "MEDS", "LABELS", "--out", "PRED"],
    ["occurrence", "RUN", "STORE", "dementia", "--out", "PRED"], ["baseline", "masked", "pretrain", "STORE", "--out", "RUN"],
    ["baseline", "masked", "finetune", "RUN", "MEDS", "LABELS", "--out", "RUN2"],
    ["medsdev", "unsupervised-train", "--dataset-dir", "MEDS", "--output-dir", "OUT"],
    ["medsdev", "predict", "--dataset-dir", "MEDS", "--labels-dir", "LABELS", "--model-initialization-dir", "M",
     "--output-dir", "OUT"],
]


@pytest.mark.parametrize("verb", DEVICE_VERBS, ids=lambda v: " ".join(v[:3]))
def test_unknown_or_unavailable_device_is_one_line(verb, capsys):
    import torch

    bad = ["gpu", "cuda:x", "cpu:0"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit) as exit_info:
            main([*verb, "--device", device])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--device" in err and "Traceback" not in err, err


def test_bad_max_time_is_one_line_naming_the_option(capsys):
    for value in ("tomorrow", "2203-13-01", "2203-01-01T00:00+01:00", "None", ""):
        with pytest.raises(SystemExit) as exit_info:
            main(["tokenize", "MEDS", "--out", "STORE", "--max-time", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--max-time" in err and repr(value) in err, err
        assert "now, none or an ISO date" in err and "Traceback" not in err
