"""The masked encoder: pre-LayerNorm transformer blocks with bidirectional attention and rotary day
positions, a masked-token head tied to the embedding, and an optional ``CLS`` head (one logit per output);
``load_run`` reads it back from a run folder.

Shapes: B rows, T tokens, D = d_model, H heads of size d = D / H, V vocabulary, K outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from nextvisit.baselines.masked.config import MaskedModelConfig
from nextvisit.errors import UserError
from nextvisit.model.run import CONFIG_FILE, WEIGHTS_FILE, load_weights
from nextvisit.tokenize.store import PAD

KIND = "masked-transformer"  # ``kind`` in a masked run's config.yaml


def rotary(x: torch.Tensor, days: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate feature pairs of x [B, H, T, d] by angle day * base^(-2i/d)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = days[:, None, :, None].float() * inv_freq  # [B, 1, T, d/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: bidirectional self-attention with rotary day positions, then a GELU MLP."""

    def __init__(self, config: MaskedModelConfig):
        super().__init__()
        self.n_heads, self.rope_base, self.dropout = config.n_heads, config.rope_base, config.dropout
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, config.mlp_ratio * config.d_model), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * config.d_model, config.d_model))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, days, key_mask):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, days, self.rope_base), rotary(k, days, self.rope_base)  # [B, H, T, d]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class MaskedEncoder(nn.Module):
    """``forward(tokens, days, types) -> hidden [B, T, D]``; ``mlm_logits`` for pretraining, ``classify``
    (``CLS`` state -> K logits) once ``add_head(K)`` was called."""

    def __init__(self, config: MaskedModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size <= 0:
            raise ValueError("MaskedModelConfig.vocab_size must be set from the vocabulary")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.type_embed = nn.Embedding(config.max_visit_types, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.head: nn.Linear | None = None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, config.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def add_head(self, n_outputs: int) -> None:
        self.head = nn.Linear(self.config.d_model, n_outputs)
        nn.init.normal_(self.head.weight, 0.0, self.config.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens, days, types) -> torch.Tensor:
        key_mask = tokens != PAD  # [B, T]
        x = self.drop(self.embed(tokens) + self.type_embed(types))  # [B, T, D]
        for block in self.blocks:
            x = block(x, days, key_mask)
        return self.ln_final(x)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V], tied to the token embedding."""
        return hidden @ self.embed.weight.T + self.mlm_bias

    def classify(self, tokens, days, types) -> torch.Tensor:
        """Logits [B, K] from the CLS state."""
        return self.head(self.forward(tokens, days, types)[:, 0])


def load_run(run: Path, device="cpu") -> tuple[MaskedEncoder, dict]:
    """The encoder of a masked run (pretrained, or fine-tuned with its head) and the run's config.yaml."""
    run = Path(run)
    if not (run / CONFIG_FILE).exists() or not (run / WEIGHTS_FILE).exists():
        raise UserError(f"{run}: not a masked-transformer run (config.yaml/model.safetensors missing); "
                        "create one with `nextvisit baseline masked pretrain STORE --out RUN`")
    config = yaml.safe_load((run / CONFIG_FILE).read_text())
    if config.get("kind") != KIND:
        raise UserError(f"{run}/config.yaml: kind is {config.get('kind')!r}, expected 'masked-transformer'; give a run "
                        "written by `nextvisit baseline masked pretrain` (a next-visit run goes to `nextvisit forecast`)")
    model = MaskedEncoder(MaskedModelConfig(**config["model"]))
    if config.get("outputs"):
        model.add_head(len(config["outputs"]))
    load_weights(model, run / WEIGHTS_FILE)
    return model.to(device), config
