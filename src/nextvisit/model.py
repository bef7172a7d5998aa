"""The next-visit transformer (METHOD §4): decoder-style, pre-LayerNorm, no biases, GELU MLP, rotary
embeddings over day offsets, output head tied to the token embedding.

Shapes: B rows, T tokens, D = d_model, H heads of size d = D / H, N scored SEP positions, V vocabulary.
The head runs only at the N positions (gathered first), so nothing of size B x T x V is ever built.
The attention rule (a attends b iff same document and att_day[a] >= att_day[b]) becomes one additive mask
per batch (SDPA, or plain matmuls for bfloat16 on CPU) or one block mask per batch (FlexAttention), shared by
all layers. In training the head is applied inside the loss (``forward(..., head=False)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nextvisit.config import ModelConfig
from nextvisit.sequence import Batch


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


def matmul_attention(q, k, v, mask, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as three plain batched matmuls and a softmax. On CPU in bfloat16 this
    is about 2x faster than the fused SDPA kernel at T = 256 (forward + backward; docs/model.md), because the
    [T, T] scores of one head fit in cache and the matmuls run as bfloat16 GEMMs."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    probabilities = torch.softmax(scores + mask, dim=-1)
    if dropout_p:
        probabilities = F.dropout(probabilities, dropout_p)
    return probabilities @ v


def attention_kernel(kind: str, dtype: torch.dtype, device: torch.device) -> str:
    """The attention implementation a layer uses: ``auto`` resolves by device and compute dtype."""
    if kind != "auto":
        return kind
    return "matmul" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"


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
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # [3, B, H, T, d]
        q, k = apply_rotary(qkv[:2], cos, sin)  # queries and keys rotated together
        v = qkv[2]
        dropout_p = self.dropout if self.training else 0.0
        if flex:
            from torch.nn.attention.flex_attention import flex_attention

            y = _compiled(flex_attention)(q, k, v, block_mask=mask)
        elif attention_kernel(self.config.attention, q.dtype, q.device) == "matmul":
            y = matmul_attention(q, k, v, mask, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


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
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def hidden_states(self, tokens, days, att_days, doc_ids) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, D]."""
        config = self.config
        mask = self.attention_mask(att_days, doc_ids)
        cos, sin = rotary_tables(days, config.d_model // config.n_heads, config.rope_base)
        x = self.embed(tokens)  # [B, T, D]
        flex = config.attention == "flex"
        for block in self.blocks:
            x = block(x, cos, sin, mask, flex)
        return self.ln_final(x)

    def forward(self, tokens, days, att_days, doc_ids, positions, head: bool = True) -> torch.Tensor:
        """Logits [N, V] at the flat ``positions``; with ``head=False`` the hidden states [N, D] there, for
        the trainer, which applies the tied head inside the loss (``losses.next_visit_loss_from_hidden``)."""
        hidden = self.hidden_states(tokens, days, att_days, doc_ids)
        at_seps = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [N, D]
        if not head:
            return at_seps
        logits = at_seps @ self.embed.weight.T  # tied head: [N, V]
        return logits + self.output_bias if self.output_bias is not None else logits

    def query_logits(self, batch: Batch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] at flat ``positions`` (default ``batch.positions``). The batch must be on the
        model's device; call under ``torch.no_grad()`` for inference."""
        positions = batch.positions if positions is None else positions
        return self(batch.tokens, batch.days, batch.att_days, batch.doc_ids, positions)
