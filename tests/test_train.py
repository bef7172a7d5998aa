"""The trainer: run folder contract, learning on a tiny store, exact resume, the same run bit for bit at the same
seed and thread count, bad input (DDP: tests/test_distributed.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nextvisit.config import RunConfig, preset, resolve
from nextvisit.errors import UserError
from nextvisit.tokenize.store import SPECIAL_TOKENS, SplitWriter, Vocabulary, write_store_info
from nextvisit.model.run import load_next_visit_run as load_run
from nextvisit.train.trainer import train

N_CODES = 24


def make_store(path: Path, n_subjects=(300, 60, 20), seed=0) -> Path:
    """A token store with learnable structure: a chronic code that recurs at most visits once it starts,
    a code pair where ``code_2k`` predicts ``code_2k+1`` at the next visit (a new onset), and age tokens."""
    tokens = list(SPECIAL_TOKENS) + [f"AGE//{10 * i}" for i in range(10)] + [f"ICD10CM//C{i:02d}" for i in range(N_CODES)]
    kinds = ["special"] * len(SPECIAL_TOKENS) + ["age"] * 10 + ["code"] * N_CODES
    vocab = Vocabulary(tokens, kinds)
    path.mkdir(parents=True)
    vocab.save(path / "vocab.json")
    code0 = len(SPECIAL_TOKENS) + 10
    rng = np.random.default_rng(seed)
    sizes = {}
    next_id = 0
    for split, n in zip(("train", "tuning", "held_out"), n_subjects):
        writer = SplitWriter(path / split)
        for _ in range(n):
            n_visits = int(rng.integers(2, 14))
            days = np.cumsum(rng.integers(1, 200, size=n_visits)) + 15000
            chronic = code0 + int(rng.integers(0, 4))
            chronic_from = int(rng.integers(0, n_visits))
            visits, pending = [], None
            for v in range(n_visits):
                visit = {len(SPECIAL_TOKENS) + min(9, v // 3)}
                if v >= chronic_from:
                    visit.add(chronic)
                if pending is not None:
                    visit.add(pending)
                    pending = None
                trigger = code0 + 4 + 2 * int(rng.integers(0, (N_CODES - 4) // 2))
                if rng.random() < 0.5:
                    visit.add(trigger)
                    pending = trigger + 1
                if rng.random() < 0.3:  # noise
                    visit.add(code0 + int(rng.integers(0, N_CODES)))
                visits.append(sorted(visit))
            writer.append(next_id, 0, days, [len(v) for v in visits], np.concatenate(visits))
            next_id += 1
        sizes[split] = writer.close()
    write_store_info(path, sizes, len(vocab))
    return path


def tiny_config(**train) -> RunConfig:
    config = preset("tiny")
    config.model.d_model, config.model.n_layers, config.model.n_heads = 32, 2, 2
    config.data.context = 64
    t = dict(batch_contexts=8, micro_batch=4, max_steps=12, warmup_steps=2, eval_every=6, eval_contexts=8,
             checkpoint_every=4, log_every=1, lr=3e-3, precision="fp32", threads=1)
    t.update(train)
    for key, value in t.items():
        setattr(config.train, key, value)
    return config


def trained_model(tmp_path: Path, steps: int = 30, **model_options):
    """A ``tiny_config`` run of ``steps`` steps on ``make_store`` with ``model.<option>`` overrides, trained and
    loaded back: (its final metrics row, the model, its config)."""
    from nextvisit.model.run import load_next_visit_run
    from nextvisit.train.trainer import train

    store = make_store(tmp_path / "store")
    config = tiny_config(max_steps=steps, eval_every=steps, checkpoint_every=steps)
    for key, value in model_options.items():
        setattr(config.model, key, value)
    last = train(store, tmp_path / "run", config, progress=False)
    model, _, loaded = load_next_visit_run(tmp_path / "run", "cpu")
    return last, model, loaded


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "store")


def test_run_folder_contract_and_load_run(store, tmp_path):
    run = tmp_path / "run"
    train(store, run, tiny_config(), progress=False)
    for name in ("config.yaml", "vocab.json", "model.safetensors", "metrics.csv", "checkpoint/state.json"):
        assert (run / name).exists(), name
    model, vocab, config = load_run(run, "cpu")
    assert len(vocab) == config.model.vocab_size == model.embed.weight.shape[0]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 12
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if r["loss"]][:3] == [1, 2, 3]
    assert any(r["val_loss"] for r in rows)


def test_learns_beyond_code_frequency_baseline(store, tmp_path):
    """The model overfits a tiny store: validation loss clearly below the frequency baseline and new onsets
    (the code that follows a trigger) ranked far better than chance."""
    config = tiny_config(max_steps=200, eval_every=200, eval_contexts=0, checkpoint_every=1000, log_every=50,
                         lr=3e-3, warmup_steps=10, decay_steps=190)
    config.model.d_model = 64
    last = train(store, tmp_path / "run", config, progress=False)
    # the baseline is the best constant logit per token under the same loss (not just the calibrated rate)
    assert float(last["val_loss"]) < 0.95 * float(last["val_loss_frequency_baseline"])
    assert float(last["val_new_onset_auroc"]) > 0.7
    assert float(last["val_new_onset_auroc"]) > float(last["val_new_onset_auroc_frequency_baseline"]) + 0.1


def test_resume_reproduces_uninterrupted_loss_curve(store, tmp_path, monkeypatch):
    import nextvisit.train.loop as loop_module

    config = tiny_config(max_steps=12, eval_every=1000, checkpoint_every=4)
    train(store, tmp_path / "full", config, progress=False)
    # interrupted at step 10 (after the step-8 checkpoint, with rows 9 and 10 already in metrics.csv)
    real = loop_module.learning_rate

    def interrupt(step, train_config):
        if step == 10:
            raise KeyboardInterrupt
        return real(step, train_config)

    monkeypatch.setattr(loop_module, "learning_rate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(store, tmp_path / "parts", tiny_config(max_steps=12, eval_every=1000, checkpoint_every=4), progress=False)
    assert json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())["step"] == 8
    monkeypatch.setattr(loop_module, "learning_rate", real)
    train(store, tmp_path / "parts", RunConfig(), resume=True, progress=False)
    full = [(int(r["step"]), float(r["loss"])) for r in read_metrics(tmp_path / "full") if r["loss"]]
    parts = [(int(r["step"]), float(r["loss"])) for r in read_metrics(tmp_path / "parts") if r["loss"]]
    assert [s for s, _ in parts] == list(range(1, 13))
    np.testing.assert_allclose([l for _, l in parts], [l for _, l in full], rtol=1e-6)


def test_time_budget_stops_with_a_checkpoint(store, tmp_path):
    last = train(store, tmp_path / "run", tiny_config(max_steps=10_000), max_minutes=0.05, progress=False)
    step = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < step < 10_000 and int(last["step"]) == step and last["val_loss"]


def test_max_steps_overrides_the_configured_step_limit(store, tmp_path):
    """``max_steps`` stops this invocation after that many optimizer steps, with a logged loss, a validation and
    a checkpoint at that step, and leaves the run's config.yaml as configured (as ``max_minutes`` does)."""
    run = tmp_path / "run"
    last = train(store, run, tiny_config(max_steps=12, log_every=5, eval_every=1000, checkpoint_every=1000),
                 max_steps=3, progress=False)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and (state["epoch"], state["index"]) == (0, 3 * 8)  # 3 steps of 8 contexts
    assert int(last["step"]) == 3 and last["val_loss"]
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if r["loss"]] == [3]  # the limit's step is logged, as train.max_steps's is
    assert int(rows[-1]["step"]) == 3 and rows[-1]["val_loss"]
    assert RunConfig.load(run / "config.yaml").train.max_steps == 12
    # it counts from the run's start, also on resume, and may lie beyond train.max_steps
    last = train(store, run, RunConfig(), resume=True, max_steps=15, progress=False)
    assert int(last["step"]) == 15
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 15


def test_bad_inputs_are_user_errors(store, tmp_path):
    with pytest.raises(UserError, match="not a token store"):
        train(tmp_path / "nowhere", tmp_path / "r0", tiny_config(), progress=False)
    run = tmp_path / "run"
    train(store, run, tiny_config(max_steps=4), progress=False)
    with pytest.raises(UserError, match="not empty"):
        train(store, run, tiny_config(), progress=False)
    # a store with another vocabulary cannot resume this run
    other = make_store(tmp_path / "other", n_subjects=(10, 4, 2))
    vocab = Vocabulary.load(other / "vocab.json")
    vocab.tokens[-1] = "ICD10CM//Z99"
    vocab.save(other / "vocab.json")
    with pytest.raises(UserError, match="vocabulary differs"):
        train(other, run, RunConfig(), resume=True, progress=False)
    # corrupt weights
    (run / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_run(run, "cpu")
    (run / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        train(store, run, RunConfig(), resume=True, progress=False)


def test_store_without_train_subjects_leaves_no_run_folder(tmp_path):
    empty_train = make_store(tmp_path / "empty_train", n_subjects=(0, 2, 1))
    run = tmp_path / "run"
    with pytest.raises(UserError, match="train split is empty"):
        train(empty_train, run, tiny_config(), progress=False)
    assert not run.exists()  # no half-made run that a retry would refuse as "not empty"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    import nextvisit.model.fused_head as fused_head_module

    real = fused_head_module.next_visit_loss_from_hidden
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 12 else loss  # step 7 onwards (2 micro-batches per step)

    monkeypatch.setattr(fused_head_module, "next_visit_loss_from_hidden", poisoned)
    with pytest.raises(UserError, match="nan at step 6.*step 4"):
        train(store, run, tiny_config(), progress=False)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4
    model, _, _ = load_run(run, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_config_yaml_round_trip_and_unknown_keys(tmp_path):
    config = preset("paper")
    assert (config.model.n_layers, config.model.n_heads, config.model.d_model) == (8, 8, 1024)
    config.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == config
    (tmp_path / "o.yaml").write_text("model:\n  n_layer: 4\n")
    with pytest.raises(UserError, match="unknown field 'model.n_layer'"):
        resolve("tiny", tmp_path / "o.yaml")
    (tmp_path / "o.yaml").write_text("model:\n  n_layers: 4\nloss:\n  kind: bce\n")
    config = resolve("tiny", tmp_path / "o.yaml")
    assert config.model.n_layers == 4 and config.loss.kind == "bce"


def test_same_seed_and_thread_count_give_the_same_run_bit_for_bit(store, tmp_path):
    """Two runs of the command line, in fresh processes, at the same seed and CPU thread count: the same weights bit
    for bit and the same metrics.csv digit for digit (all but the wall-clock columns), in the default precision. The
    first takes its thread count from the environment and writes it to its config.yaml; the second sets it there,
    in an environment that would give another."""
    from safetensors.torch import load_file

    runs = {}
    for name, config_threads, environment_threads in (("first", 0, "2"), ("second", 2, "1")):
        config = tiny_config(threads=config_threads, precision="auto", max_steps=6, eval_every=3, checkpoint_every=3)
        config.save(tmp_path / f"{name}.yaml")
        done = subprocess.run([sys.executable, "-m", "nextvisit.cli", "pretrain", str(store), "--out",
                               str(tmp_path / name), "--config", str(tmp_path / f"{name}.yaml"), "--device", "cpu"],
                              # (a passive wait: two spinning threads on a busy machine take minutes)
                              env=dict(os.environ, OMP_NUM_THREADS=environment_threads, OMP_WAIT_POLICY="PASSIVE"),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "(2 threads)" in done.stderr
        runs[name] = tmp_path / name
    assert RunConfig.load(runs["first"] / "config.yaml").train.threads == 2
    timing = {"tokens_per_s", "elapsed_s"}
    curves = {name: [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(run)]
              for name, run in runs.items()}
    assert len(curves["first"]) >= 6 and curves["first"] == curves["second"]
    first, second = (load_file(str(runs[name] / "model.safetensors")) for name in ("first", "second"))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_out_of_memory_and_foreign_weights_are_user_errors(store, tmp_path, monkeypatch):
    import nextvisit.model.fused_head as fused_head_module
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    train(store, run, tiny_config(max_steps=4), progress=False)

    def exhausted(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(fused_head_module, "next_visit_loss_from_hidden", exhausted)
    with pytest.raises(UserError, match="out of memory.*lower train.micro_batch"):
        train(store, tmp_path / "oom", tiny_config(), progress=False)
    monkeypatch.undo()
    # weights of another vocabulary size in a run folder
    weights = load_file(str(run / "model.safetensors"))
    weights["embed.weight"] = torch.zeros(weights["embed.weight"].shape[0] + 5, weights["embed.weight"].shape[1])
    save_file(weights, str(run / "model.safetensors"))
    with pytest.raises(UserError, match="another vocabulary"):
        load_run(run, "cpu")


ALLOCATION_PROBE = r"""
import ctypes, sys, torch
from nextvisit.train.memory import keep_large_buffers_in_the_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_large_buffers_in_the_heap() if sys.argv[1] == "on" else False
before = libc.mallinfo2()
x = torch.empty(6_000_000)  # 24 MB, the size of a large per-step buffer
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
# mapped: bytes of fresh mappings for the tensor; kept: heap bytes still held after it is freed
print(applied, during.hblkhd - before.hblkhd, after.arena - before.arena)
"""


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return ()
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_training_buffers_stay_in_the_heap():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", ALLOCATION_PROBE, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", int(out[1]), int(out[2])

    applied, mapped, kept = probe("on")
    assert applied and mapped == 0  # served from the heap ...
    # ... and still held after it is freed, for the next step (the heap grows by the tensor's 24 MB less whatever
    # free space it already had, which depends on what was imported before)
    assert kept >= 20_000_000
    applied, mapped, kept = probe("off")  # glibc's default: a fresh mapping, unmapped again when freed
    assert not applied and mapped >= 24_000_000 and kept < 20_000_000


def test_weight_averaging_publishes_and_validates_the_moving_average_and_resumes_exactly(store, tmp_path):
    """``train.ema_decay``: the optimizer steps the trained weights exactly as without it (the checkpoint's weights
    equal a plain run's), while model.safetensors and every validation are the moving average, which --resume
    continues exactly."""
    from safetensors.torch import load_file

    from nextvisit.model.run import autocast_for
    from nextvisit.tokenize.store import TokenStore
    from nextvisit.train.validation import Validation

    def weights(path):
        return load_file(str(path))

    def config(steps, **train_options):
        return tiny_config(max_steps=steps, eval_every=1000, checkpoint_every=1, **train_options)

    plain, averaged, parts = tmp_path / "plain", tmp_path / "averaged", tmp_path / "parts"
    plain_last = train(store, plain, config(3), progress=False)
    averaged_last = train(store, averaged, config(3, ema_decay=0.5), progress=False)
    trained = weights(averaged / "checkpoint" / "model.safetensors")
    for name, tensor in weights(plain / "model.safetensors").items():
        assert torch.equal(trained[name], tensor), name

    # step by step (a resume after each): the average after step 1 is that step's weights, then halves the way
    train(store, parts, config(1, ema_decay=0.5), progress=False)
    w1 = weights(parts / "checkpoint" / "model.safetensors")
    assert all(torch.equal(weights(parts / "model.safetensors")[k], v) for k, v in w1.items())
    train(store, parts, RunConfig(), resume=True, max_steps=2, progress=False)
    w2 = weights(parts / "checkpoint" / "model.safetensors")
    expected = {k: 0.5 * w1[k] + 0.5 * w2[k] for k in w1}
    published = weights(parts / "model.safetensors")
    moved = [k for k in expected if not torch.equal(w1[k], w2[k])]
    assert moved, "the second step changed no weight"
    for name in expected:
        torch.testing.assert_close(published[name], expected[name], rtol=1e-6, atol=1e-7)
    train(store, parts, RunConfig(), resume=True, max_steps=3, progress=False)
    for name, tensor in weights(averaged / "model.safetensors").items():
        torch.testing.assert_close(weights(parts / "model.safetensors")[name], tensor, rtol=1e-6, atol=1e-7)
    assert json.loads((parts / "checkpoint" / "state.json").read_text())["step"] == 3

    # the validation row is the published (averaged) model's, not the trained weights'
    model, _, loaded = load_run(averaged, "cpu")
    token_store = TokenStore(store)
    autocast, _ = autocast_for("fp32", torch.device("cpu"))
    rescored = Validation(token_store, loaded, token_store.vocab.supervised_mask(), torch.device("cpu"), autocast).run(model)
    assert rescored["val_loss"] == averaged_last["val_loss"]
    assert averaged_last["val_loss"] != plain_last["val_loss"]
