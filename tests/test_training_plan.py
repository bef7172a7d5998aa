"""The training plan and the whole-split statistics of pretraining, in memory that does not grow with the store.

The plan must stay the same as the plan that trained the runs before (the same windows, contexts and batches for
the same seed): its batches are pinned by digest. The statistics read the split block by block; each is checked
against a plain per-subject reference with blocks small enough that every split spans many of them.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from nextvisit.model import sequence
from nextvisit.model.sequence import HistorySummary, HorizonQuerySampling, TrainingPlan, _observed_days
from nextvisit.model.visit_time import constant_hazard_logits, gap_bin_counts
from nextvisit.tokenize import store as store_module
from nextvisit.tokenize.store import SPECIAL_TOKENS, SplitWriter, TokenStore, Vocabulary, write_store_info
from nextvisit.train.trainer import train_gap_counts
from nextvisit.train.validation import target_visit_share

N_CODES = 40
CODE0 = len(SPECIAL_TOKENS) + 5  # after the specials and five age tokens
DEATH = CODE0  # a code that ends follow-up in these tests


def write_store(path: Path, n_subjects: int = 400, seed: int = 0) -> Path:
    """Subjects of 1 to 40 visits of 1 to 30 tokens (some longer than a window's visit cap), one split each way."""
    tokens = list(SPECIAL_TOKENS) + [f"AGE//{10 * i}" for i in range(5)] + [f"ICD10CM//C{i:02d}" for i in range(N_CODES)]
    kinds = ["special"] * len(SPECIAL_TOKENS) + ["age"] * 5 + ["code"] * N_CODES
    vocab = Vocabulary(tokens, kinds)
    path.mkdir(parents=True)
    vocab.save(path / "vocab.json")
    rng = np.random.default_rng(seed)
    sizes = {}
    for split, n in zip(("train", "tuning", "held_out"), (n_subjects, n_subjects // 4, 8)):
        writer = SplitWriter(path / split)
        for subject_id in range(n):
            n_visits = int(rng.integers(1, 41))
            days = np.cumsum(rng.integers(1, 300, size=n_visits)) + 12000
            visits = []
            for v in range(n_visits):
                codes = rng.choice(N_CODES, size=int(rng.integers(1, 30)), replace=False) + CODE0
                visits.append(np.concatenate([[len(SPECIAL_TOKENS) + min(4, v // 8)], codes]))
            writer.append(subject_id, 0, days, [len(v) for v in visits], np.concatenate(visits))
        sizes[split] = writer.close()
    write_store_info(path, sizes, len(vocab))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return TokenStore(write_store(tmp_path_factory.mktemp("plan") / "store"))


# Batch fields added after the digests were pinned (tests/test_recurrence.py checks them): left out, so the pins keep
# saying that every earlier field is what it was.
FIELDS_AFTER_THE_PINS = {"recurrence"}


def batch_digest(plan: TrainingPlan, epochs=(0, 1)) -> str:
    """sha256 over every tensor of every batch of the given epochs (4 contexts a batch)."""
    digest = hashlib.sha256()
    for epoch in epochs:
        n = plan.n_contexts(epoch)
        digest.update(str(n).encode())
        for first in range(0, n, 4):
            batch = plan.batch(epoch, range(first, min(first + 4, n)))
            for field in fields(batch):
                if field.name in FIELDS_AFTER_THE_PINS:
                    continue
                tensor = getattr(batch, field.name)
                digest.update(f"{field.name}{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def plans(store):
    split, supervised = store.split("train"), store.vocab.supervised_mask()
    queries = HorizonQuerySampling(rate=0.5, max_days=1500, death_token=DEATH)
    return {
        "packed": TrainingPlan(split, supervised, 64, True, 0.5, seed=7),
        "unpacked": TrainingPlan(split, supervised, 64, False, 0.5, seed=7),
        "queries and summary": TrainingPlan(split, supervised, 96, True, 0.5, seed=3, horizon_queries=queries,
                                            summary=HistorySummary(8, *_summary_masks(store.vocab))),
    }


def _summary_masks(vocab):
    kinds = np.asarray(vocab.kinds)
    return np.isin(kinds, ("code", "age")), kinds == "age"


# Computed with the plan of Python window lists that trained every run before the plan was held in arrays.
PINNED = {
    "packed": "5c6c49870db070dd51d1a1f4757a32647375e6e3e800450a66c0ff6f8706fd22",
    "unpacked": "33ee504c9853efe3a9b9a9b6b6c49fdafe4b07076d9b5580a423fb98a01773df",
    "queries and summary": "e9b56ddde006dece689d2ee7b1a36f1041c08d61ab8ec99c2daf741fcb711401",
}


@pytest.mark.parametrize("name", list(PINNED))
def test_the_plan_and_its_batches_are_those_of_the_runs_before(store, name, monkeypatch):
    monkeypatch.setattr(store_module, "TOKENS_PER_BLOCK", 997)  # many blocks, ragged at subject edges
    monkeypatch.setattr(sequence, "_PACK_CHUNK", 1000)  # and many chunks of packing and of query draws
    monkeypatch.setattr(sequence, "_DRAW_CHUNK", 1001)
    assert batch_digest(plans(store)[name]) == PINNED[name]


def test_the_statistics_read_block_by_block_equal_a_subject_by_subject_count(store, monkeypatch):
    split, edges = store.split("train"), (1, 7, 30, 90, 365)
    share, observed, gaps, target_visits = np.zeros(len(store.vocab)), [], [], 0
    for subject in split:
        for v in range(1, subject.n_visits):
            share += np.bincount(subject.visit(v), minlength=len(share))
        target_visits += max(subject.n_visits - 1, 0)
        gaps.append(np.diff(subject.visit_days))
        followed = subject.visit_days[-1] - subject.visit_days.astype(np.int64)  # to the last visit; death: no end
        observed.append(np.full(subject.n_visits, np.iinfo(np.int32).max) if DEATH in subject.tokens else followed)
    expected = (share / target_visits, gap_bin_counts(np.concatenate(gaps), edges), np.concatenate(observed))
    for tokens_per_block in (997, 1 << 20):  # many blocks (subjects split nowhere), then one
        monkeypatch.setattr(store_module, "TOKENS_PER_BLOCK", tokens_per_block)
        assert np.array_equal(target_visit_share(split, len(store.vocab)), expected[0])
        assert np.array_equal(train_gap_counts(split, edges), expected[1])
        assert np.array_equal(_observed_days(split, DEATH), expected[2])
    assert np.isfinite(constant_hazard_logits(expected[1])).all()


def write_large_split(path: Path, n_subjects: int, visits: int, tokens_per_visit: int) -> TokenStore:
    """A train split of ``n_subjects`` alike subjects, written in one batch (millions of tokens in a second)."""
    vocab = Vocabulary(list(SPECIAL_TOKENS) + [f"ICD10CM//C{i:02d}" for i in range(N_CODES)],
                       ["special"] * len(SPECIAL_TOKENS) + ["code"] * N_CODES)
    path.mkdir(parents=True)
    vocab.save(path / "vocab.json")
    rng = np.random.default_rng(0)
    n_visits = n_subjects * visits
    days = (np.cumsum(rng.integers(1, 100, size=n_visits)) % 20000).astype(np.int32)
    days = np.sort(days.reshape(n_subjects, visits), axis=1).ravel()
    sizes = {}
    for split, n in (("train", n_subjects), ("tuning", 0), ("held_out", 0)):
        writer = SplitWriter(path / split)
        if n:
            tokens = rng.integers(len(SPECIAL_TOKENS), len(vocab), size=n_visits * tokens_per_visit)
            writer.append_batch(np.arange(n), np.zeros(n), np.full(n, visits), days,
                                np.full(n_visits, tokens_per_visit), tokens)
        sizes[split] = writer.close()
    write_store_info(path, sizes, len(vocab))
    return TokenStore(path)


def traced_peak(work) -> int:
    """Peak bytes that Python and numpy allocate while ``work()`` runs."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pretraining_scans_hold_one_block_and_the_plan_a_few_bytes_per_visit(tmp_path, monkeypatch):
    # 20,000 subjects of 20 visits of 10 tokens: 4M tokens (16 MB of int32), 400,000 visits, windows of 6 visits
    store = write_large_split(tmp_path / "store", n_subjects=20_000, visits=20, tokens_per_visit=10)
    split, vocab_size = store.split("train"), len(store.vocab)
    monkeypatch.setattr(store_module, "TOKENS_PER_BLOCK", 1 << 16)  # 256 KB of tokens per block
    for scan in (lambda: target_visit_share(split, vocab_size), lambda: train_gap_counts(split, (1, 30, 365)),
                 lambda: _observed_days(split, DEATH)):
        peak = traced_peak(scan)
        # a block and its int64 copies, plus what must come out (observed days: 4 bytes per visit)
        assert peak < 4 * 400_000 + (4 << 20), peak
    plans = []
    peak = traced_peak(lambda: plans.append(TrainingPlan(split, store.vocab.supervised_mask(), 128, True, 0.5,
                                                         seed=0)) or plans[0].n_contexts(0))
    epoch = plans[0].epoch(0)
    assert len(epoch) > 20_000 * 3 and epoch.nbytes <= 16 * len(epoch) + 8 * (epoch.n_contexts + 1)
    # held: 4 bytes per visit, 8 per subject, 16 per window (the epoch); building it: int64 arrays over the windows
    assert peak < 4 * 400_000 + 8 * 20_000 + 80 * len(epoch) + (1 << 20), peak


def resident_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
def test_reading_subjects_leaves_their_tokens_out_of_the_resident_set(tmp_path):
    # 16 MB of tokens; 2,000 subjects read at random (a training run's access) of 20,000
    store = write_large_split(tmp_path / "store", n_subjects=20_000, visits=20, tokens_per_visit=10)
    split = store.split("train")
    split.subject(0)
    before = resident_file_kib()
    for i in np.random.default_rng(0).permutation(len(split))[:2000]:
        subject = split.subject(int(i))
        assert len(subject.tokens) == 200
    # read from the files, only the per-subject arrays (20 bytes a subject, 400 KB in all) can come in: 332 KB
    # measured; through the maps the same reads brought 3.4 MB in (on the 1M-subject store, 290 KB a subject)
    grown = resident_file_kib() - before
    assert grown < 1024, grown
