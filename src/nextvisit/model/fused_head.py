"""The training path of the loss: the tied output head fused into ``losses.next_visit_loss``, chunk by chunk
over the vocabulary, so nothing of size [N, V] is built (docs/model.md, "Model"). Same value and gradients as
logits = hidden @ weight.T + bias followed by ``next_visit_loss`` (tested in float64); the readable loss and its
focal terms are in ``nextvisit.model.losses``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextvisit.config import LossConfig
from nextvisit.model.losses import negative_term, positive_term, repeat_weight


def head_chunk_columns(n_rows: int, vocab_size: int, device: torch.device) -> int:
    """Vocabulary columns per chunk of the fused head: about 2^19 logits per chunk on CPU (a [N, chunk] float32
    block of ~2 MB stays in cache through its elementwise passes; 2,048-4,096 columns measured best at N = 143,
    docs/model.md) and 2^26 on GPUs, where large GEMMs matter more than cache."""
    budget = (1 << 26) if device.type == "cuda" else (1 << 19)
    return int(min(vocab_size, max(512, budget // max(n_rows, 1))))


class _FusedHeadLoss(torch.autograd.Function):
    """Output head and loss together, chunk by chunk over the vocabulary; nothing of size [N, V] is built.

    For each chunk of columns c: logits = hidden @ weight[c].T (+ bias[c]) in the compute dtype, then in float32
    the dense negative term and its gradient (as ``losses._DenseNegatives``) and the chunk's share of the gradients of
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
            raise RuntimeError("the fused head loss (fused_head.next_visit_loss_from_hidden) hands its gradients to "
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
