"""The next-visit loss: repeat weights, a hand computation, the fused gradient, validation summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextvisit.config import LossConfig
from nextvisit.model.fused_head import next_visit_loss_from_hidden
from nextvisit.model.losses import negative_term, next_visit_loss, positive_term, repeat_weight
from nextvisit.model.sequence import Window, windows_batch
from nextvisit.tokenize.store import Subject
from nextvisit.train.validation import ValidationTotals, best_constant_logits, frequency_bands


def test_repeat_weights_follow_the_paper():
    weights = repeat_weight(torch.arange(7), decay=0.5, floor=0.1)
    np.testing.assert_allclose(weights.numpy(), [1, 0.5, 0.25, 0.125, 0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(repeat_weight(torch.arange(3), 0.8, 0.0).numpy(), [1, 0.8, 0.64], rtol=1e-6)


def _focal_by_hand(x: float, y: int, weight: float = 1.0, gamma=2.0, alpha=0.995) -> float:
    p = 1 / (1 + math.exp(-x))
    if y:
        return -alpha * (1 - p) ** gamma * math.log(p) * weight
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_loss_equals_a_hand_computation():
    # 2 SEPs x 4 tokens; token 0 is unsupervised (e.g. an age token) and carries no loss
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.5, 0.2, -0.7, -2.5]])
    supervised = torch.tensor([False, True, True, True])
    rows, tokens, repeats = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([0, 0, 2])
    config = LossConfig()
    expected = 0.0
    positives = {(0, 1): 1.0, (0, 2): 1.0, (1, 2): 0.25}  # token 2 at SEP 1: third time a target -> 0.5^2
    for n in range(2):
        for v in range(1, 4):
            w = positives.get((n, v))
            expected += _focal_by_hand(float(logits[n, v]), 1, w) if w else _focal_by_hand(float(logits[n, v]), 0)
    expected *= 10 / (2 * 3)  # scale 10, normalised by #SEP x #supervised
    loss = next_visit_loss(logits, rows, tokens, repeats, supervised, config)
    assert abs(float(loss) - expected) < 1e-6 * max(1, expected)
    # without the decay, validation weighs every positive 1
    no_decay = next_visit_loss(logits, rows, tokens, repeats, supervised, config, apply_repeat_decay=False)
    expected_plain = expected + 10 / 6 * (_focal_by_hand(-0.7, 1, 1.0) - _focal_by_hand(-0.7, 1, 0.25))
    assert abs(float(no_decay) - expected_plain) < 1e-6 * max(1, expected_plain)


def test_bce_option_equals_torch_bce():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    supervised = torch.ones(7, dtype=torch.bool)
    rows, tokens = torch.tensor([0, 2, 4, 4]), torch.tensor([1, 3, 0, 6])
    target = torch.zeros(5, 7)
    target[rows, tokens] = 1
    loss = next_visit_loss(logits, rows, tokens, torch.zeros(4, dtype=torch.long), supervised,
                           LossConfig(kind="bce", scale=1.0))
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, target))


@pytest.mark.parametrize("kind,gamma", [("focal", 2.0), ("focal", 1.5), ("focal", 0.0), ("bce", 2.0)])
def test_fused_gradient_matches_the_plain_formula(kind, gamma):
    torch.manual_seed(1)
    logits = (torch.randn(6, 9, dtype=torch.float64) * 3).requires_grad_()
    supervised = torch.tensor([False, False] + [True] * 7)
    rows, tokens, repeats = torch.tensor([0, 1, 1, 5]), torch.tensor([2, 3, 8, 2]), torch.tensor([0, 1, 3, 0])
    config = LossConfig(kind=kind, gamma=gamma)
    # a scaled incoming gradient, as gradient accumulation divides the loss
    (next_visit_loss(logits, rows, tokens, repeats, supervised, config) * 0.25).backward()
    fused = logits.grad.clone()
    x = logits.detach().clone().requires_grad_()
    target = torch.zeros(6, 9, dtype=torch.float64)
    weight = torch.ones(6, 9, dtype=torch.float64)
    target[rows, tokens] = 1
    weight[rows, tokens] = repeat_weight(repeats, 0.5, 0.1).double()
    plain = torch.where(target > 0, positive_term(x, kind, gamma, config.alpha),
                        negative_term(x, kind, gamma, config.alpha))
    (0.25 * config.scale * (plain * weight * supervised).sum() / (6 * 7)).backward()
    torch.testing.assert_close(fused, x.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradients_stay_finite_at_saturated_logits(gamma):
    """Logits far enough out that sigmoid rounds to 0 or 1, where s.pow(gamma) differentiated at s = 0 is NaN
    for gamma below 1. The terms equal the plain formula wherever that one is finite."""
    logits = torch.tensor([[100.0, -100.0, 0.0, 30.0], [-200.0, 50.0, 1.0, -30.0]], requires_grad=True)
    supervised = torch.ones(4, dtype=torch.bool)
    rows, tokens, repeats = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 3]), torch.tensor([0, 0, 1])
    loss = next_visit_loss(logits, rows, tokens, repeats, supervised, LossConfig(gamma=gamma))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[1, 0] < 0 and logits.grad[1, 3] < 0  # missed positives pull their logits up
    x = torch.linspace(-12, 12, 25, dtype=torch.float64, requires_grad=True)
    for term, plain in ((negative_term, lambda x: (1 - 0.995) * torch.sigmoid(x) ** gamma * F.softplus(x)),
                        (positive_term, lambda x: 0.995 * (1 - torch.sigmoid(x)) ** gamma * F.softplus(-x))):
        got, = torch.autograd.grad(term(x, "focal", gamma, 0.995).sum(), x)
        want, = torch.autograd.grad(plain(x).sum(), x)
        torch.testing.assert_close(term(x, "focal", gamma, 0.995), plain(x), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)


def test_dense_loss_without_gradient_gives_the_same_value():
    torch.manual_seed(2)
    logits = torch.randn(5, 11) * 4
    supervised = torch.ones(11, dtype=torch.bool)
    empty = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        frozen = next_visit_loss(logits, empty, empty, empty, supervised, LossConfig())
    tracked = next_visit_loss(logits.clone().requires_grad_(), empty, empty, empty, supervised, LossConfig())
    torch.testing.assert_close(frozen, tracked.detach())
    expected = LossConfig().scale * negative_term(logits, "focal", 2, 0.995).sum() / 55
    torch.testing.assert_close(frozen, expected)


def test_loss_from_built_targets_downweights_a_chronic_code():
    """End to end from a subject: a code present at every visit weighs 1, .5, .25 ... as a target."""
    visits = [[10, 11], [10], [10], [10, 12]]
    s = Subject(1, 0, np.arange(4, dtype=np.int32) * 30, np.array([0, 2, 3, 4, 6]), np.concatenate(visits).astype(np.int32))
    supervised = np.zeros(16, bool)
    supervised[10:] = True
    b = windows_batch([s], [Window(0, 0, 4)], supervised, 64)
    logits = torch.zeros(len(b.positions), 16)  # p = 0.5 everywhere
    config = LossConfig(scale=1.0)
    loss = next_visit_loss(logits, b.target_rows, b.target_tokens, b.target_repeats, torch.from_numpy(supervised), config)
    pos, neg = _focal_by_hand(0.0, 1), _focal_by_hand(0.0, 0)
    # 3 SEPs x 6 supervised tokens; positives: 10 at SEPs 0,1,2 (weights 1, .5, .25) and 12 at SEP 2 (1)
    expected = (pos * (1 + 0.5 + 0.25 + 1) + neg * (18 - 4)) / 18
    assert abs(float(loss) - expected) < 1e-7


def test_validation_new_onset_auroc_and_bands():
    visits = [[10, 11], [10, 12], [10, 13, 14]]
    s = Subject(1, 0, np.array([0, 10, 20], np.int32), np.array([0, 2, 4, 7]), np.concatenate(visits).astype(np.int32))
    supervised = np.zeros(20, bool)
    supervised[10:] = True
    b = windows_batch([s], [Window(0, 0, 3)], supervised, 64)
    bands = torch.from_numpy(frequency_bands(np.linspace(0.5, 0.0, 20), (0.3, 0.1)))
    sup = torch.from_numpy(supervised)
    perfect = torch.full((2, 20), -5.0)
    perfect[b.target_rows, b.target_tokens] = 5.0
    totals = ValidationTotals(n_bands=3)
    totals.add(perfect, b, sup, bands, LossConfig())
    summary = totals.summary(["a", "b", "c"])
    assert summary["val_new_onset_auroc"] == 1.0
    assert summary["val_new_onset_targets"] == 3 and summary["val_repeat_targets"] == 2  # 12, 13, 14 vs 10, 10
    reversed_ = ValidationTotals(n_bands=3)
    reversed_.add(-perfect, b, sup, bands, LossConfig())
    assert reversed_.summary(["a", "b", "c"])["val_new_onset_auroc"] == 0.0
    # the per-band losses add up to the total
    band_total = sum(totals.band_loss)
    assert abs(band_total - totals.loss_sum) < 1e-9 * max(1, totals.loss_sum)


def test_best_constant_logits_minimise_the_expected_focal_loss():
    config = LossConfig()
    rate = np.array([0.001, 0.05, 0.5])
    best = best_constant_logits(rate, config)
    for r, x in zip(rate, best):
        def expected(z):
            return r * float(positive_term(torch.tensor(z), "focal", 2, 0.995)) + \
                (1 - r) * float(negative_term(torch.tensor(z), "focal", 2, 0.995))
        assert expected(x) <= min(expected(x - 0.05), expected(x + 0.05))
    assert best[1] > math.log(0.05 / 0.95)  # alpha = 0.995 favours positives: above the calibrated logit


def _head_case(seed=3, N=7, D=6, V=23):
    torch.manual_seed(seed)
    hidden = torch.randn(N, D, dtype=torch.float64)
    weight = torch.randn(V, D, dtype=torch.float64)
    bias = torch.randn(V, dtype=torch.float64)
    supervised = torch.ones(V, dtype=torch.bool)
    supervised[:3] = False
    rows = torch.tensor([0, 0, 2, 3, 3, 3, 6, 6])
    tokens = torch.tensor([5, 22, 3, 4, 11, 12, 0, 17])  # token 0 is unsupervised: carries no loss
    repeats = torch.tensor([0, 2, 1, 0, 5, 0, 0, 3])
    return hidden, weight, bias, supervised, rows, tokens, repeats


@pytest.mark.parametrize("kind,gamma,with_bias,chunk,factor", [
    ("focal", 2.0, True, 4, 0.5), ("focal", 2.0, False, 23, 1.0), ("focal", 1.5, True, 5, 1.0),
    ("bce", 2.0, True, 6, 0.5)])
def test_fused_head_loss_equals_logits_then_loss(monkeypatch, kind, gamma, with_bias, chunk, factor):
    """The training path (head fused into the loss, chunked over the vocabulary) gives the loss and the
    gradients of hidden states, weight and bias of the plain path: logits = hidden @ weight.T + bias, then
    ``next_visit_loss``. Small chunks put positives on chunk edges; an incoming gradient of 1 (the trainer's
    loss.backward()) hands the saved gradients over unscaled, any other factor scales them."""
    import nextvisit.model.fused_head as fused_head_module

    monkeypatch.setattr(fused_head_module, "head_chunk_columns", lambda n, v, device: chunk)
    hidden, weight, bias, supervised, rows, tokens, repeats = _head_case()
    config = LossConfig(kind=kind, gamma=gamma)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    b = leaves[2] if with_bias else None
    fused = fused_head_module.next_visit_loss_from_hidden(leaves[0], leaves[1], b, rows, tokens, repeats,
                                                          supervised, config)
    (fused * factor).backward()
    plain_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = plain_leaves[0] @ plain_leaves[1].T + (plain_leaves[2] if with_bias else 0)
    plain = next_visit_loss(logits, rows, tokens, repeats, supervised, config)
    (plain * factor).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for f, p in zip(leaves[:3 if with_bias else 2], plain_leaves):
        torch.testing.assert_close(f.grad, p.grad, rtol=1e-9, atol=1e-12)
    if not with_bias:
        assert leaves[2].grad is None


def test_fused_head_loss_hands_its_gradients_to_one_backward_only():
    """The gradients leave without a copy, so they go to one backward: what it returns is right and owned by
    the caller alone, and differentiating the kept graph again raises a clear error instead of handing out the
    same (possibly since modified) tensors."""
    hidden, weight, bias, supervised, rows, tokens, repeats = _head_case()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = next_visit_loss_from_hidden(*leaves, rows, tokens, repeats, supervised, LossConfig())
    grads = torch.autograd.grad(loss, leaves, retain_graph=True)
    plain_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    plain = next_visit_loss(plain_leaves[0] @ plain_leaves[1].T + plain_leaves[2], rows, tokens, repeats, supervised,
                            LossConfig())
    for got, want in zip(grads, torch.autograd.grad(plain, plain_leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="one backward pass only"):
        loss.backward()


def test_fused_head_loss_under_float16_autocast_keeps_small_gradients():
    """With the paper's normaliser (N x V ~ 6e6) the scaled per-chunk gradients would fall below float16's range;
    under float16 autocast the scale is applied after the head's matmuls, so the gradients stay accurate."""
    hidden, weight, bias, supervised, *_ = _head_case(N=64, D=32, V=2000)
    rows, tokens = torch.randint(0, 64, (300,)), torch.randint(3, 2000, (300,))
    repeats = torch.zeros(300, dtype=torch.long)

    def gradients(dtype, autocast):
        leaves = [t.to(dtype).requires_grad_() for t in (hidden * 0.3, weight * 0.3)]
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = next_visit_loss_from_hidden(*leaves, None, rows, tokens, repeats, supervised, LossConfig(),
                                               normalizer=6e6)
        loss.backward()
        return [t.grad.double() for t in leaves]

    for low, exact in zip(gradients(torch.float32, True), gradients(torch.float64, False)):
        assert float((low - exact).norm() / exact.norm()) < 5e-3


def test_fused_head_loss_under_bf16_autocast_matches_the_unfused_path():
    """Under bf16 autocast the fused head runs its matmuls in bf16 (so the result is not the float32 one) and
    agrees with the unfused path under the same autocast (logits from a bf16 matmul, loss in float32), in the
    loss and in all three gradients."""
    case = [t.float() if t.is_floating_point() else t for t in _head_case(N=40, D=32, V=300)]
    hidden, weight, bias, supervised, rows, tokens, repeats = case
    config = LossConfig()

    def run(fused: bool, autocast: bool):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if fused:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = next_visit_loss_from_hidden(*leaves, rows, tokens, repeats, supervised, config)
        else:  # logits under autocast, the loss outside it
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = leaves[0] @ leaves[1].T + leaves[2]
            loss = next_visit_loss(logits, rows, tokens, repeats, supervised, config)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    exact, fused_bf16, plain_bf16 = run(True, False), run(True, True), run(False, True)
    assert fused_bf16[0].dtype == torch.float32
    assert not torch.equal(fused_bf16[0], exact[0])  # the head really ran in bf16
    torch.testing.assert_close(fused_bf16[0], plain_bf16[0], rtol=1e-4, atol=0)
    for fused_grad, plain_grad in zip(fused_bf16[1:], plain_bf16[1:]):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-2, atol=1e-2 * float(plain_grad.abs().max()))
    torch.testing.assert_close(fused_bf16[0], exact[0], rtol=2e-2, atol=0)


def test_fused_head_loss_without_positives_is_the_dense_sum():
    hidden, weight, bias, supervised, *_ = _head_case()
    empty = torch.zeros(0, dtype=torch.long)
    config = LossConfig()
    fused = next_visit_loss_from_hidden(hidden, weight, bias, empty, empty, empty, supervised, config)
    plain = next_visit_loss(hidden @ weight.T + bias, empty, empty, empty, supervised, config)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=0)


def test_unfused_loss_inside_autocast_still_sums_in_float32():
    hidden, weight, bias, supervised, rows, tokens, repeats = (t.float() if t.is_floating_point() else t
                                                                for t in _head_case(N=40, D=32, V=300))
    logits = hidden @ weight.T + bias
    outside = next_visit_loss(logits, rows, tokens, repeats, supervised, LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = next_visit_loss(logits, rows, tokens, repeats, supervised, LossConfig())
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)


def test_implied_probability_inverts_the_losses_minimiser():
    """The logit that minimises the expected loss at rate r (by search, the validation's code-frequency baseline)
    stands for probability r: focal loss (where sigmoid of that logit is far from r) and BCE, with repeat
    weights moving it the way the loss does (a down-weighted positive's logit stands for a higher rate)."""
    import numpy as np

    from nextvisit.config import LossConfig
    from nextvisit.model.losses import implied_probability
    from nextvisit.train.validation import best_constant_logits

    rates = np.array([1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.99])
    for config in (LossConfig(), LossConfig(kind="bce"), LossConfig(gamma=1.0, alpha=0.9)):
        x = torch.tensor(best_constant_logits(rates, config))
        assert np.allclose(implied_probability(x, config.kind, config.gamma, config.alpha).numpy(), rates, rtol=1e-4)
    focal = LossConfig()
    x = torch.tensor(best_constant_logits(rates, focal))
    assert torch.all(torch.sigmoid(x[:3]) > 10 * torch.tensor(rates[:3]))  # sigmoid(logit) is no probability here
    weighted = implied_probability(x, focal.kind, focal.gamma, focal.alpha, 0.25).numpy()
    assert np.all(weighted[:-1] > rates[:-1])
