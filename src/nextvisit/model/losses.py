"""The next-visit loss (METHOD §4): sigmoid focal loss (or BCE) at SEP positions over the supervised tokens,
with repeat regularization on positives, normalised by (#SEP positions x #supervised tokens).

Per logit x with s = sigmoid(x), focal loss is
    positive:  alpha * (1 - s)^gamma * softplus(-x) * repeat_weight
    negative:  (1 - alpha) * s^gamma * softplus(x)
times ``scale``. Positives are few (about 11 per SEP against tens of thousands of tokens), so the loss is
computed as "every supervised logit as a negative" (one dense fused pass, no target tensor) plus a sparse
correction at the positive pairs. The dense pass is a custom autograd function that computes the loss and its
gradient together in a few in-place passes and keeps only the gradient, one [N, V] tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nextvisit.config import LossConfig


def repeat_weight(repeats: torch.Tensor, decay: float, floor: float) -> torch.Tensor:
    """Weight of a positive target already a positive target ``repeats`` (= c - 1) times before in the
    window: ``max(decay^(c-1), floor)``.

    >>> [round(w, 6) for w in repeat_weight(torch.arange(6), 0.5, 0.1).tolist()]
    [1.0, 0.5, 0.25, 0.125, 0.1, 0.1]
    """
    return torch.clamp(decay ** repeats.to(torch.float32), min=floor)


def negative_term(x: torch.Tensor, kind: str, gamma: float, alpha: float) -> torch.Tensor:
    """Loss of logit x if its target is 0 (unscaled): (1 - alpha) s^gamma softplus(x), s = sigmoid(x). The
    power is taken as exp(gamma log s): the same value, and a finite gradient for every gamma and logit
    (differentiating s.pow(gamma) where s rounds to 0 gives 0 x inf = NaN for gamma < 1)."""
    if kind == "bce":
        return F.softplus(x)
    return (1 - alpha) * torch.exp(gamma * F.logsigmoid(x)) * F.softplus(x)


def positive_term(x: torch.Tensor, kind: str, gamma: float, alpha: float) -> torch.Tensor:
    """Loss of logit x if its target is 1 (unscaled): alpha (1 - s)^gamma softplus(-x), the power again as
    exp(gamma log(1 - s)) with log(1 - s) = logsigmoid(-x)."""
    if kind == "bce":
        return F.softplus(-x)
    return alpha * torch.exp(gamma * F.logsigmoid(-x)) * F.softplus(-x)


class _DenseNegatives(torch.autograd.Function):
    """sum over rows and weighted columns of negative_term(logits).

    The loss is always followed by its backward in training, so the forward computes the gradient as well, in
    one chain of in-place elementwise passes over the [N, V] logits (about 9 passes instead of the 17 of a
    forward plus a recomputing backward; 55 -> 19 ms per ``tiny`` step at 42,343 tokens in the profile,
    docs/model.md), and keeps only the gradient for backward. The constant factors (1 - alpha, the column
    weights, the incoming gradient) are folded into one multiplication in backward.
    """

    @staticmethod
    def forward(ctx, logits, column_weight, kind, gamma, alpha):
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):  # the sums stay in float32
            s = torch.sigmoid(logits)
            softplus = F.softplus(logits)
            if kind == "bce":
                total = (softplus @ column_weight).sum()
                grad, factor = s, 1.0  # d softplus(x) / dx = s
            else:
                s_gamma = s * s if gamma == 2 else s.pow(gamma)
                term = softplus.mul_(s_gamma)  # s^g softplus(x), in place of softplus
                total = (1 - alpha) * (term @ column_weight).sum()
                grad, factor = None, 1 - alpha
                if ctx.needs_input_grad[0]:
                    # d/dx [s^g softplus(x)] = g (1 - s) s^g softplus(x) + s^(g+1)
                    grad = torch.addcmul(term, s, term, value=-1).mul_(gamma).addcmul_(s, s_gamma)
            ctx.save_for_backward(grad if ctx.needs_input_grad[0] else None, column_weight)
            ctx.factor = factor
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, column_weight = ctx.saved_tensors
        # out of place, so a graph kept with retain_graph=True can be differentiated again
        return grad * (column_weight * (grad_output * ctx.factor)), None, None, None, None


def next_visit_loss(logits: torch.Tensor, target_rows: torch.Tensor, target_tokens: torch.Tensor,
                    target_repeats: torch.Tensor, supervised: torch.Tensor, config: LossConfig,
                    apply_repeat_decay: bool = True, normalizer: float | None = None) -> torch.Tensor:
    """Scalar loss for logits [N, V] at N SEP positions and the sparse positives (see ``sequence.Batch``).

    ``supervised`` is a boolean [V] (``Vocabulary.supervised_mask``); unsupervised columns carry no loss.
    Normalised by ``normalizer`` (default N x #supervised); a distributed or accumulated step passes the
    global count so every process sums to the same objective.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: the loss runs in float32
        logits = logits.float()
    column_weight = supervised.to(logits.dtype)
    if normalizer is None:
        normalizer = float(logits.shape[0] * int(supervised.sum()))
    if normalizer == 0:
        return logits.sum() * 0.0
    dense = _DenseNegatives.apply(logits, column_weight, config.kind, config.gamma, config.alpha)
    keep = supervised[target_tokens]  # positives are supervised by construction; guard anyway
    x = logits[target_rows[keep], target_tokens[keep]]
    weight = repeat_weight(target_repeats[keep], config.repeat_decay, config.repeat_floor) if apply_repeat_decay \
        else torch.ones_like(x)
    correction = (weight * positive_term(x, config.kind, config.gamma, config.alpha)
                  - negative_term(x, config.kind, config.gamma, config.alpha)).sum()
    return config.scale * (dense + correction) / normalizer


def head_chunk_columns(n_rows: int, vocab_size: int, device: torch.device) -> int:
    """Vocabulary columns per chunk of the fused head: about 2^19 logits per chunk on CPU (a [N, chunk] float32
    block of ~2 MB stays in cache through its elementwise passes; 2,048-4,096 columns measured best at N = 143,
    docs/model.md) and 2^26 on GPUs, where large GEMMs matter more than cache."""
    budget = (1 << 26) if device.type == "cuda" else (1 << 19)
    return int(min(vocab_size, max(512, budget // max(n_rows, 1))))


class _FusedHeadLoss(torch.autograd.Function):
    """Output head and loss together, chunk by chunk over the vocabulary; nothing of size [N, V] is built.

    For each chunk of columns c: logits = hidden @ weight[c].T (+ bias[c]) in the compute dtype, then in float32
    the dense negative term and its gradient (as ``_DenseNegatives``) and the chunk's share of the gradients of
    hidden, weight and bias; the logits of the positive pairs in the chunk are kept. After the loop the sparse
    correction (positive term minus negative term at the positive pairs) and its gradient, differentiated by
    autograd on those few logits, are added to the three gradients sparsely. The forward returns the sum times
    ``out_scale`` (the loss scale over the normaliser, folded into the per-chunk gradient factor) and keeps only
    the gradients, which its one backward hands over, scaled by the incoming gradient unless that is 1; a second
    backward through a kept graph raises. First-order only. Measured 79 -> 47 ms for the
    head, loss and head backward of a ``tiny`` step at 42,343 tokens in float32 (docs/model.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, column_weight, pos_rows, pos_tokens, pos_weight, kind, gamma, alpha,
                compute_dtype, out_scale: float):
        N, V = hidden.shape[0], weight.shape[0]
        need = ctx.needs_input_grad
        loss_dtype = torch.promote_types(compute_dtype, torch.float32)  # float32, or float64 for float64 inputs
        device = hidden.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w_all = weight.to(compute_dtype)
            column_weight = column_weight.to(loss_dtype)
            grad_hidden = torch.zeros(N, hidden.shape[1], dtype=loss_dtype, device=device)
            grad_weight = torch.empty(V, weight.shape[1], dtype=loss_dtype, device=device) if need[1] else None
            grad_bias = torch.empty(V, dtype=loss_dtype, device=device) if bias is not None and need[2] else None
            total = torch.zeros((), dtype=loss_dtype, device=device)
            chunk = head_chunk_columns(N, V, device)
            order = torch.argsort(pos_tokens)  # positives grouped by chunk
            pos_rows, pos_tokens, pos_weight = pos_rows[order], pos_tokens[order], pos_weight[order].to(loss_dtype)
            bounds = torch.searchsorted(pos_tokens, torch.arange(0, V + chunk, chunk, device=device)).tolist()
            pos_logits = torch.empty(len(pos_rows), dtype=loss_dtype, device=device)
            # out_scale rides on each chunk's gradient factor (no extra pass), except for a float16 head, where
            # the scaled gradients (10 / N x V, ~1e-6 at the paper's size) would fall below its range: there the
            # three gradients are scaled once at the end
            chunk_scale = 1.0 if compute_dtype == torch.float16 else out_scale
            for k, start in enumerate(range(0, V, chunk)):
                stop = min(start + chunk, V)
                w_chunk = w_all[start:stop]
                logits = (h @ w_chunk.T).to(loss_dtype)
                if bias is not None:
                    logits += bias[start:stop].to(loss_dtype)
                lo, hi = bounds[k], bounds[k + 1]
                pos_logits[lo:hi] = logits[pos_rows[lo:hi], pos_tokens[lo:hi] - start]
                s = torch.sigmoid(logits)
                if kind == "bce":
                    total += (F.softplus(logits) @ column_weight[start:stop]).sum()
                    grad = s.mul_(column_weight[start:stop] * chunk_scale)  # d softplus(x) / dx = s
                else:
                    s_gamma = s * s if gamma == 2 else s.pow(gamma)
                    term = F.softplus(logits).mul_(s_gamma)
                    total += (1 - alpha) * (term @ column_weight[start:stop]).sum()
                    grad = torch.addcmul(term, s, term, value=-1).mul_(gamma).addcmul_(s, s_gamma)
                    grad.mul_(column_weight[start:stop] * ((1 - alpha) * chunk_scale))
                grad_c = grad.to(compute_dtype)
                if grad_c.dtype == loss_dtype:
                    grad_hidden.addmm_(grad_c, w_chunk)
                else:
                    grad_hidden += grad_c @ w_chunk
                if grad_weight is not None:
                    if grad_c.dtype == loss_dtype:
                        torch.mm(grad_c.T, h, out=grad_weight[start:stop])
                    else:
                        grad_weight[start:stop] = grad_c.T @ h
                if grad_bias is not None:
                    torch.sum(grad, 0, out=grad_bias[start:stop])
            # the positive pairs: their negative term (in the dense sum) replaced by the weighted positive term
            with torch.enable_grad():
                x = pos_logits.requires_grad_()
                correction = (pos_weight * positive_term(x, kind, gamma, alpha)
                              - negative_term(x, kind, gamma, alpha)).sum()
                (grad_x,) = torch.autograd.grad(correction, x)
            grad_x *= chunk_scale
            total = (total + correction.detach()) * out_scale
            grad_hidden.index_add_(0, pos_rows, grad_x[:, None] * w_all[pos_tokens].to(loss_dtype))
            if grad_weight is not None:
                grad_weight.index_add_(0, pos_tokens, grad_x[:, None] * h[pos_rows].to(loss_dtype))
            if grad_bias is not None:
                grad_bias.index_add_(0, pos_tokens, grad_x)
            gradients = [grad_hidden, grad_weight, grad_bias]
            if chunk_scale != out_scale:
                gradients = [None if g is None else g.mul_(out_scale) for g in gradients]
        # kept on ctx, not saved: the one backward takes them over (and frees them), so the trainer's gradients
        # leave without a copy or a pass over the [V, D] weight gradient
        ctx.gradients = gradients
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.gradients is None:
            raise RuntimeError("the fused head loss (losses.next_visit_loss_from_hidden) hands its gradients to "
                               "one backward pass only; to differentiate a kept graph again, compute the logits and "
                               "use losses.next_visit_loss")
        gradients, ctx.gradients = ctx.gradients, None
        # The trainer's loss is this function's output, so on CPU its incoming gradient is exactly 1 and the
        # gradients go out as they are; otherwise they are scaled in place (they belong to this call alone).
        if not (grad_output.device.type == "cpu" and float(grad_output) == 1.0):
            gradients = [None if g is None else g.mul_(grad_output) for g in gradients]
        out = [None if g is None else g.to(dt) for g, dt in zip(gradients, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None, None, None)


def next_visit_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                target_rows: torch.Tensor, target_tokens: torch.Tensor, target_repeats: torch.Tensor,
                                supervised: torch.Tensor, config: LossConfig, apply_repeat_decay: bool = True,
                                normalizer: float | None = None) -> torch.Tensor:
    """``next_visit_loss`` of the logits ``hidden @ weight.T + bias`` at N SEP positions, with the head fused
    into the loss (``_FusedHeadLoss``): the training path. ``hidden`` is [N, D], ``weight`` the tied [V, D]
    embedding. Under autocast the head matmuls run in the autocast dtype, the loss in float32, as in the
    unfused path."""
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
        else hidden.dtype
    if normalizer is None:
        normalizer = float(hidden.shape[0] * int(supervised.sum()))
    if normalizer == 0:  # zero, but connected to every input, so each parameter still gets a (zero) gradient
        return (hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)) * 0.0
    keep = supervised[target_tokens]
    rows, tokens = target_rows[keep], target_tokens[keep]
    pos_weight = repeat_weight(target_repeats[keep], config.repeat_decay, config.repeat_floor) \
        if apply_repeat_decay else torch.ones(len(rows), device=hidden.device)
    return _FusedHeadLoss.apply(hidden, weight, bias, supervised, rows, tokens, pos_weight, config.kind, config.gamma,
                                config.alpha, compute_dtype, config.scale / normalizer)


# -- validation -------------------------------------------------------------------------------------------------

def best_constant_logits(rate: np.ndarray, config: LossConfig, iterations: int = 80) -> np.ndarray:
    """Per token, the constant logit that minimises the expected loss (no repeat decay) when the token is
    positive with probability ``rate``: the code-frequency baseline. For BCE this is logit(rate); focal loss
    with alpha != 0.5 moves it (golden-section search, the expected loss is unimodal in the logit).

    >>> from nextvisit.config import LossConfig
    >>> r = np.array([0.01, 0.3])
    >>> np.allclose(best_constant_logits(r, LossConfig(kind="bce")), np.log(r / (1 - r)), atol=1e-4)
    True
    """
    rate = torch.from_numpy(np.clip(np.asarray(rate, np.float64), 1e-9, 1 - 1e-9))

    def expected(x):
        return rate * positive_term(x, config.kind, config.gamma, config.alpha) + \
            (1 - rate) * negative_term(x, config.kind, config.gamma, config.alpha)

    lo, hi = torch.full_like(rate, -30.0), torch.full_like(rate, 30.0)
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(iterations):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        left = expected(a) < expected(b)
        hi = torch.where(left, b, hi)
        lo = torch.where(left, lo, a)
    return ((lo + hi) / 2).numpy()


def frequency_bands(token_visit_share: np.ndarray, edges) -> np.ndarray:
    """Band index per token from its share of train visits holding it: 0 = most common. ``edges`` descending.

    >>> frequency_bands(np.array([0.5, 0.005, 0.0001]), (0.01, 0.001)).tolist()
    [0, 1, 2]
    """
    bands = np.zeros(len(token_visit_share), np.int64)
    for edge in edges:
        bands += token_visit_share < edge
    return bands


def band_names(edges) -> list[str]:
    edges = list(edges)
    names = [f">={edges[0]:.2%}"]
    names += [f"{lo:.2%}-{hi:.2%}" for hi, lo in zip(edges[:-1], edges[1:])]
    names.append(f"<{edges[-1]:.2%}")
    return names


@dataclass
class ValidationTotals:
    """Running sums over validation batches (no repeat decay). Loss per SEP-token pair; positives split into
    new onsets (token absent earlier in the window) and repeats; per code-frequency band; and the ranking of
    new onsets among tokens not yet seen in the window (AUROC per SEP, averaged; 0.5 = chance)."""

    n_bands: int
    loss_sum: float = 0.0
    pairs: int = 0
    new_loss: float = 0.0
    new_count: int = 0
    repeat_loss: float = 0.0
    repeat_count: int = 0
    new_auroc_sum: float = 0.0
    new_auroc_seps: int = 0

    def __post_init__(self):
        self.band_loss = np.zeros(self.n_bands)
        self.band_pairs = np.zeros(self.n_bands)

    @torch.no_grad()
    def add(self, logits, batch, supervised: torch.Tensor, token_band: torch.Tensor, config: LossConfig):
        logits = logits.double()  # sums of many small terms with a cancelling correction: keep precision
        N, V = logits.shape
        sup = supervised.to(logits.dtype)
        n_sup = int(supervised.sum())
        neg = negative_term(logits, config.kind, config.gamma, config.alpha) * sup  # [N, V]
        x = logits[batch.target_rows, batch.target_tokens]
        pos = positive_term(x, config.kind, config.gamma, config.alpha)
        correction = pos - negative_term(x, config.kind, config.gamma, config.alpha)
        self.loss_sum += config.scale * float(neg.sum() + correction.sum())
        self.pairs += N * n_sup
        seen = batch.target_seen
        self.new_loss += config.scale * float(pos[~seen].sum())
        self.new_count += int((~seen).sum())
        self.repeat_loss += config.scale * float(pos[seen].sum())
        self.repeat_count += int(seen.sum())
        # per band: negatives over the band's columns plus the positives' corrections
        band_cols = torch.nn.functional.one_hot(token_band, self.n_bands).to(logits.dtype) * sup[:, None]  # [V, bands]
        band_neg = neg.sum(0) @ band_cols
        band_corr = torch.zeros(self.n_bands, dtype=logits.dtype, device=logits.device).index_add_(
            0, token_band[batch.target_tokens], correction)
        self.band_loss += config.scale * (band_neg + band_corr).cpu().numpy()
        self.band_pairs += N * band_cols.sum(0).cpu().numpy()
        self._new_onset_auroc(logits, batch, supervised)

    def _new_onset_auroc(self, logits, batch, supervised):
        """Per SEP: AUROC of logits for new-onset positives vs supervised tokens not seen earlier in the window
        that did not occur. Tokens seen earlier are left out of both sides (that is the inflation)."""
        N, V = logits.shape
        T = batch.tokens.shape[1]
        rows, cols = batch.positions // T, batch.positions % T
        doc, att = batch.doc_ids[rows], batch.att_days[rows]  # [N, T]
        own_doc, own_att = batch.doc_ids[rows, cols], batch.att_days[rows, cols]  # [N]
        visible = (doc == own_doc[:, None]) & (att <= own_att[:, None])  # what each SEP attends, [N, T]
        sep_index, token_index = visible.nonzero(as_tuple=True)
        seen = torch.zeros(N, V, dtype=torch.bool, device=logits.device)
        seen[sep_index, batch.tokens[rows][sep_index, token_index]] = True
        positive = torch.zeros(N, V, dtype=torch.bool, device=logits.device)
        new = ~batch.target_seen
        positive[batch.target_rows[new], batch.target_tokens[new]] = True
        eligible = supervised[None, :] & ~seen
        scores = logits.masked_fill(~eligible, float("-inf"))
        ranks = scores.argsort(dim=1).argsort(dim=1).to(torch.float64)  # 0 = lowest
        n_ineligible = (~eligible).sum(1).to(torch.float64)
        ranks = ranks - n_ineligible[:, None]  # rank among eligible tokens
        n_pos = positive.sum(1).to(torch.float64)
        n_neg = eligible.sum(1).to(torch.float64) - n_pos
        rank_sum = (ranks * positive).sum(1)
        ok = (n_pos > 0) & (n_neg > 0)
        auroc = (rank_sum - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg)
        self.new_auroc_sum += float(auroc[ok].sum())
        self.new_auroc_seps += int(ok.sum())

    def summary(self, names: list[str]) -> dict:
        out = {
            "val_loss": self.loss_sum / max(self.pairs, 1),
            "val_new_onset_pos_loss": self.new_loss / max(self.new_count, 1),
            "val_repeat_pos_loss": self.repeat_loss / max(self.repeat_count, 1),
            "val_new_onset_auroc": self.new_auroc_sum / max(self.new_auroc_seps, 1),
            "val_new_onset_targets": self.new_count,
            "val_repeat_targets": self.repeat_count,
        }
        for name, loss, pairs in zip(names, self.band_loss, self.band_pairs):
            out[f"val_loss_band[{name}]"] = float(loss / pairs) if pairs else float("nan")
        return out
