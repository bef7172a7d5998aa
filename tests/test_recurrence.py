"""The recurrence embedding (``model.recurrence_embedding``, docs/model.md "Recurrence embedding"): each visit token
carries how many of the subject's earlier visits held it, counted over the whole record (also before the window),
never over the visit itself or later ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextvisit.model.sequence import (RECURRENCE_BUCKETS, Window, prior_visit_counts, query_batch, recurrence_buckets,
                                      windows_batch)
from nextvisit.tokenize.store import SEP
from tests.test_model import SUPERVISED, logits, model, subject


def test_prior_visit_counts_count_earlier_visits_once_each():
    s = subject([[10, 11], [10, 12], [10, 10, 11], [13]], [1, 2, 3, 4])
    # visit 2 holds 10 twice: both count the two earlier visits with 10, and visit 2 counts once for later visits
    assert prior_visit_counts(s).tolist() == [0, 0, 1, 0, 2, 2, 1, 0]
    assert prior_visit_counts(s, 2).tolist() == [0, 0, 1, 0]
    assert recurrence_buckets(np.array([0, 1, 2, 3, 4, 7, 8, 255, 256, 10**6])).tolist() == \
        [1, 2, 3, 3, 4, 4, 5, 9, 10, 10]
    assert recurrence_buckets(np.array([10**9])).max() == RECURRENCE_BUCKETS - 1


def test_window_tokens_carry_counts_from_before_the_window_and_specials_none():
    s = subject([[10], [10, 11], [10, 12], [10, 11], [14]], [1, 2, 3, 4, 5])
    b = windows_batch([s], [Window(0, 2, 5)], SUPERVISED, max_tokens=64, recurrence=True)
    n = 2 + 1 + 2 + 1 + 1
    assert b.tokens[0, :n].tolist() == [10, 12, SEP, 10, 11, SEP, 14]
    # 10 at visit 2 follows visits 0 and 1 (outside the window): 2 earlier -> bucket 3; at visit 3: 3 -> bucket 3;
    # 11 at visit 3 follows visit 1: 1 -> bucket 2; first occurrences -> bucket 1; SEPs -> 0
    assert b.recurrence[0, :n].tolist() == [3, 1, 0, 3, 2, 0, 1]
    assert b.recurrence[0, n:].tolist() == [0] * (b.tokens.shape[1] - n)  # padding
    q = query_batch([s], 365, max_tokens=5, horizon_query=True, recurrence=True)
    tokens, recurrence = q.tokens[0].tolist(), q.recurrence[0].tolist()
    assert tokens[:5] == [10, 11, SEP, 14, SEP] and recurrence[:5] == [3, 2, 0, 1, 0]


def test_counts_never_read_the_visit_itself_or_later_visits():
    """Adding the same codes to later visits changes no earlier token's bucket (a count over the whole record, or one
    including the token's own visit, fails this)."""
    before = subject([[10], [10, 11], [12]], [1, 2, 3])
    after = subject([[10], [10, 11], [12, 10, 11], [10, 11]], [1, 2, 3, 4])
    b0 = windows_batch([before], [Window(0, 0, 2)], SUPERVISED, max_tokens=64, recurrence=True)
    b1 = windows_batch([after], [Window(0, 0, 2)], SUPERVISED, max_tokens=64, recurrence=True)
    assert b0.tokens.tolist() == b1.tokens.tolist()
    assert b0.recurrence.tolist() == b1.recurrence.tolist()
    assert b0.recurrence[0, :4].tolist() == [1, 0, 2, 1]


def test_a_zero_embedding_is_the_model_without_it_and_a_trained_one_reads_earlier_history():
    s = subject([[10], [10, 11], [10, 12], [10, 11]], [1, 2, 3, 4])
    q = query_batch([s], 365, max_tokens=5, horizon_query=True, recurrence=True)
    plain = model(horizon_queries=True)
    with_it = model(horizon_queries=True, recurrence_embedding=True)
    state = {k: v for k, v in with_it.state_dict().items() if not k.startswith("recurrence_embed")}
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state)
    torch.testing.assert_close(logits(with_it, q), logits(plain, q))
    # with a non-zero embedding the forecast tells the 4th occurrence of code 10 from a first one: the same recent
    # window after a history with and without earlier 10s gives different logits
    with torch.no_grad():
        with_it.recurrence_embed.weight.normal_(0, 0.5)
        with_it.recurrence_embed.weight[0] = 0
    fresh = subject([[13], [13, 11], [10, 12], [10, 11]], [1, 2, 3, 4])
    q_fresh = query_batch([fresh], 365, max_tokens=5, horizon_query=True, recurrence=True)
    assert q.tokens.tolist() == q_fresh.tokens.tolist()
    assert not torch.allclose(logits(with_it, q), logits(with_it, q_fresh))
    assert torch.allclose(logits(plain, q), logits(plain, q_fresh))  # the model without it cannot tell


def test_model_with_the_embedding_needs_the_buckets():
    m = model(recurrence_embedding=True)
    s = subject([[10], [10, 11]], [1, 2])
    q = query_batch([s], 30)
    assert q.recurrence.shape == (1, 0)  # not built unless asked for: a run without the embedding pays nothing
    for given in (None, q.recurrence):
        with pytest.raises(ValueError, match="recurrence"):
            m(q.tokens, q.days, q.att_days, q.doc_ids, q.positions, recurrence=given)
    built = query_batch([s], 30, recurrence=True)
    assert torch.isfinite(logits(m, built)).all()


def test_training_and_forecasting_with_the_recurrence_embedding(tmp_path):
    from tests.test_train import trained_model

    last, m, loaded = trained_model(tmp_path, recurrence_embedding=True)
    assert np.isfinite(float(last["loss"]))
    assert loaded.model.recurrence_embedding
    weight = m.recurrence_embed.weight.detach()
    assert torch.count_nonzero(weight[0]) == 0 and torch.count_nonzero(weight[1:]) > 0  # trained; bucket 0 stays 0
    history = subject([[10, 11], [10, 12]], [100, 105])
    assert torch.isfinite(logits(m, query_batch([history], 365, recurrence=True))).all()
    from nextvisit.predict.horizon import score_queries  # the forecast builds the buckets for such a run

    risks = score_queries(m, [history, history], [365, 730], torch.tensor([12, 13]), "sum_logits", 63, 8, "cpu")
    assert np.isfinite(risks).all() and risks.shape == (2,)
