"""The next-visit loss (METHOD §4): sigmoid focal loss (or BCE) at SEP positions over the supervised tokens,
with repeat regularization on positives, normalised by (#SEP positions x #supervised tokens).

Per logit x with s = sigmoid(x), focal loss is
    positive:  alpha * (1 - s)^gamma * softplus(-x) * repeat_weight
    negative:  (1 - alpha) * s^gamma * softplus(x)
times ``scale``. Positives are few (about 11 per SEP against tens of thousands of tokens), so the loss is
computed as "every supervised logit as a negative" (one dense fused pass, no target tensor) plus a sparse
correction at the positive pairs. The dense pass is a custom autograd function that computes the loss and its
gradient together in a few in-place passes and keeps only the gradient, one [N, V] tensor. Training runs the
same loss with the tied head fused into it, chunk by chunk over the vocabulary (``nextvisit.model.fused_head``).
"""

from __future__ import annotations

import math

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


def implied_probability(logits: torch.Tensor, kind: str, gamma: float, alpha: float,
                        weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The probability of a token that a logit stands for under the training loss: the rate r at which ``logits``
    minimise the expected loss r * weight * positive_term + (1 - r) * negative_term, i.e. the r where its derivative
    vanishes, r = N'(x) / (N'(x) - weight * P'(x)). For BCE (and weight 1) this is sigmoid(x); focal loss with
    alpha = 0.995 puts the minimiser far above the calibrated logit (a 1% token gets a logit near 0), so sampling
    from sigmoid(x) would draw far too many codes. ``weight``: the repeat weight the loss gave such a positive
    (``repeat_weight``), so a recurring code is read back at its own rate. Float64, in log space."""
    x = logits.double()
    log_s, log_1s = F.logsigmoid(x), F.logsigmoid(-x)
    s, one_minus_s = torch.exp(log_s), torch.exp(log_1s)
    if kind == "bce":
        log_ratio = log_1s - log_s  # -P'/N' = (1 - s) / s
    else:
        # N' = (1-a) s^g [g (1-s) softplus(x) + s];  -P' = a (1-s)^g [g s softplus(-x) + (1-s)]
        log_ratio = (math.log(alpha) - math.log1p(-alpha) + gamma * (log_1s - log_s)
                     + torch.log(gamma * s * F.softplus(-x) + one_minus_s)
                     - torch.log(gamma * one_minus_s * F.softplus(x) + s))
    w = torch.as_tensor(weight, dtype=torch.float64, device=x.device)
    return torch.sigmoid(-(torch.log(w) + log_ratio))


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
