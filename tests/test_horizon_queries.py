"""Horizon queries in pretraining (nextvisit.model.sequence, docs/model.md "Horizon queries"): the layout, the
targets (every code of the interval), the attention rule (a query sees its own visit and what came before, never
the visits it skips or the SEP after its visit; nothing attends a query), the placement rule (only observed
intervals), training with them and the forecast's query."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextvisit.config import ModelConfig
from nextvisit.errors import UserError
from nextvisit.model.sequence import HorizonQuerySampling, TrainingPlan, Window, query_batch, windows_batch
from nextvisit.model.transformer import NextVisitModel, attention_allowed
from nextvisit.tokenize.store import SEP
from tests.test_model import logits, subject  # the same subject builder and scorer as the model tests

V = 40
SUPERVISED = np.zeros(V, bool)
SUPERVISED[10:] = True


def model(seed=0, **overrides) -> NextVisitModel:
    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 2, "horizon_queries": True,
                            **overrides})
    return NextVisitModel(config).eval()


# days 100, 105, 106, 400: tokens [10 11] SEP [12 13 14] SEP [10 15] SEP [16]
S = subject([[10, 11], [12, 13, 14], [10, 15], [16]], [100, 105, 106, 400])


def queries(*pairs):
    return (np.array([j for j, _ in pairs]), np.array([g for _, g in pairs]))


def test_layout_places_each_query_after_its_visit_and_its_sep():
    b = windows_batch([S], [Window(0, 0, 3, queries((0, 6), (1, 1)))], SUPERVISED, max_tokens=64)
    n = 2 + 1 + 1 + 3 + 1 + 1 + 2
    assert b.tokens[0, :n].tolist() == [10, 11, SEP, SEP, 12, 13, 14, SEP, SEP, 10, 15]
    assert b.is_query[0, :n].tolist() == [False, False, False, True, False, False, False, False, True, False, False]
    # the query after visit 0 sits at day 0 + 6 and attends from day 0; after visit 1 at day 5 + 1, from day 5
    assert b.days[0, :n].tolist() == [0, 0, 5, 6, 5, 5, 5, 6, 6, 6, 6]
    assert b.att_days[0, :n].tolist() == [0, 0, 4, 0, 5, 5, 5, 5, 5, 6, 6]
    assert b.positions.tolist() == [2, 7, 3, 8]  # the SEPs, then the queries
    assert b.sep_visit.tolist() == [1, 2, 0, 1]


def test_query_targets_are_every_code_of_the_interval_even_past_the_window():
    b = windows_batch([S], [Window(0, 0, 2, queries((0, 6), (1, 1), (1, 300)))], SUPERVISED, max_tokens=64)
    targets: dict[int, set] = {}
    for row, token in zip(b.target_rows.tolist(), b.target_tokens.tolist()):
        targets.setdefault(row, set()).add(token)
    assert targets[0] == {12, 13, 14}  # the one SEP: visit 1
    assert targets[1] == {12, 13, 14, 10, 15}  # (100, 106]: visits 1 and 2, visit 2 outside the window
    assert targets[2] == {10, 15}  # (105, 106]
    assert targets[3] == {10, 15, 16}  # (105, 405]: to the last visit
    seen = {(r, t): s for r, t, s in zip(b.target_rows.tolist(), b.target_tokens.tolist(), b.target_seen.tolist())}
    repeats = {(r, t): k for r, t, k in zip(b.target_rows.tolist(), b.target_tokens.tolist(), b.target_repeats.tolist())}
    assert seen[(1, 10)] and not seen[(1, 15)]  # 10 was in visit 0: a repeat, not a new onset
    assert repeats[(1, 10)] == 0  # ... but never an earlier positive target
    assert seen[(3, 10)] and not seen[(3, 16)]
    gap_zero = windows_batch([S], [Window(0, 0, 2, queries((0, 4)))], SUPERVISED, max_tokens=64)
    assert 1 not in gap_zero.target_rows.tolist()  # nothing in (100, 104]: a query with no positive


def test_attention_rule_for_queries_case_by_case():
    b = windows_batch([S], [Window(0, 0, 3, queries((0, 6), (1, 1)))], SUPERVISED, max_tokens=64)
    allowed = attention_allowed(b.att_days, b.doc_ids, b.days, b.is_query)[0]
    n = 11
    q0, q1 = 3, 8
    # the query after visit 0 sees visit 0 only (and itself)
    assert allowed[q0, :n].nonzero().flatten().tolist() == [0, 1, 3]
    # the query after visit 1 sees visits 0 and 1 and the SEP that predicted visit 1, not the SEP after visit 1
    # (attention day 5 = its own visit; that SEP's attention day is also 5 but it carries day 6, the next visit)
    assert allowed[q1, :n].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8]
    # no other token attends a query
    others = [i for i in range(n) if i not in (q0, q1)]
    assert not allowed[others][:, [q0, q1]].any()
    # without queries the rule is the plain one
    plain = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, max_tokens=64)
    torch.testing.assert_close(attention_allowed(plain.att_days, plain.doc_ids, plain.days, plain.is_query),
                               attention_allowed(plain.att_days, plain.doc_ids, plain.days))


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_query_sees_nothing_it_skips_and_changes_no_other_output(attention):
    m = model(attention=attention)
    with_q = windows_batch([S], [Window(0, 0, 4, queries((1, 200)))], SUPERVISED, max_tokens=64)
    base = logits(m, with_q)
    # the visits after the query's own (days 106 and 400, inside the interval and past it) change nothing of it
    changed = subject([[10, 11], [12, 13, 14], [20, 21], [22, 23]], [100, 105, 107, 300])
    out = logits(m, windows_batch([changed], [Window(0, 0, 4, queries((1, 200)))], SUPERVISED, max_tokens=64))
    torch.testing.assert_close(out[-1], base[-1], atol=1e-6, rtol=1e-6)
    # ... a change at or before its visit does
    earlier = subject([[10, 12], [12, 13, 14], [10, 15], [16]], [100, 105, 106, 400])
    out = logits(m, windows_batch([earlier], [Window(0, 0, 4, queries((1, 200)))], SUPERVISED, max_tokens=64))
    assert not torch.allclose(out[-1], base[-1])
    # other tokens never attend a query: the SEPs' logits are those of the window without it
    plain = logits(m, windows_batch([S], [Window(0, 0, 4)], SUPERVISED, max_tokens=64))
    torch.testing.assert_close(base[:3], plain, atol=1e-6, rtol=1e-6)
    # the gap is the question: another gap, another answer
    other_gap = logits(m, windows_batch([S], [Window(0, 0, 4, queries((1, 900)))], SUPERVISED, max_tokens=64))
    assert not torch.allclose(other_gap[-1], base[-1])


def test_forecast_query_equals_the_training_query_at_the_last_visit():
    m = model()
    history = subject([[10, 11], [12, 13, 14]], [100, 105])
    q = query_batch([history], 730, max_tokens=511, horizon_query=True)
    pos = int(q.positions[0])
    assert q.is_query.view(-1)[pos] and q.days.view(-1)[pos] == 5 + 730 and q.att_days.view(-1)[pos] == 5
    trained = windows_batch([history], [Window(0, 0, 2, queries((1, 730)))], SUPERVISED, max_tokens=64)
    torch.testing.assert_close(logits(m, q)[0], logits(m, trained)[-1], atol=1e-5, rtol=1e-5)
    # the query embedding is what tells it from a next-visit SEP at that day
    plain = query_batch([history], 730, max_tokens=511)
    assert not torch.allclose(logits(m, plain)[0], logits(m, q)[0])


class FakeSplit:
    """The arrays of a store split that ``TrainingPlan`` reads."""

    def __init__(self, subjects):
        self.subjects = subjects
        self.subject_ids = np.arange(len(subjects))
        self.subject_visits = np.concatenate([[0], np.cumsum([s.n_visits for s in subjects])]).astype(np.int64)
        self.visit_days = np.concatenate([s.visit_days for s in subjects])
        lengths = np.concatenate([np.diff(s.visit_offsets) for s in subjects])
        self.visit_tokens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.tokens = np.concatenate([s.tokens for s in subjects])

    def __len__(self):
        return len(self.subjects)

    def subject(self, i):
        return self.subjects[i]


DEATH = 9


def random_subjects(seed: int, deaths: bool) -> list:
    """60 subjects of 2-8 one-code visits 1-399 days apart; with ``deaths`` every third dies at its last visit."""
    rng = np.random.default_rng(seed)
    subjects = []
    for k in range(60):
        n = int(rng.integers(2, 9))
        days = np.cumsum(rng.integers(1, 400, size=n)) + 1000
        visits = [[10 + int(rng.integers(0, 20))] for _ in range(n)]
        if deaths and k % 3 == 0:
            visits[-1] = visits[-1] + [DEATH]
        subjects.append(subject(visits, days, subject_id=k))
    return subjects


def test_plan_asks_only_observed_intervals_and_keeps_the_windows_of_a_plain_run():
    subjects = random_subjects(0, deaths=True)
    split = FakeSplit(subjects)
    sampling = HorizonQuerySampling(rate=1.0, max_days=2000, death_token=DEATH)
    plan = TrainingPlan(split, SUPERVISED, context=64, pack=True, max_window_fraction=0.5, seed=3,
                        horizon_queries=sampling)
    plain = TrainingPlan(split, SUPERVISED, context=64, pack=True, max_window_fraction=0.5, seed=3)
    windows = list(plan.epoch(0).windows())
    plain_windows = list(plain.epoch(0).windows())
    assert [(w.subject, w.start, w.stop) for w in windows] == [(w.subject, w.start, w.stop) for w in plain_windows]
    asked = 0
    for w in windows:
        if w.queries is None:
            continue
        s = subjects[w.subject]
        died = DEATH in s.tokens
        for j, gap in zip(*w.queries):
            asked += 1
            assert 1 <= gap <= 2000
            assert died or s.visit_days[w.start + j] + gap <= s.visit_days[-1]  # the interval is observed
    assert asked > 50 and plan.queries_by_epoch[0] == asked
    # the same epoch twice is the same plan; a batch carries the queries
    again = TrainingPlan(split, SUPERVISED, context=64, pack=True, max_window_fraction=0.5, seed=3,
                         horizon_queries=sampling)
    assert [(w.subject, w.start, None if w.queries is None else w.queries[1].tolist()) for w in again.epoch(0).windows()] == \
           [(w.subject, w.start, None if w.queries is None else w.queries[1].tolist()) for w in windows]
    batch = plan.batch(0, range(plan.n_contexts(0)))
    assert int(batch.is_query.sum()) == asked
    assert int(batch.doc_ids.gt(0).sum(1).max()) <= 64


def test_several_queries_per_visit_add_draws_to_those_of_one():
    subjects = random_subjects(1, deaths=False)
    split = FakeSplit(subjects)

    def plan(per_visit, context=256, fraction=0.25):
        sampling = HorizonQuerySampling(rate=1.0, max_days=2000, death_token=DEATH, per_visit=per_visit)
        return TrainingPlan(split, SUPERVISED, context=context, pack=True, max_window_fraction=fraction, seed=5,
                            horizon_queries=sampling)

    def asked(p):
        out = {}
        for w in p.epoch(0).windows():
            if w.queries is not None:
                for j, gap in zip(*w.queries):
                    out.setdefault((w.subject, w.start + int(j)), []).append(int(gap))
        return out

    one, three = asked(plan(1)), asked(plan(3))
    assert sum(map(len, three.values())) > 2 * sum(map(len, one.values())) > 100
    several = [gaps for gaps in three.values() if len(gaps) > 1]
    assert sum(len(set(gaps)) == len(gaps) for gaps in several) > 0.95 * len(several)  # each draw its own gap
    for visit, gaps in three.items():
        s = subjects[visit[0]]
        assert len(gaps) <= 3
        assert all(s.visit_days[visit[1]] + g <= s.visit_days[-1] for g in gaps)  # observed intervals only
        if visit in one:
            assert set(one[visit]) <= set(gaps)  # the first draw is the one of a run with one query per visit
    p = plan(3)
    batch = p.batch(0, range(p.n_contexts(0)))
    assert int(batch.is_query.sum()) == p.queries_by_epoch[0] == sum(map(len, three.values()))
    from nextvisit.config import resolve
    with pytest.raises(UserError, match="horizon_queries_per_visit is 0"):
        resolve("tiny", {"data": {"horizon_queries_per_visit": 0}})
    # windows of up to 12 tokens in contexts of 24: room for about one query per visit, not eight
    cramped, first = plan(8, context=24, fraction=0.5), plan(1, context=24, fraction=0.5)
    batch = cramped.batch(0, range(cramped.n_contexts(0)))
    assert int(batch.doc_ids.gt(0).sum(1).max()) <= 24  # queries that do not fit are left out, never the context broken
    kept, firsts = asked(cramped), asked(first)
    assert sum(map(len, kept.values())) < 8 * sum(map(len, firsts.values()))  # it was short of room
    # the later draws are left out first: the first draw's queries stay wherever one query per visit fits
    assert all(set(g) <= set(kept.get(v, [])) for v, g in firsts.items())


def test_training_with_horizon_queries_and_forecasting_with_them(tmp_path):
    from tests.test_train import trained_model

    last, m, loaded = trained_model(tmp_path, horizon_queries=True)
    assert np.isfinite(float(last["loss"]))
    assert loaded.model.horizon_queries and m.query_embed is not None
    history = subject([[10, 11], [12, 13, 14]], [100, 105])
    q = query_batch([history], 365, horizon_query=True)
    assert torch.isfinite(logits(m, q)).all()


# -- the history summary ahead of a window that starts after the first visit ---------------------------------------

KINDS = ["special"] * 6 + ["demographic"] * 2 + ["age"] * 2 + ["code"] * 20 + ["lab"] * 10


class KindsVocab:
    kinds = KINDS


def test_history_summary_holds_first_occurrences_and_the_demographics():
    from nextvisit.model.sequence import HistorySummary

    # visit 0 (day 10): demographic 6, age 8, codes 12 13; visit 1 (day 20): 12 14, lab 35; visit 2 (day 30): 15
    long = subject([[6, 8, 12, 13], [12, 14, 35], [15], [16], [12, 17]], [10, 20, 30, 40, 50])
    summary = HistorySummary.of(KindsVocab(), 10)
    tokens, days = summary.tokens_before(long, 3)
    assert tokens.tolist() == [6, 12, 13, 14, 15] and days.tolist() == [10, 10, 10, 20, 30]  # no age, no lab, no repeat
    capped = HistorySummary.of(KindsVocab(), 3)
    tokens, days = capped.tokens_before(long, 3)
    assert tokens.tolist() == [6, 14, 15]  # the demographics whatever the cap, then the most recent first occurrences
    assert HistorySummary.of(KindsVocab(), 0) is None
    b = windows_batch([long], [Window(0, 3, 5)], SUPERVISED, max_tokens=64, summary=summary)
    n = 5 + 1 + 1 + 2
    assert b.tokens[0, :n].tolist() == [6, 12, 13, 14, 15, 16, SEP, 12, 17]
    assert b.days[0, :n].tolist() == [-30, -30, -30, -20, -10, 0, 10, 10, 10]
    assert b.att_days[0, :n].tolist() == [-30, -30, -30, -20, -10, 0, 9, 10, 10]
    assert b.positions.tolist() == [6]
    assert sorted(b.target_tokens.tolist()) == [12, 17]  # the summary is input only
    # a window from the first visit has no summary; a forecast gets it ahead of its recent visits
    first = windows_batch([long], [Window(0, 0, 2)], SUPERVISED, max_tokens=64, summary=summary)
    assert first.tokens[0, :4].tolist() == [6, 8, 12, 13]
    q = query_batch([long], 365, max_tokens=8, summary=summary)  # room for visits 2..4
    assert q.tokens[0, :11].tolist() == [6, 12, 13, 14, 15, SEP, 16, SEP, 12, 17, SEP]


def test_training_and_forecast_with_a_history_summary(tmp_path):
    from tests.test_train import make_store, tiny_config
    from nextvisit.model.sequence import HistorySummary
    from nextvisit.train.trainer import train
    from nextvisit.tokenize.store import TokenStore

    store = make_store(tmp_path / "store")
    config = tiny_config(max_steps=10, eval_every=10, checkpoint_every=10)
    config.data.history_summary_tokens = 16
    config.model.horizon_queries = True
    last = train(store, tmp_path / "run", config, progress=False)
    assert np.isfinite(float(last["loss"]))
    from nextvisit.train.data import training_plan
    _, plan = training_plan(TokenStore(store), config, TokenStore(store).vocab.supervised_mask())
    assert isinstance(plan.summary, HistorySummary)
    batch = plan.batch(0, range(min(8, plan.n_contexts(0))))
    assert int(batch.doc_ids.gt(0).sum(1).max()) <= config.data.context
