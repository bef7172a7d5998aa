"""Many machines: the real command line under ``torchrun --nnodes 2 --nproc-per-node 1`` over the c10d
rendezvous on localhost, two launchers started at once as two nodes would start them (gloo on CPU).

- pretraining on two nodes ends with the same weights, bit for bit, and the same metrics.csv, digit for digit, as
  one process at the same global batch (8 contexts: one micro-batch of 4 per node, two of 4 on one process; each
  micro-batch is the same 4 contexts either way, and a sum of two gradients is the same in either order);
- forecast on two nodes deals its batches of queries to the nodes (each scores a part) and writes one predictions
  file, equal to the one process's;
- a refusal on one node (a non-empty ``--out``) stops both, with the message, instead of leaving one waiting.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from nextvisit.cli import main as cli_main
from test_crashes import curve, simulated_data
from test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # a launcher pair that has not finished by then has hung (e.g. one node waiting for the other)
PRETRAIN = dict(max_steps=4, batch_contexts=8, micro_batch=4, eval_every=2, eval_contexts=8, checkpoint_every=2,
                log_every=1, threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_nodes(argv: list, logs: list[Path]) -> list[int]:
    """Run ``nextvisit ARGV`` as torchrun would on two nodes of one process each (one launcher per node, started
    together, meeting at a c10d rendezvous on localhost); the launchers' exit codes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}",
                "--rdzv-id", f"nextvisit-{uuid.uuid4().hex[:8]}", "-m", "nextvisit.cli", *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1", POLARS_MAX_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    handles = [open(log, "w") for log in logs]
    processes = [subprocess.Popen(launcher, stdout=h, stderr=subprocess.STDOUT, env=env) for h in handles]
    try:
        return [p.wait(timeout=TIMEOUT_S) for p in processes]
    except subprocess.TimeoutExpired:
        raise AssertionError("the two nodes hung:\n" + "\n".join(log.read_text()[-1500:] for log in logs)) from None
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for handle in handles:
            handle.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A simulated MEDS dataset, its token store, dementia labels, and one process's pretraining run."""
    root = tmp_path_factory.mktemp("distributed")
    meds, store, labels = simulated_data(root)
    config = root / "pretrain.yaml"
    tiny_config(**PRETRAIN).save(config)
    run = root / "run"
    assert cli_main(["pretrain", str(store), "--out", str(run), "--config", str(config), "--device", "cpu"]) == 0
    return {"root": root, "meds": meds, "store": store, "labels": labels, "config": config, "run": run}


def test_pretraining_on_two_nodes_matches_one_process(world, tmp_path):
    run = tmp_path / "run"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    codes = on_two_nodes(["pretrain", world["store"], "--out", run, "--config", world["config"], "--device", "cpu"],
                         logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    assert any("2 process(es)" in log.read_text() for log in logs)  # one DDP run of two processes, not two runs
    got, expected = curve(run), curve(world["run"])
    assert [int(r["step"]) for r in got if r["loss"]] == list(range(1, PRETRAIN["max_steps"] + 1))
    assert got == expected
    final, reference = load_file(str(run / "model.safetensors")), load_file(str(world["run"] / "model.safetensors"))
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in reference)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")) == []  # lock released


def test_forecast_on_two_nodes_writes_the_one_process_predictions(world, tmp_path):
    # small batches, so that each node gets several
    argv = ["forecast", world["run"], world["meds"], world["labels"], "--device", "cpu", "--batch-size", "4"]
    one = tmp_path / "one"
    assert cli_main([*map(str, argv), "--out", str(one)]) == 0
    two = tmp_path / "two"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    codes = on_two_nodes([*argv, "--out", two], logs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    shares = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if "queries" in line and " of 2 scored " in line:
                words = line.split()
                shares[int(words[words.index("process") + 1])] = (int(words[-4].replace(",", "")),
                                                                  int(words[-2].replace(",", "")))
    assert sorted(shares) == [0, 1]
    (mine0, total), (mine1, _) = shares[0], shares[1]
    assert mine0 > 0 and mine1 > 0 and mine0 + mine1 == total  # each node scored a part, together all
    expected = pl.read_parquet(one / "predictions.parquet")
    got = pl.read_parquet(two / "predictions.parquet")
    assert got.height == expected.height > 0
    assert got.equals(expected)  # the same rows in the same order, every probability bit for bit
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".two.")] == []  # no part file, no lock left


def test_rows_without_a_visit_are_counted_alike_on_two_nodes(world, tmp_path):
    """Label rows predicting before a subject's first visit are left unscored (null) and counted, and the nodes
    agree: the two-node predictions and their count equal one process's."""
    from nextvisit.tasks import labels_path

    labels = shutil.copytree(world["labels"], tmp_path / "labels")
    rows = pl.read_parquet(labels_path(labels))
    events = pl.read_parquet(world["meds"] / "data")
    first_visit = events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH")).group_by(
        "subject_id").agg(pl.col("time").min().alias("first"))
    labelled = rows.filter(pl.col("boolean_value").is_not_null() & pl.col("split").is_in(["tuning", "held_out"]))
    early = labelled.unique("subject_id", keep="first").sort("subject_id").head(3).join(first_visit, on="subject_id") \
        .with_columns(prediction_time=pl.col("first") - pl.duration(days=1)).drop("first")
    pl.concat([rows, early.select(rows.columns)]).write_parquet(labels_path(labels))
    argv = ["forecast", world["run"], world["meds"], labels, "--device", "cpu", "--batch-size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main([*map(str, argv), "--out", str(one)]) == 0
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    assert on_two_nodes([*argv, "--out", two], logs) == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    expected, got = pl.read_parquet(one / "predictions.parquet"), pl.read_parquet(two / "predictions.parquet")
    assert got.equals(expected)
    nulls = got.filter(pl.col("predicted_boolean_probability").is_null())
    assert sorted(nulls["subject_id"].unique().to_list()) == sorted(early["subject_id"].to_list())
    counted = [json.loads((folder / "info.json").read_text())["rows_without_history"] for folder in (one, two)]
    assert counted[0] == counted[1] and counted[0]["histories"] == 3 and counted[0]["rows"] == nulls.height


def test_a_refusal_on_one_node_stops_both(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    codes = on_two_nodes(["forecast", world["run"], world["meds"], world["labels"], "--device", "cpu", "--out", out],
                         logs)
    assert 0 not in codes
    refusal = f"{out}: exists and is not empty; choose another --out or pass --overwrite to replace it"
    texts = [log.read_text() for log in logs]
    # process 0's own error, and the other's, which quotes it
    assert sum(f"nextvisit forecast: error: {refusal}" in text for text in texts) == 1
    assert sum(f"nextvisit forecast: error: process 0 of 2 stopped: {refusal}" in text for text in texts) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
