"""The next-visit transformer (METHOD §4): decoder-style, pre-LayerNorm, no biases, GELU MLP, rotary
embeddings over day offsets, output head tied to the token embedding.

Shapes: B rows, T tokens, D = d_model, H heads of size d = D / H, N scored SEP positions, V vocabulary.
The head runs only at the N positions (gathered first), so nothing of size B x T x V is ever built.
The attention rule (a attends b iff same document, att_day[a] >= att_day[b] and days[b] <= att_day[a]; nothing
attends a horizon query: ``attention_allowed``) becomes one additive mask
per batch (plain matmuls over blocks of queries and only the keys each block may attend on CPU, SDPA on
GPUs) or one block mask per batch (FlexAttention), shared by all layers. In training the head is
applied inside the loss (``forward(..., head=False)``). The last layer runs at the N positions only.
The head split with the rotary turn and the CPU attention run through hand-written kernels with the same values
(``nextvisit.model.kernels``); ``apply_rotary`` and ``attention_allowed`` here are the plain formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nextvisit.config import ModelConfig
from nextvisit.model import kernels
from nextvisit.model.sequence import RECURRENCE_BUCKETS, Batch


def attention_allowed(att_days: torch.Tensor, doc_ids: torch.Tensor, days: torch.Tensor,
                      is_query: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, T, T]: row a may attend column b iff same non-zero document, att_day[a] >= att_day[b], and
    b's rotary day is at most a's attention day (days[b] <= att_day[a]), and b is no horizon query (``is_query``).
    Padding (doc 0) attends only itself, so its softmax stays defined; nothing else attends padding; every token
    attends itself.

    The rotary-day condition only bites on SEPs, whose rotary day (the next visit's) is after their attention day:
    the tokens of a visit on day d never see the SEP that predicts a visit on day d + 1, so no visit's tokens carry
    the date of the next visit, which a forecast's last visit never has either. A horizon query (attention day: its
    own visit's) therefore sees its visit and what came before it, and nothing of the visits it skips, not even
    through the tokens it attends; no other token attends a query (nextvisit.model.sequence)."""
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] > 0)
    causal_days = (att_days[:, :, None] >= att_days[:, None, :]) & (att_days[:, :, None] >= days.to(att_days.dtype)[:, None, :])
    T = att_days.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=att_days.device)
    allowed = same_doc & causal_days
    if is_query is not None:
        allowed &= ~is_query[:, None, :]
    return allowed | eye


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


class LayerMask(NamedTuple):
    """The attention rule of one batch, shared by every layer: the additive mask [B, 1, T, T] (0 where allowed,
    -inf elsewhere) and, per block of queries, the range of keys that any of them may attend in any row
    (``kernels.key_ranges``; empty unless the matmul kernel runs)."""

    additive: torch.Tensor
    key_ranges: list[tuple[int, int, int, int]]


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
        heads = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads)
        q, k, v = kernels.split_heads(heads, cos, sin, rotated=2)  # rotary on q and k (``apply_rotary``)
        if flex:
            from torch.nn.attention.flex_attention import flex_attention

            y = kernels.compiled(flex_attention)(q, k, v, block_mask=mask)
        else:
            y = self._attend(q, k, v, mask.additive, mask.key_ranges)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def _attend(self, q, k, v, additive, key_ranges=None):
        """softmax(q k^T / sqrt(d) + additive) v through the kernel ``model.attention`` resolves to."""
        dropout_p = self.dropout if self.training else 0.0
        if kernels.attention_kernel(self.config.attention, q.device) == "matmul":
            return kernels.matmul_attention(q, k, v, additive, dropout_p, key_ranges)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout_p)

    def at_positions(self, x, cos, sin, mask, where: "QueryLayout"):
        """The attention output [N, D] at the flat positions of ``where`` only: keys and values for every
        token, queries, scores and the output projection for those N positions (padded per row to W)."""
        B, T, D = x.shape
        H = self.n_heads
        w_q, w_kv = self.qkv.weight[:D], self.qkv.weight[D:]  # the layers have no biases (METHOD §4)
        k, v = kernels.split_heads(F.linear(x, w_kv).view(B, T, 2, H, D // H), cos, sin, rotated=1)  # [B, H, T, d]
        q = F.linear(x.reshape(B * T, D).index_select(0, where.positions), w_q)  # [N, D]
        q, = kernels.split_heads(where.to_padded(q).view(B, where.width, 1, H, D // H), where.rows_of(cos),
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


@dataclass
class KVCache:
    """Per layer, the keys and values [R, C, H, d] of the tokens encoded so far (rotary turn applied; a token's
    heads side by side, so appending one is one row write), and each cached token's rotary day and attention day
    [R, C]; ``length`` [R] tokens of each row are in use."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    days: torch.Tensor  # float32 [R, C]
    att_days: torch.Tensor  # int64 [R, C]
    length: torch.Tensor  # int64 [R]

    @classmethod
    def empty(cls, config: ModelConfig, rows: int, capacity: int, device, dtype) -> "KVCache":
        H, d = config.n_heads, config.d_model // config.n_heads
        shape = (rows, capacity, H, d)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)],
                   torch.zeros(rows, capacity, dtype=torch.float32, device=device),
                   torch.zeros(rows, capacity, dtype=torch.int64, device=device),
                   torch.zeros(rows, dtype=torch.int64, device=device))

    @property
    def capacity(self) -> int:
        return self.days.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def rows(self) -> int:
        return len(self.length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values, self.days, self.att_days])

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of ``rows`` only (finished rows leave the batch)."""
        return KVCache([k.index_select(0, rows) for k in self.keys], [v.index_select(0, rows) for v in self.values],
                       self.days.index_select(0, rows), self.att_days.index_select(0, rows),
                       self.length.index_select(0, rows))

    def replace_rows(self, rows: torch.Tensor, other: "KVCache") -> None:
        """Overwrite ``rows`` with the rows of ``other`` (a re-encoded window)."""
        for mine, theirs in zip([*self.keys, *self.values], [*other.keys, *other.values]):
            mine[rows] = theirs
        self.days[rows], self.att_days[rows], self.length[rows] = other.days, other.att_days, other.length


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
        # added to the input of horizon-query tokens (the SEP token at a later day asking about an interval)
        self.query_embed = nn.Parameter(torch.zeros(config.d_model)) if config.horizon_queries else None
        # added to every token: how many earlier visits held its code (Batch.recurrence; bucket 0 = none, left zero)
        self.recurrence_embed = nn.Embedding(RECURRENCE_BUCKETS, config.d_model, padding_idx=0) \
            if config.recurrence_embedding else None
        # the gap to the next visit, one hazard per day bin, at the last token of a visit (nextvisit.model.visit_time)
        self.visit_time = nn.Linear(config.d_model, len(config.visit_time_edges)) if config.visit_time_head else None
        self.apply(self._init_weights)
        if self.visit_time is not None:
            nn.init.zeros_(self.visit_time.bias)
        if self.query_embed is not None:
            nn.init.normal_(self.query_embed, 0.0, config.init_std)
        if self.recurrence_embed is not None:
            nn.init.zeros_(self.recurrence_embed.weight)  # starts as the model without it
        # residual projections scaled down with depth (GPT-2)
        for name, parameter in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(parameter, 0.0, config.init_std / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_mask(self, att_days: torch.Tensor, doc_ids: torch.Tensor, days: torch.Tensor | None = None,
                       is_query: torch.Tensor | None = None):
        """Built once per batch, shared by every layer (the rule: ``attention_allowed``)."""
        if is_query is not None and not bool(is_query.any()):
            is_query = None
        if self.config.attention == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            rotary_days = days.to(att_days.dtype)
            queries = is_query if is_query is not None else torch.zeros_like(doc_ids, dtype=torch.bool)

            def mask_mod(b, h, q, kv):
                allowed = (doc_ids[b, q] == doc_ids[b, kv]) & (doc_ids[b, q] > 0) & (att_days[b, q] >= att_days[b, kv])
                return (allowed & (att_days[b, q] >= rotary_days[b, kv]) & ~queries[b, kv]) | (q == kv)

            B, T = att_days.shape
            return create_block_mask(mask_mod, B, None, T, T, device=att_days.device)
        # SDPA turns a boolean mask into an additive one inside every call (every layer, forward and
        # backward); converting once per batch, in the dtype the layers compute in, measured ~40% faster
        # attention (docs/model.md).
        device_type = att_days.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
            else self.embed.weight.dtype
        allowed = attention_allowed(att_days, doc_ids, days, is_query)[:, None]  # [B, 1, T, T]
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        uses_ranges = kernels.attention_kernel(self.config.attention, allowed.device) == "matmul"
        return LayerMask(additive, kernels.key_ranges(allowed) if uses_ranges else [])

    def _layer_inputs(self, tokens, days, att_days, doc_ids, is_query=None, recurrence=None):
        """Embeddings [B, T, D] (plus the query embedding at horizon queries and the recurrence embedding), rotary
        tables and the attention mask, shared by every layer."""
        config = self.config
        mask = self.attention_mask(att_days, doc_ids, days, is_query)
        cos, sin = rotary_tables(days, config.d_model // config.n_heads, config.rope_base)
        x = self._embed(tokens, recurrence)
        if is_query is not None and self.query_embed is not None:
            x = x + is_query[..., None].to(x.dtype) * self.query_embed
        return x, cos, sin, mask

    def _embed(self, tokens, recurrence=None):
        x = self.embed(tokens)
        if self.recurrence_embed is not None:
            if recurrence is None or recurrence.shape != tokens.shape:
                raise ValueError("a model with the recurrence embedding needs the tokens' recurrence buckets (build "
                                 "the batch with recurrence=True)")
            x = x + self.recurrence_embed(recurrence)
        return x

    def hidden_states(self, tokens, days, att_days, doc_ids, is_query=None, recurrence=None) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, D]."""
        x, cos, sin, mask = self._layer_inputs(tokens, days, att_days, doc_ids, is_query, recurrence)
        flex = self.config.attention == "flex"
        for block in self.blocks:
            x = block(x, cos, sin, mask, flex)
        return self.ln_final(x)

    def forward(self, tokens, days, att_days, doc_ids, positions, head: bool = True,
                is_query: torch.Tensor | None = None, time_positions: torch.Tensor | None = None,
                recurrence: torch.Tensor | None = None):
        """Logits [N, V] at the flat ``positions``; with ``head=False`` the hidden states [N, D] there, for
        the trainer, which applies the tied head inside the loss (``fused_head.next_visit_loss_from_hidden``).
        ``is_query`` [B, T] flags horizon-query tokens (``attention_allowed``). With ``time_positions`` [M] (the
        last tokens of visits; a model with the visit-time head), returns ``(that, visit-time logits [M, K])``.
        ``recurrence`` [B, T]: the tokens' recurrence buckets (``Batch.recurrence``), read by a model with
        ``recurrence_embedding``."""
        if time_positions is not None:
            if self.visit_time is None:
                raise ValueError("time_positions given to a model without the visit-time head")
            if self.config.visit_time_detach and self.config.attention != "flex":
                # the head trains nothing below it: its positions' last layer runs apart, without a graph (the
                # joint run below cost the demo's pretraining about 1.5x per step)
                where = QueryLayout(positions, *tokens.shape)
                where_time = QueryLayout(time_positions, *tokens.shape)
                x, cos, sin, mask = self._layer_inputs(tokens, days, att_days, doc_ids, is_query, recurrence)
                for block in self.blocks[:-1]:
                    x = block(x, cos, sin, mask, False)
                at_seps = self.ln_final(self.blocks[-1].at_positions(x, cos, sin, mask, where))
                with torch.no_grad():
                    at_visits = self.ln_final(self.blocks[-1].at_positions(x, cos, sin, mask, where_time))
                return (self._head(at_seps) if head else at_seps), self.visit_time(at_visits)
            n = len(positions)
            both = self(tokens, days, att_days, doc_ids, torch.cat([positions, time_positions]), head=False,
                        is_query=is_query, recurrence=recurrence)
            out = both[:n] if not head else self._head(both[:n])
            at_visits = both[n:].detach() if self.config.visit_time_detach else both[n:]
            return out, self.visit_time(at_visits)
        if self.config.attention == "flex":
            hidden = self.hidden_states(tokens, days, att_days, doc_ids, is_query, recurrence)
            at_seps = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [N, D]
        else:
            # only the N positions' outputs of the last layer are read, so it runs there alone: the same values
            # up to float rounding (docs/model.md, "Model"). The layout first: on a GPU its one sync then
            # waits for the inputs only, not for the queued layers.
            where = QueryLayout(positions, *tokens.shape)
            x, cos, sin, mask = self._layer_inputs(tokens, days, att_days, doc_ids, is_query, recurrence)
            for block in self.blocks[:-1]:
                x = block(x, cos, sin, mask, False)
            at_seps = self.ln_final(self.blocks[-1].at_positions(x, cos, sin, mask, where))  # [N, D]
        if not head:
            return at_seps
        return self._head(at_seps)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.embed.weight.T  # tied head: [N, V]
        return logits + self.output_bias if self.output_bias is not None else logits

    # -- incremental encoding (sampling): the keys and values of earlier tokens are kept, not recomputed -----------

    def new_cache(self, rows: int, capacity: int, device, dtype=None) -> "KVCache":
        """An empty cache for ``rows`` rows of at most ``capacity`` tokens each."""
        return KVCache.empty(self.config, rows, capacity, device, dtype or self.embed.weight.dtype)

    def extend(self, cache: "KVCache", tokens: torch.Tensor, days: torch.Tensor, att_days: torch.Tensor,
               counts: torch.Tensor, recurrence: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``counts[r]`` new tokens to each row of ``cache`` (``tokens``, rotary ``days`` and ``att_days``
        [R, k], padded past each row's count) and return their final hidden states [R, k, D] (zeros past each
        row's count). Each new token attends the cached tokens and the new ones by ``attention_allowed`` (one
        document, no horizon queries), so appending a visit, then its SEP, ... gives the hidden states a full
        forward over the whole sequence gives: earlier tokens never attend later ones under that rule when
        attention days do not decrease, which a rolled-forward trajectory guarantees. ``cache`` holds every
        layer's keys and values after the call. ``recurrence`` [R, k]: the new tokens' recurrence buckets (a model
        with ``recurrence_embedding``). The layers run on the new tokens only (no padding); attention
        reads the cache up to the longest row."""
        config = self.config
        R, k = tokens.shape
        H = config.n_heads
        d = config.d_model // H
        device = tokens.device
        counts = counts.to(cache.length.dtype)
        columns_k = torch.arange(k, device=device)
        valid = columns_k[None, :] < counts[:, None]  # [R, k]
        rows, cols = valid.nonzero(as_tuple=True)  # the M new tokens
        slots = cache.length[rows] + cols
        length = cache.length + counts
        if len(slots) and int(slots.max()) >= cache.capacity:
            raise ValueError(f"cache of {cache.capacity} tokens cannot take {k} more after {int(cache.length.max())}")
        cache.days[rows, slots] = days[rows, cols].to(cache.days.dtype)
        cache.att_days[rows, slots] = att_days[rows, cols].to(cache.att_days.dtype)
        L = max(1, int(length.max()))
        key_days, key_att = cache.days[:, :L], cache.att_days[:, :L]
        att = att_days.to(key_att.dtype)
        columns = torch.arange(L, device=device)
        allowed = (columns[None, None, :] < length[:, None, None]) & (att[:, :, None] >= key_att[:, None, :]) \
            & (key_days[:, None, :] <= att.to(key_days.dtype)[:, :, None])
        own = (cache.length[:, None] + columns_k[None, :]).clamp(max=L - 1)
        allowed |= columns[None, None, :] == torch.where(valid, own, torch.zeros_like(own))[:, :, None]  # itself
        additive = torch.zeros(allowed.shape, dtype=cache.dtype, device=device).masked_fill_(~allowed, float("-inf"))
        cos, sin = rotary_tables(days[rows, cols].to(torch.float32)[None], d, config.rope_base)  # [1, 1, M, d]
        x = self._embed(tokens[rows, cols], None if recurrence is None else recurrence[rows, cols])  # [M, D]
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            attn = block.attn
            qkv = attn.qkv(block.ln_attn(x)).view(-1, 3, H, d).permute(1, 2, 0, 3)[:, None]  # [3, 1, H, M, d]
            q = apply_rotary(qkv[0], cos, sin)[0].transpose(0, 1)  # [M, H, d]
            keys[rows, slots] = apply_rotary(qkv[1], cos, sin)[0].transpose(0, 1).to(cache.dtype)
            values[rows, slots] = qkv[2][0].transpose(0, 1).to(cache.dtype)
            padded = torch.zeros(R, k, H, d, dtype=cache.dtype, device=device)
            padded[rows, cols] = q.to(cache.dtype)
            y = F.scaled_dot_product_attention(padded.transpose(1, 2), keys[:, :L].transpose(1, 2),
                                               values[:, :L].transpose(1, 2), attn_mask=additive[:, None])
            x = x + attn.proj(y.transpose(1, 2)[rows, cols].reshape(len(rows), H * d).to(x.dtype))
            x = x + block.fc_out(F.gelu(block.fc(block.ln_mlp(x))))
        cache.length = length
        hidden = self.ln_final(x)
        out = hidden.new_zeros(R, k, hidden.shape[-1])
        out[rows, cols] = hidden
        return out

    def next_visit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next-visit head on hidden states [..., D] (e.g. of SEPs from ``extend``): logits [..., V]."""
        return self._head(hidden)

    def query_logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] at flat ``positions`` (default ``batch.positions``). The batch must be on the
        model's device; call under ``torch.no_grad()`` for inference."""
        positions = batch.positions if positions is None else positions
        return self(batch.tokens, batch.days, batch.att_days, batch.doc_ids, positions, is_query=batch.is_query,
                    recurrence=batch.recurrence)
