"""The sequence layout and the model: the attention rule case by case, no leak from the future, day-shift
invariance, inert padding and packing, the horizon query."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nextvisit.config import ModelConfig
from nextvisit.errors import UserError
import nextvisit.model.kernels as kernels_module
import nextvisit.model.transformer as model_module
from nextvisit.model.kernels import attention_kernel
from nextvisit.model.transformer import NextVisitModel, attention_allowed
from nextvisit.model.sequence import Window, query_batch, split_visits, subject_windows, visit_cap, windows_batch
from nextvisit.tokenize.store import EOW, SEP, Subject

V = 40
SUPERVISED = np.zeros(V, bool)
SUPERVISED[10:] = True  # 6..9 play age/demographic tokens, 0..5 are specials


def subject(visits, days, subject_id=1) -> Subject:
    lengths = [len(v) for v in visits]
    return Subject(subject_id, 0, np.asarray(days, np.int32), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   np.concatenate([np.asarray(v, np.int32) for v in visits]))


def model(seed=0, **overrides) -> NextVisitModel:
    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 2, **overrides})
    return NextVisitModel(config).eval()


def logits(m, batch):
    with torch.no_grad():
        return m.query_logits(batch)


# visits on days 100, 105, 106: tokens [10 11] SEP [12 13 14] SEP [10 15]
S = subject([[10, 11], [12, 13, 14], [10, 15]], [100, 105, 106])


def test_layout_days_and_attention_days():
    b = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, max_tokens=64)
    n = 2 + 1 + 3 + 1 + 2
    assert b.tokens[0, :n].tolist() == [10, 11, SEP, 12, 13, 14, SEP, 10, 15]
    assert b.days[0, :n].tolist() == [0, 0, 5, 5, 5, 5, 6, 6, 6]  # a SEP carries the next visit's day
    assert b.att_days[0, :n].tolist() == [0, 0, 4, 5, 5, 5, 5, 6, 6]  # ... and attends up to the day before
    assert b.doc_ids[0, :n].tolist() == [1] * n and (b.doc_ids[0, n:] == 0).all()
    assert b.positions.tolist() == [2, 6]
    # the first visit is input only; SEP 0 predicts visit 2's tokens, SEP 1 visit 3's
    pairs = sorted(zip(b.target_rows.tolist(), b.target_tokens.tolist()))
    assert pairs == [(0, 12), (0, 13), (0, 14), (1, 10), (1, 15)]
    seen = dict(zip(zip(b.target_rows.tolist(), b.target_tokens.tolist()), b.target_seen.tolist()))
    assert seen[(1, 10)] and not seen[(1, 15)]  # token 10 was in visit 1 (input): a repeat, not a new onset
    assert b.target_repeats.tolist() == [0] * 5  # ... but never a positive target before
    assert b.sep_visit.tolist() == [1, 2]


def test_attention_rule_case_by_case():
    b = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, max_tokens=64)
    allowed = attention_allowed(b.att_days, b.doc_ids, b.days)[0]
    v1, sep1, v2, sep2, v3 = [0, 1], 2, [3, 4, 5], 6, [7, 8]
    assert allowed[0, 1] and allowed[1, 0]  # bidirectional inside a visit
    assert allowed[3, 5] and allowed[5, 3]
    assert allowed[3, 0] and not allowed[0, 3]  # causal across visits
    assert allowed[sep1, 0] and not any(allowed[sep1, j] for j in v2)  # a SEP never sees the visit it predicts
    assert all(allowed[j, sep1] for j in v2)  # the predicted visit may see its SEP (its date)
    assert all(allowed[sep2, j] for j in v1 + v2 + [sep1]) and not any(allowed[sep2, j] for j in v3)
    # consecutive days (105, 106): visit 2 tokens share the SEP's attention day but not its rotary day (visit
    # 3's date): they never see the SEP after their own visit, as a forecast's last visit has none
    assert not any(allowed[j, sep2] for j in v2)
    assert all(allowed[j, sep2] for j in v3)  # visit 3 sees the SEP that predicted it
    assert not allowed[sep1, sep2]
    # the rule without its rotary-day condition lets visit 2 see that SEP (the mutation the line above catches)
    plain_days = (b.att_days[0][:, None] >= b.att_days[0][None, :])
    assert all(plain_days[j, sep2] for j in v2)
    # padding: nothing attends it, it attends only itself
    pad = 9
    assert not allowed[: pad, pad:].any()
    assert allowed[pad, pad] and allowed[pad].sum() == 1


# the two attention kernels that train on CPU: fused SDPA and explicit matmuls in blocks (`auto` on CPU)
KERNELS = ["sdpa", "matmul"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_subjects_do_not_attend_each_other_and_padding_is_inert(kernel):
    other = subject([[20, 21], [22], [20, 23, 24]], [50, 90, 400], subject_id=2)
    m = model(attention=kernel)
    alone = [logits(m, windows_batch([s], [Window(0, 0, s.n_visits)], SUPERVISED, 64)) for s in (S, other)]
    packed = windows_batch([S, other], [Window(0, 0, 3), Window(1, 0, 3)], SUPERVISED, 64, packed_rows=[[0, 1]])
    assert packed.tokens[0].tolist().count(EOW) == 2
    allowed = attention_allowed(packed.att_days, packed.doc_ids, packed.days)[0]
    first = packed.doc_ids[0] == 1
    second = packed.doc_ids[0] == 2
    assert not allowed[first][:, second].any() and not allowed[second][:, first].any()
    # EOW is part of each window, which changes nothing before it: the SEP logits equal the unpacked ones
    out = logits(m, packed)
    torch.testing.assert_close(out[:2], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], alone[1], atol=1e-5, rtol=1e-5)
    # padding contents change nothing
    padded = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64)
    padded.tokens[padded.doc_ids == 0] = 33
    padded.days[padded.doc_ids == 0] = 7.0
    torch.testing.assert_close(logits(m, padded), alone[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_leak_from_the_predicted_visit_or_later(kernel):
    m = model(attention=kernel)
    base = logits(m, windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64))
    changed = subject([[10, 11], [30, 31], [32, 33, 34, 35]], [100, 105, 106])
    out = logits(m, windows_batch([changed], [Window(0, 0, 3)], SUPERVISED, 64))
    torch.testing.assert_close(out[0], base[0])  # SEP 0 does not see visit 2's contents
    assert not torch.allclose(out[1], base[1])  # SEP 1 does


@pytest.mark.parametrize("kernel", KERNELS)
def test_shifting_every_day_changes_no_output(kernel):
    m = model(attention=kernel)
    b = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64)
    base = logits(m, b)
    shifted_subject = subject([[10, 11], [12, 13, 14], [10, 15]], [100 + 3650, 105 + 3650, 106 + 3650])
    torch.testing.assert_close(logits(m, windows_batch([shifted_subject], [Window(0, 0, 3)], SUPERVISED, 64)), base)
    # rotary embeddings are relative: a constant added to the model's day positions changes nothing either
    b.days = b.days + 1234.0
    b.att_days = b.att_days + 1234
    torch.testing.assert_close(logits(m, b), base, atol=2e-4, rtol=1e-4)
    # while a change of a gap does change the output
    moved = subject([[10, 11], [12, 13, 14], [10, 15]], [100, 140, 141])
    assert not torch.allclose(logits(m, windows_batch([moved], [Window(0, 0, 3)], SUPERVISED, 64)), base)


def test_matmul_attention_equals_sdpa():
    other = subject([[20, 21], [22], [20, 23, 24]], [50, 90, 400], subject_id=2)
    packed = windows_batch([S, other], [Window(0, 0, 3), Window(1, 0, 3)], SUPERVISED, 64, packed_rows=[[0, 1]])
    torch.testing.assert_close(logits(model(attention="matmul"), packed), logits(model(attention="sdpa"), packed),
                               atol=1e-5, rtol=1e-5)


def test_key_ranges_leave_out_only_keys_masked_for_the_whole_block():
    other = subject([[20, 21], [22], [20, 23, 24], [25, 26]], [50, 90, 400, 410], subject_id=2)
    packed = windows_batch([S, other, S], [Window(0, 0, 3), Window(1, 0, 4), Window(2, 0, 3)], SUPERVISED, 64,
                           packed_rows=[[0, 1], [2]])
    allowed = attention_allowed(packed.att_days, packed.doc_ids, packed.days)[:, None]
    T = allowed.shape[-1]
    ranges = kernels_module.key_ranges(allowed, block=4)
    assert [(q0, q1) for q0, q1, _, _ in ranges] == [(q0, min(q0 + 4, T)) for q0 in range(0, T, 4)]
    for q0, q1, k0, k1 in ranges:
        block = allowed[..., q0:q1, :]
        assert not block[..., :k0].any() and not block[..., k1:].any()  # nothing attended is left out
        assert block[..., k0].any() and block[..., k1 - 1].any()  # and the range is tight
    assert sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in ranges) < T * T  # some work is skipped


def test_blocked_matmul_attention_equals_the_whole_softmax(monkeypatch):
    """Values and gradients (float64) of the blocked kernel equal one softmax over all keys, and the model with
    small query blocks equals the model through SDPA."""
    other = subject([[20, 21], [22], [20, 23, 24], [25, 26]], [50, 90, 400, 410], subject_id=2)
    packed = windows_batch([S, other, S], [Window(0, 0, 3), Window(1, 0, 4), Window(2, 0, 3)], SUPERVISED, 64,
                           packed_rows=[[0, 1], [2]])
    allowed = attention_allowed(packed.att_days, packed.doc_ids, packed.days)[:, None]
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, float("-inf"))
    T = allowed.shape[-1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ranges = kernels_module.key_ranges(allowed, block=4)
    assert len(ranges) > 2
    blocked = kernels_module.matmul_attention(q, k, v, mask, ranges=ranges)
    grads = torch.autograd.grad(blocked.sum(), (q, k, v))
    whole = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + mask, dim=-1) @ v
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(whole.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(kernels_module, "QUERY_BLOCK", 4)
    torch.testing.assert_close(logits(model(attention="matmul"), packed), logits(model(attention="sdpa"), packed),
                               atol=1e-5, rtol=1e-5)


def test_auto_attention_uses_matmuls_on_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_kernel("auto", cpu) == "matmul"
    assert attention_kernel("auto", cuda) == "sdpa"
    assert attention_kernel("sdpa", cpu) == "sdpa"  # an explicit choice is kept
    with pytest.raises(UserError, match="model.attention is 'dense'; expected one of auto, sdpa, matmul, flex"):
        ModelConfig(vocab_size=V, attention="dense").validate()


@pytest.mark.parametrize("short_half", [1, 1000])  # the half-width views, and the whole-tensor arithmetic
def test_split_heads_equals_rotary_on_permuted_heads(monkeypatch, short_half):
    """The fused layout + rotary function gives apply_rotary's values and the same gradients (float64),
    also when some of its outputs get no gradient, whichever way it turns the heads."""
    monkeypatch.setattr(kernels_module, "SHORT_HALF", short_half)
    torch.manual_seed(0)
    B, T, H, d = 2, 7, 3, 8
    days = torch.tensor([[0, 0, 3, 3, 40, 41, 300], [5, 9, 9, 9, 10, 700, 700]], dtype=torch.float64)
    cos, sin = model_module.rotary_tables(days, d, 10_000.0)
    x = torch.randn(B, T, 3, H, d, dtype=torch.float64, requires_grad=True)
    q, k, v = kernels_module.split_heads(x, cos, sin, rotated=2)
    assert all(t.is_contiguous() and t.shape == (B, H, T, d) for t in (q, k, v))
    heads = x.permute(2, 0, 3, 1, 4)
    want = (model_module.apply_rotary(heads[0], cos, sin), model_module.apply_rotary(heads[1], cos, sin), heads[2])
    for got, expected in zip((q, k, v), want):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # the tables are float32
    weights = [torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3)]
    for used in ((0, 1, 2), (0, 2), (1,)):  # outputs without a gradient count as zero
        got = torch.autograd.grad(sum((outs * weights[i]).sum() for i, outs in enumerate((q, k, v)) if i in used),
                                  x, retain_graph=True)[0]
        expected = torch.autograd.grad(sum((want[i] * weights[i]).sum() for i in used), x, retain_graph=True)[0]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    small = torch.randn(1, 3, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    c, s = model_module.rotary_tables(days[:1, :3] * 1000, 4, 10_000.0)
    assert torch.autograd.gradcheck(lambda t: kernels_module.split_heads(t, c.double(), s.double(), 1), (small,))


def test_blocked_attention_backward_with_dropout():
    """Dropout inside the blocked kernel: the backward matches finite differences under the same dropout draw,
    the draw changes the output, and the output averages to the one without dropout."""
    torch.manual_seed(0)
    T = 6
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, float("-inf"))
    q, k, v = (torch.randn(1, 2, T, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ranges = kernels_module.key_ranges(allowed, block=2)

    def dropped(q, k, v, seed=1):
        torch.manual_seed(seed)
        return kernels_module.matmul_attention(q, k, v, mask, dropout_p=0.3, ranges=ranges)

    assert torch.autograd.gradcheck(dropped, (q, k, v))
    plain = kernels_module.matmul_attention(q, k, v, mask, ranges=ranges).detach()
    assert not torch.allclose(dropped(q, k, v), plain)
    with torch.no_grad():
        mean = torch.stack([dropped(q, k, v, seed) for seed in range(4000)]).mean(0)
    torch.testing.assert_close(mean, plain, atol=0.05, rtol=0.0)


def test_blocked_attention_is_first_order_frees_its_blocks_and_follows_autocast():
    torch.manual_seed(0)
    T = 6
    mask = torch.zeros(1, 1, T, T).masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    q, k, v = (torch.randn(1, 2, T, 4, requires_grad=True) for _ in range(3))
    out = kernels_module.matmul_attention(q, k, v, mask, ranges=kernels_module.key_ranges(mask == 0, block=2))
    out.sum().backward(retain_graph=False)
    with pytest.raises(RuntimeError, match="second time|freed"):  # the saved blocks are gone after backward
        out.sum().backward()

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return 1
        return sum(map(tensors, value)) if isinstance(value, (list, tuple)) else 0

    assert tensors(list(vars(out.grad_fn).values())) == 0  # and nothing else on the node holds them
    (dq,) = torch.autograd.grad(kernels_module.matmul_attention(q, k, v, mask).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):  # second-order gradients are refused, not silently wrong
        torch.autograd.grad(dq.sum(), k)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inputs: computed in bf16 throughout
        mixed = kernels_module.matmul_attention(q, k, v, mask)
        grads = torch.autograd.grad(mixed.sum(), (q, k, v))
    assert mixed.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    for got, want in zip(grads, torch.autograd.grad(kernels_module.matmul_attention(q, k, v, mask).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


def test_bf16_autocast_training_gradients_stay_near_float32():
    """A training step's parameter gradients under bf16 autocast (the blocked kernel, split heads, the last
    layer at positions) point where the float32 ones do."""
    from nextvisit.config import LossConfig
    from nextvisit.model.fused_head import next_visit_loss_from_hidden

    other = subject([[20, 21], [22], [20, 23, 24], [25, 26]], [50, 90, 400, 410], subject_id=2)
    packed = windows_batch([S, other, S], [Window(0, 0, 3), Window(1, 0, 4), Window(2, 0, 3)], SUPERVISED, 64,
                           packed_rows=[[0, 1], [2]])
    m = model(n_layers=3).train()
    assert attention_kernel(m.config.attention, torch.device("cpu")) == "matmul"

    def gradients():
        m.zero_grad()
        hidden = m(packed.tokens, packed.days, packed.att_days, packed.doc_ids, packed.positions, head=False)
        loss = next_visit_loss_from_hidden(hidden, m.embed.weight, m.output_bias, packed.target_rows,
                                           packed.target_tokens, packed.target_repeats,
                                           torch.from_numpy(SUPERVISED), LossConfig())
        loss.backward()
        return {name: p.grad.clone() for name, p in m.named_parameters()}

    full = gradients()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gradients()
    for name, want in full.items():
        assert low[name].dtype == torch.float32
        error = float((low[name] - want).norm() / want.norm())
        assert error < 0.05, (name, error)


def test_bf16_autocast_on_cpu_keeps_the_attention_rule(monkeypatch):
    """Under bf16 autocast on CPU the default kernel is the explicit matmul one; the predicted visit still cannot
    leak into its SEP, and the logits stay close to float32."""
    calls = []
    real = kernels_module.matmul_attention
    monkeypatch.setattr(kernels_module, "matmul_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = model()
    assert m.config.attention == "auto"
    changed = subject([[10, 11], [30, 31], [32, 33, 34, 35]], [100, 105, 106])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = logits(m, windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64))
        out = logits(m, windows_batch([changed], [Window(0, 0, 3)], SUPERVISED, 64))
    assert len(calls) == 2 * m.config.n_layers
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])
    full = logits(m, windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64))
    assert len(calls) == 3 * m.config.n_layers  # and so does float32 on CPU
    torch.testing.assert_close(base.float(), full, atol=0.05, rtol=0.05)


def test_query_equals_the_sep_of_a_next_visit_on_that_day():
    """A horizon query at last day + H sees exactly what the SEP before a real visit at that day sees."""
    m = model()
    history = subject([[10, 11], [12, 13, 14]], [100, 105])
    future = subject([[10, 11], [12, 13, 14], [10, 15]], [100, 105, 105 + 730])
    q = query_batch([history], 730, max_tokens=511)
    assert q.tokens[0, q.positions[0]] == SEP
    assert q.days[0, q.positions[0]] == 5 + 730 and q.att_days[0, q.positions[0]] == 5 + 729
    full = logits(m, windows_batch([future], [Window(0, 0, 3)], SUPERVISED, 64))
    torch.testing.assert_close(logits(m, q)[0], full[1], atol=1e-5, rtol=1e-5)
    # different horizons give different answers; one row per subject
    q2 = query_batch([history, history], [365, 1825])
    out = logits(m, q2)
    assert out.shape == (2, V) and not torch.allclose(out[0], out[1])


def test_query_keeps_the_most_recent_tokens_from_a_visit_boundary():
    visits = [[10 + i % 20, 11, 12] for i in range(40)]  # 40 visits of 3 tokens: 160 tokens with SEPs
    s = subject(visits, np.arange(40) * 10)
    q = query_batch([s], 365, max_tokens=20)
    n = int((q.doc_ids[0] > 0).sum())
    assert n <= 21  # history <= 20 tokens plus the query SEP
    history = q.tokens[0, : n - 1].tolist()
    assert history[:3] == visits[-5] and history[-3:] == visits[-1]  # 5 whole visits: 5*3 + 4 SEPs = 19
    assert q.days[0, 0] == 0 and q.days[0, n - 1] == 40 + 365  # days relative to the window's first visit
    assert q.sep_visit.tolist() == [40]
    empty = Subject(7, 0, np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32))
    with pytest.raises(UserError, match="subject 7: no visits"):
        query_batch([empty], 365)


def test_windows_cover_every_visit_boundary_once():
    lengths = np.array([3, 5, 2, 7, 4, 4, 6, 1])
    windows = split_visits(lengths, max_tokens=12)
    assert windows[0][0] == 0 and windows[-1][1] == len(lengths)
    targets = [v for start, stop in windows for v in range(start + 1, stop)]
    assert targets == list(range(1, len(lengths)))  # each visit after the first is predicted exactly once
    kept = np.minimum(lengths, visit_cap(12))  # a visit longer than half a window is truncated (counted)
    assert visit_cap(12) == 5 and all(sum(kept[a:b]) + (b - a) <= 12 for a, b in windows)
    s = subject([[10] * n for n in lengths], np.arange(len(lengths)))
    b = windows_batch([s], subject_windows([s], 12), SUPERVISED, 12)
    assert b.sep_visit.tolist() == list(range(1, len(lengths)))


def test_repeat_counts_count_earlier_positive_targets_in_the_window():
    chronic = subject([[10], [10, 11], [10], [10, 12], [10], [10], [10]], np.arange(7) * 30)
    b = windows_batch([chronic], [Window(0, 0, 7)], SUPERVISED, 64)
    is_chronic = b.target_tokens == 10
    assert b.target_repeats[is_chronic].tolist() == [0, 1, 2, 3, 4, 5]
    assert b.target_seen[is_chronic].all()  # in the input visit already: never a new onset


def test_head_runs_only_at_sep_positions():
    m = model()
    b = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64)
    seen_shapes = {}

    def record(name):
        def hook(module, inputs, output):
            seen_shapes[name] = tuple(output.shape)
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in (("first mlp", m.blocks[0].fc), ("last mlp", m.blocks[-1].fc), ("final", m.ln_final))]
    out = logits(m, b)
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, V)  # N SEPs x V, never B x T x V
    B, T = b.tokens.shape
    # every token in the layers below; the last layer's MLP and the final norm at the 2 SEPs only
    assert seen_shapes == {"first mlp": (B, T, 128), "last mlp": (2, 128), "final": (2, 32)}


@pytest.mark.parametrize("kernel", KERNELS)
def test_last_layer_at_sep_positions_equals_the_whole_last_layer(kernel):
    """The last layer runs at the requested positions only; values and gradients equal running it everywhere
    and reading those positions (float64), for positions in any order, rows without any, and padding."""
    other = subject([[20, 21], [22], [20, 23, 24], [25, 26]], [50, 90, 400, 410], subject_id=2)
    packed = windows_batch([S, other, S], [Window(0, 0, 3), Window(1, 0, 4), Window(2, 0, 3)], SUPERVISED, 64,
                           packed_rows=[[0, 1], [2]])
    T = packed.tokens.shape[1]
    # a third row without SEPs (all padding), and the positions shuffled
    for name in ("tokens", "days", "att_days", "doc_ids"):
        t = getattr(packed, name)
        setattr(packed, name, torch.cat([t, torch.zeros_like(t[:1])]))
    positions = packed.positions[torch.tensor([4, 0, 6, 2, 1, 5, 3])]
    assert len(positions) == 7 and (positions // T).tolist().count(0) == 5  # rows: 5, 2 and 0 SEPs
    m = model(attention=kernel, n_layers=3).double().train()  # dropout 0 by default: deterministic
    args = (packed.tokens, packed.days, packed.att_days, packed.doc_ids)
    target = torch.randn(7, V, dtype=torch.float64)

    fast = m(*args, positions)
    (fast * target).sum().backward()
    fast_grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    full = m.hidden_states(*args).reshape(-1, 32).index_select(0, positions) @ m.embed.weight.T
    (full * target).sum().backward()
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    for name, p in m.named_parameters():
        torch.testing.assert_close(fast_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_no_positions_gives_empty_outputs_and_a_connected_zero_loss():
    from nextvisit.config import LossConfig
    from nextvisit.model.fused_head import next_visit_loss_from_hidden

    m = model(output_bias=True).train()
    b = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64)
    none = torch.zeros(0, dtype=torch.long)
    args = (b.tokens, b.days, b.att_days, b.doc_ids, none)
    assert m(*args).shape == (0, V)
    hidden = m(*args, head=False)
    assert hidden.shape == (0, 32)
    loss = next_visit_loss_from_hidden(hidden, m.embed.weight, m.output_bias, none, none, none,
                                       torch.from_numpy(SUPERVISED), LossConfig(), normalizer=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())  # DDP needs them all


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NEXTVISIT_TEST_FLEX"), reason="compiles FlexAttention (~20 s on CPU); "
                    "set NEXTVISIT_TEST_FLEX=1 to run")
def test_flex_attention_matches_sdpa_when_available():
    m = model()
    b = windows_batch([S], [Window(0, 0, 3)], SUPERVISED, 64)
    base = logits(m, b)
    m.config.attention = "flex"
    try:
        flex = logits(m, b)
    except Exception as exc:  # compiled FlexAttention needs a working C++ toolchain
        pytest.skip(f"FlexAttention unavailable here: {type(exc).__name__}")
    torch.testing.assert_close(flex, base, atol=1e-4, rtol=1e-4)
