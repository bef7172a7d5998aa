"""The masked-transformer baseline (METHOD §6): a BERT-style encoder pretrained with masked-token prediction
on the same token store as the next-visit model, then fully fine-tuned per task with a ``CLS`` head.

Input layout of one subject window (visits ``v_1..v_n``, the most recent that fit the context)::

    CLS  v_1 tokens  SEP  v_2 tokens  SEP ...  v_n tokens  SEP

- **Positions are day offsets** through rotary embeddings (as in the next-visit model): every token of a visit
  and the SEP closing it get the visit's day minus the window's first visit day. The ``CLS`` token gets the
  day of the prediction time (fine-tuning) or of the last visit (pretraining), so it knows how long ago
  each visit was.
- **Token type = visit index** in the window (1, 2, ...; ``CLS`` is 0), a learned embedding, clipped at
  ``max_visit_types - 1``.
- Attention is bidirectional over the window; padding is never attended.

Pretraining masks ``mask_prob`` of the non-special tokens (80% ``MASK``, 10% a random token, 10% unchanged)
and predicts them with a head tied to the token embedding. Fine-tuning puts one logit per (task, horizon) on
the ``CLS`` state (one head per horizon, sharing the encoder), trains every weight with BCE on train-split
labels, and keeps the weights with the best tuning-split AUROC (early stopping). Histories are the label
rows' events cut at the prediction time (``baselines.common``), re-tokenized with the store's fitted
vocabulary (``nextvisit.tokenize.tokenizer.Tokenizer.load(RUN)``).
"""

from __future__ import annotations

import copy
import csv
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model, save_model
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from nextvisit.baselines import common
from nextvisit.config import merge
from nextvisit.errors import UserError
from nextvisit.tokenize.store import CLS, MASK, PAD, SEP, Subject, TokenStore

# files of a token store that make a run re-tokenizable with `Tokenizer.load(RUN)` (docs/interfaces.md §4)
TOKENIZER_FILES = ("vocab.json", "tokenizer.yaml", "lab_stats.parquet")


# -- configuration ----------------------------------------------------------------------------------------------

@dataclass
class MaskedModelConfig:
    vocab_size: int = 0  # filled from the store's vocabulary
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.1
    context: int = 256  # tokens per window, CLS and SEPs included (paper BERT: 512)
    max_visit_types: int = 128  # token types: CLS + visit indices, the last one shared by later visits
    rope_base: float = 10_000.0  # rotary base over day offsets
    init_std: float = 0.02

    def validate(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UserError(f"masked model: d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.context < 8:
            raise UserError(f"masked model: context {self.context} is too small (at least 8 tokens)")


@dataclass
class PretrainConfig:
    batch_size: int = 32
    max_steps: int = 20_000
    max_minutes: float | None = None  # wall-clock budget of the training loop; the CLI flag overrides
    lr: float = 1e-3
    min_lr_fraction: float = 0.1  # cosine from lr to lr * this over the run (steps or minutes, whichever ends first)
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_prob: float = 0.15  # BERT
    mask_token_share: float = 0.8  # of masked positions: MASK token; then random token; the rest unchanged
    random_token_share: float = 0.1
    eval_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = torch's default); 1 is best for tiny models on a busy machine


@dataclass
class FinetuneConfig:
    batch_size: int = 32
    max_epochs: int = 20
    max_minutes: float | None = None  # wall-clock budget of the whole command (tokenize, train, predict)
    min_steps: int = 10  # optimizer steps taken even when the budget is spent before training starts
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 0  # steps between tuning evaluations; 0 = once per epoch
    eval_histories: int = 2000  # tuning histories (a fixed random subset) scored at each evaluation; 0 = all
    patience: int = 3  # evaluations without a better tuning AUROC before stopping
    # Share of training draws given to rows with a positive label (None = sample rows uniformly). Rare
    # outcomes then reach the encoder more often; the head's bias is shifted back afterwards by each
    # output's sampling odds, so probabilities stay calibrated (prior-shift correction: exact for one
    # output, a marginal approximation when horizons share rows).
    positive_share: float | None = None
    predict_batch_size: int = 128
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = torch's default)


PRESETS: dict[str, dict] = {
    # CPU demo: trains something measurable in under a minute on 2 cores. One thread: a model this small
    # gains little from a second one, and on a busy machine two threads spin and cost several times the CPU.
    "tiny": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "context": 128, "dropout": 0.0},
             "pretrain": {"batch_size": 32, "lr": 1e-3, "warmup_steps": 30, "max_minutes": 0.75, "threads": 1},
             "finetune": {"batch_size": 32, "lr": 3e-4, "warmup_steps": 10, "max_minutes": 0.5,
                          "eval_every": 50, "eval_histories": 500, "positive_share": 0.25, "threads": 1}},
    "small": {"model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "context": 512},
              "pretrain": {"batch_size": 64, "lr": 5e-4, "warmup_steps": 500, "max_steps": 50_000, "eval_every": 500},
              "finetune": {"batch_size": 64, "lr": 1e-4}},
    # the paper's BERT baseline: 12 layers x 768, 512-token context
    "paper": {"model": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context": 512},
              "pretrain": {"batch_size": 256, "lr": 1e-4, "warmup_steps": 10_000, "max_steps": 500_000,
                           "eval_every": 2000, "eval_batches": 16},
              "finetune": {"batch_size": 32, "lr": 2e-5, "warmup_steps": 200}},
}


def resolve_config(preset: str, config_path: Path | None = None):
    """(model, pretrain, finetune) configs: the preset, then a YAML with optional sections of the same names."""
    if preset not in PRESETS:
        raise UserError(f"unknown masked preset {preset!r}; expected one of {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESETS[preset])
    if config_path is not None:
        config_path = Path(config_path)
        if not config_path.exists():
            raise UserError(f"{config_path}: no such config file")
        extra = yaml.safe_load(config_path.read_text()) or {}
        unknown = sorted(set(extra) - {"model", "pretrain", "finetune"})
        if unknown:
            raise UserError(f"{config_path}: unknown section(s) {unknown}; expected model, pretrain, finetune")
        for section, fields_ in extra.items():
            values.setdefault(section, {}).update(fields_ or {})
    source = str(config_path or f"preset {preset}")
    return (merge(MaskedModelConfig(), values.get("model"), source),
            merge(PretrainConfig(), values.get("pretrain"), source),
            merge(FinetuneConfig(), values.get("finetune"), source))


# -- the model --------------------------------------------------------------------------------------------------
# Shapes: B rows, T tokens, D = d_model, H heads of size d = D / H, V vocabulary, K outputs.

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


# -- windows ----------------------------------------------------------------------------------------------------

def visit_costs(subject: Subject, context: int) -> np.ndarray:
    """Tokens each visit occupies in a window: its tokens (at most ``visit_cap``) plus its SEP."""
    return np.minimum(np.diff(subject.visit_offsets), visit_cap(context)) + 1


def visit_cap(context: int) -> int:
    """Most tokens kept of one visit (its first ones: age, demographics, then codes), so that any visit fits."""
    return max(1, (context - 1) // 2 - 1)


def recent_start(costs: np.ndarray, budget: int) -> int:
    """First visit of the longest suffix of visits fitting ``budget`` tokens (at least the last visit).

    >>> recent_start(np.array([4, 4, 4]), budget=9)
    1
    """
    if len(costs) == 0:
        return 0
    suffix = np.cumsum(costs[::-1])[::-1]
    fits = np.flatnonzero(suffix <= budget)
    return int(fits[0]) if len(fits) else len(costs) - 1


def random_window(costs: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random run of whole visits that fills up to ``budget`` tokens: from a random first visit forward,
    then backward while room is left."""
    n = len(costs)
    start = int(rng.integers(0, n))
    forward = np.cumsum(costs[start:])
    stop = start + max(1, int(np.searchsorted(forward, budget, side="right")))
    room = budget - int(costs[start:stop].sum())
    backward = np.cumsum(costs[:start][::-1])
    start -= int(np.searchsorted(backward, room, side="right"))
    return start, stop


def window_arrays(subject: Subject, start: int, stop: int, config: MaskedModelConfig, cls_day: int | None = None):
    """``tokens, days, types`` (int64 [L]) of ``CLS, v_start, SEP, ..., v_stop-1, SEP``. Days are relative to
    visit ``start``; ``cls_day`` is an absolute day (default: the last visit's)."""
    if stop <= start:  # no visits in the history: the CLS token alone
        return np.array([CLS]), np.zeros(1, np.int64), np.zeros(1, np.int64)
    offsets = subject.visit_offsets
    lengths = np.minimum(np.diff(offsets[start : stop + 1]), visit_cap(config.context))
    n, total = stop - start, int(lengths.sum())
    visit_of_token = np.repeat(np.arange(n), lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    source = offsets[start:stop][visit_of_token] + within  # index into subject.tokens
    token_pos = 1 + np.arange(total) + visit_of_token  # each earlier visit adds its SEP
    sep_pos = 1 + np.cumsum(lengths) + np.arange(n)
    first_day = int(subject.visit_days[start])
    visit_day = subject.visit_days[start:stop].astype(np.int64) - first_day
    visit_type = np.minimum(np.arange(1, n + 1), config.max_visit_types - 1)
    size = 1 + total + n
    tokens, days, types = np.full(size, CLS, np.int64), np.zeros(size, np.int64), np.zeros(size, np.int64)
    tokens[token_pos] = subject.tokens[source]
    tokens[sep_pos] = SEP
    days[token_pos], days[sep_pos] = visit_day[visit_of_token], visit_day
    types[token_pos], types[sep_pos] = visit_type[visit_of_token], visit_type
    days[0] = (int(subject.visit_days[stop - 1]) if cls_day is None else int(cls_day)) - first_day
    return tokens, days, types


def collate(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``tokens, days, types`` tensors [B, T]."""
    width = max(len(w[0]) for w in windows)
    out = np.zeros((3, len(windows), width), np.int64)
    out[0].fill(PAD)
    for b, arrays in enumerate(windows):
        for a in range(3):
            out[a, b, : len(arrays[a])] = arrays[a]
    return tuple(torch.from_numpy(x) for x in out)


# -- masked-token pretraining -------------------------------------------------------------------------------------

class MaskingBatches:
    """Random windows of one split with BERT masking; ``batch(rng)`` -> (tokens, days, types, targets), with
    target -100 where nothing is predicted."""

    def __init__(self, store: TokenStore, split: str, model_config: MaskedModelConfig, train_config: PretrainConfig):
        self.split = store.split(split)
        self.model_config, self.train_config = model_config, train_config
        kinds = np.array(store.vocab.kinds)
        self.maskable = kinds != "special"  # [V]
        self.replacement_ids = np.flatnonzero(self.maskable)
        self.subjects = np.flatnonzero(np.diff(np.asarray(self.split.subject_visits)) > 0)
        if len(self.subjects) == 0:
            raise UserError(f"{store.path}: split {split!r} holds no subject with a visit; nothing to pretrain on")

    def batch(self, rng: np.random.Generator):
        config, train = self.model_config, self.train_config
        windows = []
        for i in rng.choice(self.subjects, size=train.batch_size):
            subject = self.split.subject(int(i))
            start, stop = random_window(visit_costs(subject, config.context), config.context - 1, rng)
            windows.append(window_arrays(subject, start, stop, config))
        tokens, days, types = collate(windows)
        candidates = torch.from_numpy(self.maskable)[tokens]  # [B, T]
        chosen = candidates & (torch.from_numpy(rng.random(tokens.shape)) < train.mask_prob)
        # every row with a maskable token predicts at least one
        first = candidates.float().argmax(dim=1)
        chosen[torch.arange(len(tokens)), first] |= candidates[torch.arange(len(tokens)), first]
        targets = torch.where(chosen, tokens, torch.full_like(tokens, -100))
        action = torch.from_numpy(rng.random(tokens.shape))
        to_mask = chosen & (action < train.mask_token_share)
        to_random = chosen & (action >= train.mask_token_share) & (action < train.mask_token_share + train.random_token_share)
        random_ids = torch.from_numpy(rng.choice(self.replacement_ids, size=tokens.shape))
        tokens = torch.where(to_mask, torch.full_like(tokens, MASK), torch.where(to_random, random_ids, tokens))
        return tokens, days, types, targets


def _schedule(step: int, progress: float, lr: float, warmup: int, min_fraction: float) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``lr * min_fraction`` as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def pretrain(store_path: Path, out: Path, preset: str = "tiny", config_path: Path | None = None,
             max_minutes: float | None = None, device: str | None = None, overwrite: bool = False) -> Path:
    """Masked-token pretraining on the store's train split (validation loss on tuning). Writes ``out/``:
    ``config.yaml``, ``model.safetensors``, ``metrics.csv``, and the store's tokenizer files."""
    store = TokenStore(store_path)
    model_config, train_config, finetune_config = resolve_config(preset, config_path)
    if max_minutes is not None:
        train_config.max_minutes = max_minutes
    model_config.vocab_size = len(store.vocab)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    out = common.prepare_out(out, overwrite)
    for name in TOKENIZER_FILES:
        if (Path(store_path) / name).exists():
            shutil.copy2(Path(store_path) / name, out / name)
    torch.manual_seed(train_config.seed)
    rng = np.random.default_rng(train_config.seed)
    dev = _device(device)
    model = MaskedEncoder(model_config).to(dev)
    optimizer = _optimizer(model, train_config.lr, train_config.weight_decay)
    train_batches = MaskingBatches(store, "train", model_config, train_config)
    try:
        tuning_batches = MaskingBatches(store, "tuning", model_config, train_config)
    except UserError:
        tuning_batches = None
    eval_rng_seed = train_config.seed + 1  # the same tuning batches at every evaluation

    def evaluate() -> float:
        if tuning_batches is None:
            return math.nan
        model.eval()
        eval_rng, losses = np.random.default_rng(eval_rng_seed), []
        with torch.no_grad():
            for _ in range(train_config.eval_batches):
                tokens, days, types, targets = (t.to(dev) for t in tuning_batches.batch(eval_rng))
                hidden = model(tokens, days, types)
                chosen = targets != -100
                losses.append(F.cross_entropy(model.mlm_logits(hidden[chosen]), targets[chosen]).item())
        model.train()
        return float(np.mean(losses))

    budget_s = None if train_config.max_minutes is None else 60 * train_config.max_minutes
    started = time.monotonic()
    step, last_loss = 0, math.nan

    def log_row() -> dict:
        return {"step": step, "seconds": round(time.monotonic() - started, 1), "train_loss": round(last_loss, 4),
                "tuning_loss": round(evaluate(), 4)}

    rows = [log_row()]  # before any update
    model.train()
    progress_bar = tqdm(total=train_config.max_steps, desc="masked pretrain", unit="step", mininterval=2)
    while step < train_config.max_steps:
        elapsed = time.monotonic() - started
        if budget_s is not None and elapsed >= budget_s:
            break
        progress = max(step / train_config.max_steps, elapsed / budget_s if budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, progress, train_config.lr, train_config.warmup_steps, train_config.min_lr_fraction)
        tokens, days, types, targets = (t.to(dev) for t in train_batches.batch(rng))
        hidden = model(tokens, days, types)  # [B, T, D]
        chosen = targets != -100
        loss = F.cross_entropy(model.mlm_logits(hidden[chosen]), targets[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        step, last_loss = step + 1, loss.item()
        progress_bar.update(1)
        if step % train_config.eval_every == 0:
            rows.append(log_row())
            progress_bar.set_postfix(loss=f"{last_loss:.3f}", tuning=rows[-1]["tuning_loss"])
    progress_bar.close()
    if rows[-1]["step"] != step:
        rows.append(log_row())
    save_model(model, str(out / "model.safetensors"))
    _write_metrics(out / "metrics.csv", rows)
    (out / "config.yaml").write_text(yaml.safe_dump({
        "kind": "masked-transformer", "preset": preset, "model": asdict(model_config), "pretrain": asdict(train_config),
        "finetune": asdict(finetune_config), "store": str(Path(store_path).resolve()), "steps": step,
        "seconds": round(time.monotonic() - started, 1)}, sort_keys=False))
    sys.stderr.write(f"masked pretraining: {step} steps in {rows[-1]['seconds']} s, tuning MLM loss "
                     f"{rows[0]['tuning_loss']} -> {rows[-1]['tuning_loss']}; run written to {out}\n")
    return out


def _write_metrics(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_run(run: Path, device="cpu") -> tuple[MaskedEncoder, dict]:
    """The encoder of a masked run (pretrained, or fine-tuned with its head) and the run's config.yaml."""
    run = Path(run)
    if not (run / "config.yaml").exists() or not (run / "model.safetensors").exists():
        raise UserError(f"{run}: not a masked-transformer run (config.yaml/model.safetensors missing); "
                        "create one with `nextvisit baseline masked pretrain STORE --out RUN`")
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config.get("kind") != "masked-transformer":
        raise UserError(f"{run}/config.yaml: kind is {config.get('kind')!r}, expected 'masked-transformer'; give a run "
                        "written by `nextvisit baseline masked pretrain` (a next-visit run goes to `nextvisit forecast`)")
    model = MaskedEncoder(MaskedModelConfig(**config["model"]))
    if config.get("outputs"):
        model.add_head(len(config["outputs"]))
    load_model(model, str(run / "model.safetensors"), device=str(device))
    return model.to(device), config


# -- fine-tuning ------------------------------------------------------------------------------------------------

@dataclass
class Histories:
    """Tokenized histories of the label rows and their per-output targets."""

    frame: pl.DataFrame  # history_id, subject_id, prediction_time, split
    subjects: list[Subject | None]  # by history_id; None = no event before the prediction time
    outputs: list[str]  # "task@horizon"
    targets: np.ndarray  # float32 [n_histories, K]
    labelled: np.ndarray  # bool [n_histories, K]
    counts: dict = field(default_factory=dict)


def tokenize_histories(run: Path, meds_dir: Path, labelled: pl.DataFrame, removed, vocab_size: int) -> Histories:
    """Cut every label row's events at its prediction time, drop removed input codes, and tokenize with the
    run's fitted vocabulary (one surrogate subject per history)."""
    from nextvisit.tokenize.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(run)
    if len(tokenizer.vocab) != vocab_size:
        raise UserError(f"{run}/vocab.json holds {len(tokenizer.vocab)} tokens but the model embeds {vocab_size}; "
                        "the run folder is inconsistent, re-run `nextvisit baseline masked pretrain`")
    history = common.histories(labelled)
    events, counts = common.history_events(meds_dir, history, removed)
    surrogate = events.select(pl.col("history_id").alias("subject_id"), "time", "code", "numeric_value")
    subjects: list[Subject | None] = [None] * history.height
    for subject in tokenizer.subjects(surrogate):
        subjects[int(subject.subject_id)] = subject
    counts["histories_without_visits"] = sum(s is None or s.n_visits == 0 for s in subjects)
    outputs = sorted({f"{t}@{h}" for t, h in labelled.select("task", "horizon_days").unique().iter_rows()},
                     key=lambda key: (key.split("@")[0], int(key.split("@")[1])))
    keyed = labelled.join(history, on=["subject_id", "prediction_time"]).with_columns(
        pl.concat_str("task", pl.lit("@"), pl.col("horizon_days").cast(pl.String)).alias("output"))
    column = {key: k for k, key in enumerate(outputs)}
    targets = np.zeros((history.height, len(outputs)), np.float32)
    mask = np.zeros((history.height, len(outputs)), bool)
    h = keyed["history_id"].to_numpy()
    k = np.array([column[o] for o in keyed["output"].to_list()], dtype=np.int64)
    targets[h, k] = keyed["boolean_value"].to_numpy().astype(np.float32)
    mask[h, k] = True
    splits = keyed.group_by("history_id").agg(pl.col("split").first())
    frame = history.join(splits, on="history_id").sort("history_id")
    return Histories(frame=frame, subjects=subjects, outputs=outputs, targets=targets, labelled=mask, counts=counts)


def history_window(subject: Subject | None, prediction_day: int, config: MaskedModelConfig):
    """The most recent visits before the prediction time that fit the context; CLS at the prediction day."""
    if subject is None or subject.n_visits == 0:
        return window_arrays(Subject(0, 0, np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32)), 0, 0, config)
    start = recent_start(visit_costs(subject, config.context), config.context - 1)
    return window_arrays(subject, start, subject.n_visits, config, cls_day=prediction_day)


def _windows(histories: Histories, config: MaskedModelConfig) -> list:
    days = histories.frame["prediction_time"].dt.epoch("d").to_numpy()
    return [history_window(s, int(d), config) for s, d in zip(histories.subjects, days)]


def predict_probabilities(model: MaskedEncoder, windows: list, batch_size: int, device) -> np.ndarray:
    """Sigmoid of the CLS head, [n, K]. Windows are batched by length (less padding), results in input order."""
    model.eval()
    order = np.argsort([len(w[0]) for w in windows], kind="stable")
    out = np.zeros((len(windows), model.head.out_features), np.float32)
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chosen = order[i : i + batch_size]
            tokens, days, types = (t.to(device) for t in collate([windows[j] for j in chosen]))
            out[chosen] = torch.sigmoid(model.classify(tokens, days, types)).float().cpu().numpy()
    return out


def positive_sampling(targets: np.ndarray, labelled: np.ndarray, positive_share: float | None):
    """Draw probabilities over train rows that give rows with any positive label ``positive_share`` of the
    draws, and per output the log odds by which this sampling inflates positives relative to negatives
    (subtract from the logits to undo it). ``(None, zeros)`` when no oversampling is asked or needed."""
    no_shift = np.zeros(targets.shape[1], np.float32)
    if not positive_share:
        return None, no_shift
    positive_row = (targets * labelled).any(axis=1)
    n_positive, n_negative = int(positive_row.sum()), int((~positive_row).sum())
    if n_positive == 0 or n_negative == 0:
        return None, no_shift
    weight = positive_share * n_negative / ((1 - positive_share) * n_positive)
    if weight <= 1:
        return None, no_shift
    row_weight = np.where(positive_row, weight, 1.0)
    odds = np.zeros(targets.shape[1], np.float32)
    for k in range(targets.shape[1]):
        pos, neg = labelled[:, k] & (targets[:, k] == 1), labelled[:, k] & (targets[:, k] == 0)
        if pos.any() and neg.any():
            odds[k] = np.log(row_weight[pos].mean() / row_weight[neg].mean())
    return row_weight / row_weight.sum(), odds


def tuning_auroc(probabilities: np.ndarray, targets: np.ndarray, labelled: np.ndarray) -> float:
    """Mean AUROC over outputs whose tuning rows hold both classes (NaN when none does)."""
    values = []
    for k in range(targets.shape[1]):
        y = targets[labelled[:, k], k]
        if len(np.unique(y)) == 2:
            values.append(roc_auc_score(y, probabilities[labelled[:, k], k]))
    return float(np.mean(values)) if values else math.nan


def finetune(run: Path, meds_dir: Path, labels_dir: Path, out: Path, max_minutes: float | None = None,
             device: str | None = None, config_path: Path | None = None, overwrite: bool = False) -> Path:
    """Fine-tune a pretrained masked run on train-split labels (early stopping on tuning AUROC) and write
    predictions for the tuning and held_out rows into ``out`` (a predictions folder and a run)."""
    started = time.monotonic()
    run = Path(run)
    dev = _device(device)
    model, run_config = load_run(run, dev)
    finetune_config = merge(FinetuneConfig(), run_config.get("finetune"), f"{run}/config.yaml")
    if config_path is not None:  # a YAML of FinetuneConfig fields, flat or under a `finetune:` section
        from nextvisit.config import read_yaml

        extra = read_yaml(config_path)
        finetune_config = merge(finetune_config, extra.get("finetune", extra), str(config_path))
    if max_minutes is not None:
        finetune_config.max_minutes = max_minutes
    if finetune_config.threads:
        torch.set_num_threads(finetune_config.threads)
    model_config = model.config
    labelled, label_counts = common.load_labels(labels_dir)
    removed = common.removed_input_codes(labels_dir)
    out = common.prepare_out(out, overwrite)
    histories = tokenize_histories(run, meds_dir, labelled, removed, model.config.vocab_size)
    tokenize_seconds = time.monotonic() - started
    windows = _windows(histories, model_config)
    split = histories.frame["split"].to_numpy()
    train_ids, tuning_ids = np.flatnonzero(split == "train"), np.flatnonzero(split == "tuning")
    train_ids = train_ids[histories.labelled[train_ids].any(axis=1)]

    torch.manual_seed(finetune_config.seed)
    rng = np.random.default_rng(finetune_config.seed)
    model.add_head(len(histories.outputs))
    with torch.no_grad():  # start every output at its train prevalence, so early steps learn ranking, not the base rate
        labelled_train = histories.labelled[train_ids]
        prevalence = (histories.targets[train_ids] * labelled_train).sum(0) / np.maximum(labelled_train.sum(0), 1)
        model.head.bias.copy_(torch.logit(torch.from_numpy(prevalence).clamp(1e-4, 1 - 1e-4)))
    model.to(dev)
    optimizer = _optimizer(model, finetune_config.lr, finetune_config.weight_decay)
    if finetune_config.eval_histories and len(tuning_ids) > finetune_config.eval_histories:
        tuning_ids = np.sort(rng.choice(tuning_ids, finetune_config.eval_histories, replace=False))
    tuning_windows = [windows[i] for i in tuning_ids]
    score_ids = np.flatnonzero(np.isin(split, common.PREDICTION_SPLITS))
    tuning_targets, tuning_mask = histories.targets[tuning_ids], histories.labelled[tuning_ids]
    draw_weights, log_sampling_odds = positive_sampling(histories.targets[train_ids], histories.labelled[train_ids],
                                                        finetune_config.positive_share)

    timer = {"predict": 0.0}

    def evaluate(step: int, train_loss: float) -> dict:
        predict_started = time.monotonic()
        probabilities = predict_probabilities(model, tuning_windows, finetune_config.predict_batch_size, dev)
        timer["predict"] = time.monotonic() - predict_started
        model.train()
        logits = torch.logit(torch.from_numpy(probabilities).clamp(1e-6, 1 - 1e-6)) - torch.from_numpy(log_sampling_odds)
        loss = F.binary_cross_entropy_with_logits(logits[torch.from_numpy(tuning_mask)],
                                                  torch.from_numpy(tuning_targets)[torch.from_numpy(tuning_mask)]).item()
        return {"step": step, "seconds": round(time.monotonic() - started, 1), "train_loss": round(train_loss, 4),
                "tuning_loss": round(loss, 4), "tuning_auroc": round(tuning_auroc(probabilities, tuning_targets, tuning_mask), 4)}

    if len(tuning_ids) == 0:
        sys.stderr.write(f"warning: {labels_dir} has no labelled tuning rows; no early stopping, the last weights are kept\n")

    def better(row: dict, best: dict) -> bool:
        if len(tuning_ids) == 0:
            return True
        if not math.isnan(row["tuning_auroc"]) and not math.isnan(best["tuning_auroc"]):
            return row["tuning_auroc"] > best["tuning_auroc"]
        return row["tuning_loss"] < best["tuning_loss"]

    steps_per_epoch = max(1, math.ceil(len(train_ids) / finetune_config.batch_size))
    eval_every = finetune_config.eval_every or steps_per_epoch
    total_steps = finetune_config.max_epochs * steps_per_epoch
    budget_s = None if finetune_config.max_minutes is None else 60 * finetune_config.max_minutes
    loop_started = time.monotonic()
    rows = [evaluate(0, math.nan)]  # the untuned head on the pretrained encoder
    # The budget covers one more evaluation at the end and the final predictions: reserve their time,
    # estimated from the throughput of this evaluation's forward passes; the learning-rate schedule runs
    # over what is left.
    eval_seconds = time.monotonic() - loop_started
    seconds_per_history = timer["predict"] / max(1, len(tuning_ids))
    reserve = eval_seconds + seconds_per_history * len(score_ids)
    train_started = time.monotonic()
    train_budget_s = None if budget_s is None else max(1e-9, budget_s - (train_started - started) - reserve)
    best, best_state, stale, step, stop_reason = rows[0], copy.deepcopy(model.state_dict()), 0, 0, "max_epochs"
    model.train()
    progress_bar = tqdm(total=total_steps, desc="masked fine-tune", unit="step", mininterval=2)
    for _epoch in range(finetune_config.max_epochs):
        if draw_weights is None:
            order = rng.permutation(train_ids)
        else:
            order = rng.choice(train_ids, size=len(train_ids), p=draw_weights)
        for i in range(0, len(order), finetune_config.batch_size):
            elapsed = time.monotonic() - train_started
            if train_budget_s is not None and elapsed >= train_budget_s and step >= finetune_config.min_steps:
                stop_reason = "max_minutes"
                break
            ids = order[i : i + finetune_config.batch_size]
            tokens, days, types = (t.to(dev) for t in collate([windows[j] for j in ids]))
            target = torch.from_numpy(histories.targets[ids]).to(dev)
            mask = torch.from_numpy(histories.labelled[ids]).to(dev)
            for group in optimizer.param_groups:
                progress = max(step / total_steps, elapsed / train_budget_s if train_budget_s else 0.0)
                group["lr"] = _schedule(step, progress, finetune_config.lr, finetune_config.warmup_steps, 0.1)
            logits = model.classify(tokens, days, types)
            loss = F.binary_cross_entropy_with_logits(logits[mask], target[mask])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), finetune_config.grad_clip)
            optimizer.step()
            step += 1
            progress_bar.update(1)
            if step % eval_every == 0:
                rows.append(evaluate(step, loss.item()))
                progress_bar.set_postfix(tuning_auroc=rows[-1]["tuning_auroc"])
                if better(rows[-1], best):
                    best, best_state, stale = rows[-1], copy.deepcopy(model.state_dict()), 0
                else:
                    stale += 1
                    if stale >= finetune_config.patience:
                        stop_reason = "early_stopping"
                        break
        else:
            continue
        break
    progress_bar.close()
    if step % eval_every and stop_reason != "early_stopping":
        rows.append(evaluate(step, loss.item()))
        if better(rows[-1], best):
            best, best_state = rows[-1], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    with torch.no_grad():  # undo the sampling odds of positives (no-op without positive_share)
        model.head.bias -= torch.from_numpy(log_sampling_odds).to(model.head.bias.device)
    train_seconds = time.monotonic() - loop_started
    predict_started = time.monotonic()

    probabilities = predict_probabilities(model, [windows[i] for i in score_ids], finetune_config.predict_batch_size, dev)
    predict_seconds = time.monotonic() - predict_started
    per_history = pl.DataFrame({"history_id": score_ids.astype(np.int64)}).with_columns(
        *[pl.Series(key, probabilities[:, k].astype(np.float64)) for k, key in enumerate(histories.outputs)])
    rows_out = (
        labelled.join(histories.frame.select("history_id", "subject_id", "prediction_time"), on=["subject_id", "prediction_time"])
        .filter(pl.col("split").is_in(common.PREDICTION_SPLITS))
        .join(per_history.unpivot(index="history_id", variable_name="output", value_name=common.PROBABILITY),
              left_on=["history_id", pl.concat_str("task", pl.lit("@"), pl.col("horizon_days").cast(pl.String))],
              right_on=["history_id", "output"], how="left")
    )
    for name in TOKENIZER_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, out / name)
    save_model(model, str(out / "model.safetensors"))
    _write_metrics(out / "metrics.csv", rows)
    resolved = {**run_config, "finetune": asdict(finetune_config), "outputs": histories.outputs,
                "pretrained_run": str(run.resolve())}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    seconds = time.monotonic() - started
    summary = {"steps": step, "stop_reason": stop_reason, "best_step": best["step"], "untuned_tuning_auroc": rows[0]["tuning_auroc"],
               "best_tuning_auroc": best["tuning_auroc"], "train_histories": int(len(train_ids)),
               "seconds": {"tokenize": round(tokenize_seconds, 1), "train": round(train_seconds, 1),
                           "first_evaluation": round(eval_seconds, 1), "reserved_for_predictions": round(reserve, 1),
                           "predict": round(predict_seconds, 1), "total": round(seconds, 1)}}
    path = common.write_predictions(
        out, rows_out, model=f"masked-{run_config.get('preset', 'custom')}", kind="fine-tuned",
        config={"model": asdict(model_config), "finetune": asdict(finetune_config), "pretrained_run": str(run.resolve())},
        label_counts=label_counts,
        extra_info={"inputs": histories.counts, "removed_from_inputs": common.code_set_json(removed), "fit": summary})
    sys.stderr.write(f"masked fine-tuning: {summary}; wrote {rows_out.height} predictions to {path}\n")
    return out


def predict(run: Path, meds_dir: Path, labels_dir: Path, device="cpu") -> pl.DataFrame:
    """Scores of a fine-tuned run for the tuning and held_out label rows of ``labels_dir`` (histories cut and
    tokenized exactly as in fine-tuning): the label columns plus the probability."""
    model, run_config = load_run(run, device)
    outputs = run_config.get("outputs")
    if not outputs:
        raise UserError(f"{run}: a pretrained run has no task head; fine-tune it first (`nextvisit baseline masked finetune`)")
    labelled, _ = common.load_labels(labels_dir)
    histories = tokenize_histories(run, meds_dir, labelled, common.removed_input_codes(labels_dir),
                                   model.config.vocab_size)
    missing = sorted(set(histories.outputs) - set(outputs))
    if missing:
        raise UserError(f"{labels_dir}: task/horizon {missing} has no head in {run}; fine-tune on these labels")
    probabilities = predict_probabilities(model, _windows(histories, model.config), 128, device)
    column = {key: k for k, key in enumerate(outputs)}
    keyed = labelled.join(histories.frame.select("history_id", "subject_id", "prediction_time"), on=["subject_id", "prediction_time"])
    k = np.array([column[f"{t}@{h}"] for t, h in keyed.select("task", "horizon_days").iter_rows()], dtype=np.int64)
    return keyed.with_columns(pl.Series(common.PROBABILITY, probabilities[keyed["history_id"].to_numpy(), k].astype(np.float64))) \
        .filter(pl.col("split").is_in(common.PREDICTION_SPLITS)).drop("history_id")


def pretrain_cli(args) -> int:
    pretrain(args.store, args.out, preset=args.preset, config_path=getattr(args, "config", None),
             max_minutes=args.max_minutes, device=args.device, overwrite=getattr(args, "overwrite", False))
    return 0


def finetune_cli(args) -> int:
    finetune(args.run, args.meds_dir, args.labels, args.out, max_minutes=args.max_minutes, device=args.device,
             config_path=getattr(args, "config", None), overwrite=getattr(args, "overwrite", False))
    return 0
