"""Masked-token pretraining (``nextvisit baseline masked pretrain``): random windows of the store's train
split with BERT masking; the masked-token loss on fixed tuning batches is logged. The run folder is written
atomically (``nextvisit.artifacts.folders.atomic_folder``)."""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from nextvisit.artifacts.folders import atomic_folder
from nextvisit.baselines.masked.config import BETAS, MaskedModelConfig, PretrainConfig, resolve_config
from nextvisit.baselines.masked.model import KIND, MaskedEncoder
from nextvisit.baselines.masked.windows import collate, random_window, visit_budget, visit_costs, window_arrays
from nextvisit.errors import UserError
from nextvisit.model.optim import make_optimizer, warmup_cosine
from nextvisit.model.run import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    copy_tokenizer_files,
    resolve_device,
    save_weights,
)
from nextvisit.tokenize.store import MASK, TokenStore


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
            start, stop = random_window(visit_costs(subject, config.context), visit_budget(config.context), rng)
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


def mlm_loss(model: MaskedEncoder, batch, device) -> torch.Tensor:
    """Cross-entropy of the masked-token head at the positions with a target."""
    tokens, days, types, targets = (t.to(device) for t in batch)
    hidden = model(tokens, days, types)  # [B, T, D]
    chosen = targets != -100
    return F.cross_entropy(model.mlm_logits(hidden[chosen]), targets[chosen])


def tuning_loss(model: MaskedEncoder, batches: MaskingBatches | None, config: PretrainConfig, device) -> float:
    """Mean masked-token loss over ``eval_batches`` tuning batches, the same ones at every call (NaN
    without a tuning split)."""
    if batches is None:
        return math.nan
    model.eval()
    eval_rng, losses = np.random.default_rng(config.seed + 1), []
    with torch.no_grad():
        for _ in range(config.eval_batches):
            losses.append(mlm_loss(model, batches.batch(eval_rng), device).item())
    model.train()
    return float(np.mean(losses))


def train(store: TokenStore, model_config: MaskedModelConfig, config: PretrainConfig, device) -> tuple[MaskedEncoder, list[dict]]:
    """The pretraining loop: steps until ``max_steps`` or the time budget; the metrics rows (step 0 is
    before any update)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = MaskedEncoder(model_config).to(device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, BETAS)
    train_batches = MaskingBatches(store, "train", model_config, config)
    try:
        tuning_batches = MaskingBatches(store, "tuning", model_config, config)
    except UserError:
        tuning_batches = None
    budget_s = None if config.max_minutes is None else 60 * config.max_minutes
    started = time.monotonic()
    step, last_loss = 0, math.nan

    def log_row() -> dict:
        return {"step": step, "seconds": round(time.monotonic() - started, 1), "train_loss": round(last_loss, 4),
                "tuning_loss": round(tuning_loss(model, tuning_batches, config, device), 4)}

    rows = [log_row()]
    model.train()
    progress_bar = tqdm(total=config.max_steps, desc="masked pretrain", unit="step", mininterval=2)
    while step < config.max_steps:
        elapsed = time.monotonic() - started
        if budget_s is not None and elapsed >= budget_s:
            break
        progress = max(step / config.max_steps, elapsed / budget_s if budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, progress, config.lr, config.lr * config.min_lr_fraction, config.warmup_steps)
        loss = mlm_loss(model, train_batches.batch(rng), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step, last_loss = step + 1, loss.item()
        progress_bar.update(1)
        if step % config.eval_every == 0:
            rows.append(log_row())
            progress_bar.set_postfix(loss=f"{last_loss:.3f}", tuning=rows[-1]["tuning_loss"])
    progress_bar.close()
    if rows[-1]["step"] != step:
        rows.append(log_row())
    return model, rows


def write_metrics(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pretrain(store_path: Path, out: Path, preset: str = "tiny", config_path: Path | None = None,
             max_minutes: float | None = None, device: str | None = None, overwrite: bool = False,
             max_steps: int | None = None) -> Path:
    """Masked-token pretraining on the store's train split (validation loss on tuning). Writes ``out/``:
    ``config.yaml``, ``model.safetensors``, ``metrics.csv``, and the store's tokenizer files. ``max_steps`` when
    given replaces the time budget (``max_minutes`` then stays as given, None by default: a run of fixed length,
    the same whatever the machine's speed)."""
    store = TokenStore(store_path)
    model_config, train_config, finetune_config = resolve_config(preset, config_path)
    if max_steps is not None:
        if max_steps < 1:
            raise UserError(f"--max-steps {max_steps}: must be at least 1")
        train_config.max_steps, train_config.max_minutes = max_steps, max_minutes
    elif max_minutes is not None:
        train_config.max_minutes = max_minutes
    model_config.vocab_size = len(store.vocab)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    dev = resolve_device(device)
    started = time.monotonic()
    with atomic_folder(out, overwrite) as staging:
        copy_tokenizer_files(store_path, staging)
        model, rows = train(store, model_config, train_config, dev)
        save_weights(model, staging / WEIGHTS_FILE)
        write_metrics(staging / METRICS_FILE, rows)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump({
            "kind": KIND, "preset": preset, "model": asdict(model_config), "pretrain": asdict(train_config),
            "finetune": asdict(finetune_config), "store": str(Path(store_path).resolve()), "steps": rows[-1]["step"],
            "seconds": round(time.monotonic() - started, 1)}, sort_keys=False))
    sys.stderr.write(f"masked pretraining: {rows[-1]['step']} steps in {rows[-1]['seconds']} s, tuning MLM loss "
                     f"{rows[0]['tuning_loss']} -> {rows[-1]['tuning_loss']}; run written to {out}\n")
    return Path(out)


def pretrain_cli(args) -> int:
    pretrain(args.store, args.out, preset=args.preset, config_path=args.config, max_minutes=args.max_minutes,
             device=args.device, overwrite=args.overwrite, max_steps=args.max_steps)
    return 0
