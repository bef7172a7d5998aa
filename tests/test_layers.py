"""The layering of docs/architecture.md holds: `lint-imports` keeps every contract of pyproject.toml, the
checker fails when a module breaks one, and the count baseline and evaluation run without torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True)


def test_import_contracts_are_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    # inference imports the trainer
    ("predict/horizon.py", "import nextvisit.train.trainer", "Stages are layered"),
    # evaluation imports model code
    ("evaluate/tables.py", "import nextvisit.model.run", "Evaluation imports no model code"),
    # the count baseline pulls in torch
    ("baselines/counts.py", "import torch", "The count baseline runs on scikit-learn alone"),
    # a cycle inside a package
    ("evaluate/metrics.py", "import nextvisit.evaluate.evaluation", "No import cycles"),
])
def test_a_broken_contract_fails_the_check(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "src" / "nextvisit" / module
    path.write_text(path.read_text() + f"\n{line}  # a mutation\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout


@pytest.mark.parametrize("module", ["nextvisit.baselines.counts", "nextvisit.evaluate.evaluation",
                                    "nextvisit.evaluate.report"])
def test_module_runs_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
