"""The next-visit transformer (METHOD §4): decoder-style, pre-LayerNorm, no biases, GELU MLP, rotary
embeddings over day offsets, output head tied to the token embedding.

Shapes: B rows, T tokens, D = d_model, H heads of size d = D / H, N scored SEP positions, V vocabulary.
The head runs only at the N positions (gathered first), so nothing of size B x T x V is ever built.
The attention rule (a attends b iff same document and att_day[a] >= att_day[b]) becomes one additive mask
per batch (plain matmuls over blocks of queries and only the keys each block may attend on CPU, SDPA on
GPUs) or one block mask per batch (FlexAttention), shared by all layers. In training the head is
applied inside the loss (``forward(..., head=False)``). The last layer runs at the N positions only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nextvisit.config import ModelConfig
from nextvisit.model.sequence import Batch


def attention_allowed(att_days: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T, T]: row a may attend column b. Same non-zero document and att_day[a] >= att_day[b].
    Padding (doc 0) attends only itself, so its softmax stays defined; nothing else attends padding."""
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] > 0)
    causal_days = att_days[:, :, None] >= att_days[:, None, :]
    T = att_days.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=att_days.device)
    return (same_doc & causal_days) | eye


def rotary_tables(days: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables [B, 1, T, d] for ``apply_rotary``: angle day * base^(-2i/d) per pair i (positions are day offsets,
    not token indices), as (cos, cos) and (-sin, sin) over the two halves of a head."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=days.device, dtype=torch.float64) / head_dim)
    angles = days.to(torch.float64)[:, None, :, None] * inv_freq  # [B, 1, T, d/2]
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + d/2]) of x [..., B, H, T, d] by the day angles:
    (x1 cos - x2 sin, x1 sin + x2 cos), written as x * (cos, cos) + (x2, x1) * (-sin, sin)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos.to(x.dtype), swapped, sin.to(x.dtype))


QUERY_BLOCK = 128  # queries per block of the matmul kernel (64 and 128 measured; docs/model.md)


class LayerMask(NamedTuple):
    """The attention rule of one batch, shared by every layer: the additive mask [B, 1, T, T] (0 where allowed,
    -inf elsewhere) and, per block of queries, the range of keys that any of them may attend in any row."""

    additive: torch.Tensor
    key_ranges: list[tuple[int, int, int, int]]


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
    tables of ``rotary_tables`` ((c, c), (-s, s)) the pairs (x1, x2) turn to (x1 c - x2 s, x2 c + x1 s). Written
    into ``out`` (any layout, not overlapping x), or a new contiguous tensor. Heads whose halves are shorter than
    ``SHORT_HALF`` are turned as whole tensors (a swapped copy, then one multiply and one multiply-add): the
    half-width way measured 2x slower for heads of 32 in bf16 (a `tiny` bf16 step 3-8% slower), and 25% faster
    for heads of 64 (docs/model.md, "Model")."""
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
    them turned by the day angles (the same values as ``apply_rotary``). The heads come out in the layout the
    attention kernels take without copies, and the backward writes the gradient straight into the projection's
    layout (autograd through permute, cat and slices zero-fills full-size buffers and adds)."""

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
    """[B, T, n, H, d] -> n contiguous [B, H, T, d], the first ``rotated`` rotated (tables of ``rotary_tables``)."""
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


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, flex: bool):
        B, T, D = x.shape
        q, k, v = split_heads(self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads), cos, sin, rotated=2)
        if flex:
            from torch.nn.attention.flex_attention import flex_attention

            y = _compiled(flex_attention)(q, k, v, block_mask=mask)
        else:
            y = self._attend(q, k, v, mask.additive, mask.key_ranges)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def _attend(self, q, k, v, additive, key_ranges=None):
        """softmax(q k^T / sqrt(d) + additive) v through the kernel ``model.attention`` resolves to."""
        dropout_p = self.dropout if self.training else 0.0
        if attention_kernel(self.config.attention, q.device) == "matmul":
            return matmul_attention(q, k, v, additive, dropout_p, key_ranges)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout_p)

    def at_positions(self, x, cos, sin, mask, where: "QueryLayout"):
        """The attention output [N, D] at the flat positions of ``where`` only: keys and values for every
        token, queries, scores and the output projection for those N positions (padded per row to W)."""
        B, T, D = x.shape
        H = self.n_heads
        w_q, w_kv = self.qkv.weight[:D], self.qkv.weight[D:]  # the layers have no biases (METHOD §4)
        k, v = split_heads(F.linear(x, w_kv).view(B, T, 2, H, D // H), cos, sin, rotated=1)  # [B, H, T, d]
        q = F.linear(x.reshape(B * T, D).index_select(0, where.positions), w_q)  # [N, D]
        q, = split_heads(where.to_padded(q).view(B, where.width, 1, H, D // H), where.rows_of(cos),
                         where.rows_of(sin), rotated=1)  # [B, H, W, d]
        y = self._attend(q, k, v, where.rows_of(mask.additive))  # mask rows [B, 1, W, T]
        return self.proj(where.from_padded(y.transpose(1, 2).reshape(B, where.width, D)))


class QueryLayout:
    """N flat positions (``b * T + t``, any order) laid out as rows of a [B, W] grid, W the most positions in
    one row, so the last layer can attend from those positions only. Empty slots point at column 0 of their
    row (which always attends itself, so its softmax is defined); their outputs are never read."""

    def __init__(self, positions: torch.Tensor, B: int, T: int):
        self.positions = positions = positions.long()
        rows = positions // T
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=B)
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.empty_like(positions)
        slots[order] = torch.arange(len(positions), device=positions.device) - starts[rows[order]]
        self.rows, self.slots = rows, slots
        self.width = max(1, int(counts.max())) if len(positions) else 1
        self.columns = torch.zeros(B, self.width, dtype=torch.long, device=positions.device)
        self.columns[rows, slots] = positions % T
        self.batch_index = torch.arange(B, device=positions.device)[:, None]

    def rows_of(self, table: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, ...] -> [B, 1, W, ...]: the entries at the laid-out columns."""
        return table[:, 0][self.batch_index, self.columns][:, None]

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [B, W, D], zeros in empty slots."""
        padded = values.new_zeros(self.columns.shape[0], self.width, values.shape[-1])
        return padded.index_put((self.rows, self.slots), values)

    def from_padded(self, values: torch.Tensor) -> torch.Tensor:
        """[B, W, D] -> [N, D] in the order of the positions."""
        return values[self.rows, self.slots]


_COMPILED = {}


def _compiled(fn):
    """FlexAttention is only efficient compiled; compile it once per process."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model, bias=False)
        self.attn = SelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model, bias=False)
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=False)
        self.fc_out = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, flex):
        x = x + self.drop(self.attn(self.ln_attn(x), cos, sin, mask, flex))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_mlp(x)))))

    def at_positions(self, x, cos, sin, mask, where: QueryLayout) -> torch.Tensor:
        """The block's output [N, D] at the positions of ``where`` only (the last layer, whose other outputs
        nothing reads): the MLP and all but the keys and values of attention run on N rows, not B x T."""
        attended = self.attn.at_positions(self.ln_attn(x), cos, sin, mask, where)
        x = x.reshape(-1, x.shape[-1]).index_select(0, where.positions) + self.drop(attended)
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_mlp(x)))))


class NextVisitModel(nn.Module):
    """``forward(tokens, days, att_days, doc_ids, positions) -> logits [N, V]`` at the flat positions
    (``b * T + t``); one sigmoid per vocabulary token gives P(token in the next visit)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the vocabulary")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model, bias=False)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.output_bias else None
        self.apply(self._init_weights)
        # residual projections scaled down with depth (GPT-2)
        for name, parameter in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(parameter, 0.0, config.init_std / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_mask(self, att_days: torch.Tensor, doc_ids: torch.Tensor):
        """Built once per batch, shared by every layer."""
        if self.config.attention == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def mask_mod(b, h, q, kv):
                return ((doc_ids[b, q] == doc_ids[b, kv]) & (doc_ids[b, q] > 0) & (att_days[b, q] >= att_days[b, kv])) | (q == kv)

            B, T = att_days.shape
            return create_block_mask(mask_mod, B, None, T, T, device=att_days.device)
        # SDPA turns a boolean mask into an additive one inside every call (every layer, forward and
        # backward); converting once per batch, in the dtype the layers compute in, measured ~40% faster
        # attention (docs/model.md).
        device_type = att_days.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
            else self.embed.weight.dtype
        allowed = attention_allowed(att_days, doc_ids)[:, None]  # [B, 1, T, T]
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        uses_ranges = attention_kernel(self.config.attention, allowed.device) == "matmul"
        return LayerMask(additive, key_ranges(allowed) if uses_ranges else [])

    def _layer_inputs(self, tokens, days, att_days, doc_ids):
        """Embeddings [B, T, D], rotary tables and the attention mask, shared by every layer."""
        config = self.config
        mask = self.attention_mask(att_days, doc_ids)
        cos, sin = rotary_tables(days, config.d_model // config.n_heads, config.rope_base)
        return self.embed(tokens), cos, sin, mask

    def hidden_states(self, tokens, days, att_days, doc_ids) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, D]."""
        x, cos, sin, mask = self._layer_inputs(tokens, days, att_days, doc_ids)
        flex = self.config.attention == "flex"
        for block in self.blocks:
            x = block(x, cos, sin, mask, flex)
        return self.ln_final(x)

    def forward(self, tokens, days, att_days, doc_ids, positions, head: bool = True) -> torch.Tensor:
        """Logits [N, V] at the flat ``positions``; with ``head=False`` the hidden states [N, D] there, for
        the trainer, which applies the tied head inside the loss (``losses.next_visit_loss_from_hidden``)."""
        if self.config.attention == "flex":
            hidden = self.hidden_states(tokens, days, att_days, doc_ids)
            at_seps = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [N, D]
        else:
            # only the N positions' outputs of the last layer are read, so it runs there alone: the same values
            # up to float rounding (docs/model.md, "Model"). The layout first: on a GPU its one sync then
            # waits for the inputs only, not for the queued layers.
            where = QueryLayout(positions, *tokens.shape)
            x, cos, sin, mask = self._layer_inputs(tokens, days, att_days, doc_ids)
            for block in self.blocks[:-1]:
                x = block(x, cos, sin, mask, False)
            at_seps = self.ln_final(self.blocks[-1].at_positions(x, cos, sin, mask, where))  # [N, D]
        if not head:
            return at_seps
        logits = at_seps @ self.embed.weight.T  # tied head: [N, V]
        return logits + self.output_bias if self.output_bias is not None else logits

    def query_logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] at flat ``positions`` (default ``batch.positions``). The batch must be on the
        model's device; call under ``torch.no_grad()`` for inference."""
        positions = batch.positions if positions is None else positions
        return self(batch.tokens, batch.days, batch.att_days, batch.doc_ids, positions)
