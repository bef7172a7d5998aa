"""The transformer's hand-written kernels. ``nextvisit.model.transformer`` is the readable model; these compute
the same values as its plain formulas (``apply_rotary``, ``softmax(q k^T / sqrt(d) + mask) v``; tested in
float64) with fewer passes and copies:

- ``split_heads``: the head split and rotary turn of queries and keys, with its own backward (every device);
- ``key_ranges``, ``matmul_attention``: attention as blocked matmuls over only the keys each block of queries
  may attend, the default on CPU, where it trains faster than SDPA with the packed mask (docs/model.md,
  "Attention implementation: measured").

Also here: which attention implementation a layer uses (``attention_kernel``) and the FlexAttention compile
cache (``compiled``).
"""

from __future__ import annotations

import torch

QUERY_BLOCK = 128  # queries per block of the matmul kernel (64 and 128 measured; docs/model.md)


def key_ranges(allowed: torch.Tensor, block: int | None = None) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) for each block of ``block`` queries of a boolean mask [..., T, T]: every key outside
    [k0, k1) is masked for every query of the block in every row, so leaving it out changes no output. With
    packed subjects and attention causal across visits, the ranges cover about 45% of T x T (docs/model.md)."""
    block = block or QUERY_BLOCK
    anywhere = allowed.reshape(-1, *allowed.shape[-2:]).any(0)  # [T, T]
    T = anywhere.shape[0]
    starts = list(range(0, T, block))
    needed = torch.stack([anywhere[q0:q0 + block].any(0) for q0 in starts]).to(torch.uint8)  # [blocks, T]
    first = needed.argmax(1)
    last = T - 1 - needed.flip(1).argmax(1)
    return [(q0, min(q0 + block, T), k0, k1 + 1) for q0, k0, k1 in zip(starts, first.tolist(), last.tolist())]


SHORT_HALF = 32  # head halves shorter than this are turned with whole-tensor arithmetic (``_rotate``)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * cos + swap(x) * sin for x of any layout, swap exchanging the two halves of the last dimension: with the
    tables of ``transformer.rotary_tables`` ((c, c), (-s, s)) the pairs (x1, x2) turn to (x1 c - x2 s,
    x2 c + x1 s). Written into ``out`` (any layout, not overlapping x), or a new contiguous tensor. Heads whose
    halves are shorter than ``SHORT_HALF`` are turned as whole tensors (a swapped copy, then one multiply and
    one multiply-add): the half-width way measured 2x slower for heads of 32 in bf16 (a `tiny` bf16 step 3-8%
    slower), and 25% faster for heads of 64 (docs/model.md, "Model")."""
    half = x.shape[-1] // 2
    if half >= SHORT_HALF:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
        c, s = cos[..., :half], sin[..., half:]
        torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
        torch.mul(x2, c, out=o2).addcmul_(x1, s)
        return out
    turned = torch.mul(x, cos, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    swapped = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    swapped[..., :half].copy_(x[..., half:])
    swapped[..., half:].copy_(x[..., :half])
    turned.addcmul_(swapped, sin)
    return turned if out is None else out.copy_(turned)


class _Heads(torch.autograd.Function):
    """[B, T, n, H, d] (a projection's output) -> n contiguous tensors [B, H, T, d], the first ``rotated`` of
    them turned by the day angles (the same values as ``transformer.apply_rotary``). The heads come out in the
    layout the attention kernels take without copies, and the backward writes the gradient straight into the
    projection's layout (autograd through permute, cat and slices zero-fills full-size buffers and adds)."""

    @staticmethod
    def forward(ctx, x, cos, sin, rotated: int):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # tables (c, c), (-s, s)
        ctx.save_for_backward(cos, sin)
        ctx.rotated, ctx.shape = rotated, x.shape
        heads = []
        for i in range(x.shape[2]):
            part = x[:, :, i].transpose(1, 2)  # [B, H, T, d] view
            heads.append(_rotate(part, cos, sin) if i < rotated else part.clone(memory_format=torch.contiguous_format))
        return tuple(heads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        grad = torch.empty(ctx.shape, dtype=cos.dtype, device=cos.device)  # the input's dtype
        for i, g in enumerate(grads):  # (autograd hands zeros for outputs that got no gradient)
            target = grad[:, :, i].transpose(1, 2)
            if i < ctx.rotated:
                # the transpose of the turn: swap(g * (-s, s)) = swap(g) * (s, -s), i.e. the same turn with -sin
                _rotate(g, cos, -sin, target)
            else:
                target.copy_(g)
        return grad, None, None, None


def split_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated: int) -> tuple[torch.Tensor, ...]:
    """[B, T, n, H, d] -> n contiguous [B, H, T, d], the first ``rotated`` rotated (tables of
    ``transformer.rotary_tables``)."""
    return _Heads.apply(x, cos, sin, rotated)


class _BlockedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v for q [B, H, Tq, d], k, v [B, H, Tk, d], one block of queries at a
    time against its key range only. Every matmul reads and writes contiguous blocks (the BLAS kernels copy
    strided operands and results, and loop over the batch for them in float32), the key and value ranges are
    copied once and kept for the backward, which adds the blocks' key and value gradients into place (autograd
    through the slices would zero-fill a full-size gradient per block)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, ranges, dropout_p: float):
        B, H, Tq, d = q.shape
        scale = d ** -0.5
        q3, k3, v3 = (t.reshape(B * H, -1, d) for t in (q, k, v))
        outputs, saved = [], []
        for q0, q1, k0, k1 in ranges:
            q_block = q3[:, q0:q1].contiguous()
            k_block, v_block = k3[:, k0:k1].contiguous(), v3[:, k0:k1].contiguous()
            scores = q3.new_empty(B * H, q1 - q0, k1 - k0).baddbmm_(q_block, k_block.mT, beta=0, alpha=scale)
            scores.view(B, H, q1 - q0, k1 - k0).add_(mask[..., q0:q1, k0:k1])
            probabilities = torch.softmax(scores, dim=-1)
            keep = None
            if dropout_p:
                keep = torch.empty_like(probabilities, dtype=torch.bool).bernoulli_(1 - dropout_p)
                outputs.append(torch.bmm(probabilities * keep / (1 - dropout_p), v_block))
            else:
                outputs.append(torch.bmm(probabilities, v_block))
            saved += [q_block, k_block, v_block, probabilities, keep]
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(*saved)  # freed after the backward unless the graph is retained
        ctx.ranges, ctx.dropout_p, ctx.shapes = ranges, dropout_p, (q.shape, k.shape)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)).view(q.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # in the forward's dtype, whatever the caller's
            return _BlockedAttention._gradients(ctx, grad_out)

    @staticmethod
    def _gradients(ctx, grad_out):
        q_shape, k_shape = ctx.shapes
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        scale, p = q_shape[-1] ** -0.5, ctx.dropout_p
        B, H, Tq, d = q_shape
        g3 = grad_out.reshape(B * H, Tq, d)
        dk = g3.new_zeros(B * H, k_shape[-2], d) if need_k else None
        dv = g3.new_zeros(B * H, k_shape[-2], d) if need_v else None
        dq_blocks = []
        saved = ctx.saved_tensors
        for i, (q0, q1, k0, k1) in enumerate(ctx.ranges):
            q_block, k_block, v_block, probabilities, keep = saved[5 * i:5 * i + 5]
            g = g3[:, q0:q1].contiguous()
            dropped = probabilities if keep is None else probabilities * keep / (1 - p)
            if need_v:
                dv[:, k0:k1] += torch.bmm(dropped.mT, g)
            if not (need_q or need_k):
                continue
            d_probabilities = torch.bmm(g, v_block.mT)
            if keep is not None:
                d_probabilities = d_probabilities * keep / (1 - p)
            d_scores = torch._softmax_backward_data(d_probabilities, probabilities, -1, probabilities.dtype)
            if need_q:
                dq_blocks.append(g.new_empty(g.shape).baddbmm_(d_scores, k_block, beta=0, alpha=scale))
            if need_k:
                dk[:, k0:k1] += g.new_empty(k_block.shape).baddbmm_(d_scores.mT, q_block, beta=0, alpha=scale)
        dq = (dq_blocks[0] if len(dq_blocks) == 1 else torch.cat(dq_blocks, dim=1)).view(q_shape) if need_q else None
        return dq, dk.view(k_shape) if need_k else None, dv.view(k_shape) if need_v else None, None, None, None


def matmul_attention(q, k, v, mask, dropout_p: float = 0.0, ranges=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as plain batched matmuls and a softmax, one block of queries at a time
    against only the keys the block may attend (``ranges`` from ``key_ranges``; default: all at once). On CPU
    this is faster than the fused SDPA kernel with the packed mask (docs/model.md): the scores of masked key
    ranges are never computed, and in bfloat16 the matmuls run as bfloat16 GEMMs. Under autocast everything
    runs in the autocast dtype (float64 stays float64, as autocast leaves it); first-order gradients only."""
    device_type = q.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) and \
        q.dtype != torch.float64 else q.dtype
    q, k, v, mask = (t.to(dtype) for t in (q, k, v, mask))
    with torch.autocast(device_type, enabled=False):
        return _BlockedAttention.apply(q, k, v, mask, ranges or [(0, q.shape[-2], 0, k.shape[-2])], dropout_p)


def attention_kernel(kind: str, device: torch.device) -> str:
    """The attention implementation a layer uses: ``auto`` is the blocked matmul kernel on CPU (it trains faster
    than SDPA there in bfloat16 and float32, docs/model.md) and SDPA elsewhere."""
    if kind != "auto":
        return kind
    return "matmul" if device.type == "cpu" else "sdpa"


_COMPILED = {}


def compiled(fn):
    """FlexAttention is only efficient compiled; compile it once per process."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]
