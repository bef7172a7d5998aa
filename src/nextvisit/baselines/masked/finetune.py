"""Fine-tuning as a compared model (``nextvisit.compare``): ``MaskedModel`` reads the label rows'
histories (``inputs.read_inputs``), fine-tunes every weight plus one ``CLS`` logit per (task, horizon) on
the train rows with early stopping on the tuning rows, and scores rows; ``save`` writes the fine-tuned run
(tokenizer files, weights, metrics, config) into the predictions folder. ``finetune`` runs it through
``compare.run`` (``nextvisit baseline masked finetune``)."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from nextvisit import compare
from nextvisit.artifacts.predictions import FINE_TUNED, PREDICTION_SPLITS, PROBABILITY
from nextvisit.baselines.masked.config import BETAS, FINETUNE_MIN_LR_FRACTION, FinetuneConfig, finetune_config
from nextvisit.baselines.masked.inputs import Histories, label_matrix, output_key, read_inputs
from nextvisit.baselines.masked.model import MaskedEncoder, load_run
from nextvisit.baselines.masked.pretrain import write_metrics
from nextvisit.baselines.masked.windows import collate
from nextvisit.compare import ComparedModel, Labels
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


class FineTuning:
    """One fine-tuning run: the train loop over train histories, evaluations on tuning histories, the best
    weights so far. ``rows`` are the metrics rows (step 0 = the untuned head on the pretrained encoder)."""

    def __init__(self, model: MaskedEncoder, config: FinetuneConfig, device, windows: list, targets: np.ndarray,
                 labelled: np.ndarray, train_ids: np.ndarray, tuning_ids: np.ndarray, log_sampling_odds: np.ndarray,
                 started: float):
        self.model, self.config, self.device, self.windows, self.started = model, config, device, windows, started
        self.targets, self.labelled, self.train_ids, self.tuning_ids = targets, labelled, train_ids, tuning_ids
        self.tuning_windows = [windows[i] for i in tuning_ids]
        self.tuning_targets, self.tuning_mask = targets[tuning_ids], labelled[tuning_ids]
        self.log_sampling_odds = log_sampling_odds
        steps_per_epoch = max(1, math.ceil(len(train_ids) / config.batch_size))
        self.eval_every = config.eval_every or steps_per_epoch
        self.total_steps = config.max_epochs * steps_per_epoch
        self.rows: list[dict] = []
        self.step, self.last_loss, self.stop_reason, self.stale = 0, math.nan, "max_epochs", 0
        self.eval_predict_seconds = 0.0

    def evaluate(self) -> dict:
        """Score the tuning histories; the metrics row of the current step."""
        predict_started = time.monotonic()
        probabilities = predict_probabilities(self.model, self.tuning_windows, self.config.predict_batch_size, self.device)
        self.eval_predict_seconds = time.monotonic() - predict_started
        self.model.train()
        logits = torch.logit(torch.from_numpy(probabilities).clamp(1e-6, 1 - 1e-6)) - torch.from_numpy(self.log_sampling_odds)
        mask = torch.from_numpy(self.tuning_mask)
        loss = F.binary_cross_entropy_with_logits(logits[mask], torch.from_numpy(self.tuning_targets)[mask]).item()
        auroc = tuning_auroc(probabilities, self.tuning_targets, self.tuning_mask)
        return {"step": self.step, "seconds": round(time.monotonic() - self.started, 1),
                "train_loss": round(self.last_loss, 4), "tuning_loss": round(loss, 4), "tuning_auroc": round(auroc, 4)}

    def better(self, row: dict) -> bool:
        """``row`` beats the best so far: higher tuning AUROC, or lower tuning loss where AUROC is undefined;
        without tuning rows every row does (the last weights are kept)."""
        if len(self.tuning_ids) == 0:
            return True
        if not math.isnan(row["tuning_auroc"]) and not math.isnan(self.best["tuning_auroc"]):
            return row["tuning_auroc"] > self.best["tuning_auroc"]
        return row["tuning_loss"] < self.best["tuning_loss"]

    def keep_if_better(self) -> bool:
        if self.better(self.rows[-1]):
            self.best, self.best_state = self.rows[-1], copy.deepcopy(self.model.state_dict())
            return True
        return False

    def start(self, n_predicted: int) -> None:
        """The step-0 evaluation, and the training budget: the time budget covers the whole command, so the
        last evaluation and the final predictions of ``n_predicted`` histories are reserved, estimated from
        the throughput of this evaluation's forward passes; the learning-rate schedule runs over what is left."""
        self.loop_started = time.monotonic()
        self.rows.append(self.evaluate())
        self.first_evaluation_seconds = time.monotonic() - self.loop_started
        seconds_per_history = self.eval_predict_seconds / max(1, len(self.tuning_ids))
        self.reserve = self.first_evaluation_seconds + seconds_per_history * n_predicted
        self.train_started = time.monotonic()
        budget_s = None if self.config.max_minutes is None else 60 * self.config.max_minutes
        self.train_budget_s = (None if budget_s is None
                               else max(1e-9, budget_s - (self.train_started - self.started) - self.reserve))
        self.best, self.best_state = self.rows[0], copy.deepcopy(self.model.state_dict())

    def train_step(self, optimizer, ids: np.ndarray, elapsed: float) -> None:
        target = torch.from_numpy(self.targets[ids]).to(self.device)
        mask = torch.from_numpy(self.labelled[ids]).to(self.device)
        tokens, days, types = (t.to(self.device) for t in collate([self.windows[j] for j in ids]))
        progress = max(self.step / self.total_steps, elapsed / self.train_budget_s if self.train_budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(self.step, progress, self.config.lr, self.config.lr * FINETUNE_MIN_LR_FRACTION,
                                        self.config.warmup_steps)
        loss = F.binary_cross_entropy_with_logits(self.model.classify(tokens, days, types)[mask], target[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        self.step, self.last_loss = self.step + 1, loss.item()

    def epoch(self, optimizer, order: np.ndarray, progress_bar) -> str | None:
        """One pass over ``order`` in batches; the stop reason when training must end."""
        for i in range(0, len(order), self.config.batch_size):
            elapsed = time.monotonic() - self.train_started
            if self.train_budget_s is not None and elapsed >= self.train_budget_s and self.step >= self.config.min_steps:
                return "max_minutes"
            self.train_step(optimizer, order[i : i + self.config.batch_size], elapsed)
            progress_bar.update(1)
            if self.step % self.eval_every == 0:
                self.rows.append(self.evaluate())
                progress_bar.set_postfix(tuning_auroc=self.rows[-1]["tuning_auroc"])
                self.stale = 0 if self.keep_if_better() else self.stale + 1
                if self.stale >= self.config.patience:
                    return "early_stopping"
        return None

    def train(self, optimizer, rng: np.random.Generator, draw_weights: np.ndarray | None) -> None:
        """Epochs until ``max_epochs``, early stopping or the budget; then the best weights, with the
        positives' sampling odds taken off the head's bias (a no-op without ``positive_share``)."""
        self.model.train()
        progress_bar = tqdm(total=self.total_steps, desc="masked fine-tune", unit="step", mininterval=2)
        for _epoch in range(self.config.max_epochs):
            if draw_weights is None:
                order = rng.permutation(self.train_ids)
            else:
                order = rng.choice(self.train_ids, size=len(self.train_ids), p=draw_weights)
            reason = self.epoch(optimizer, order, progress_bar)
            if reason is not None:
                self.stop_reason = reason
                break
        progress_bar.close()
        if self.step % self.eval_every and self.stop_reason != "early_stopping":
            self.rows.append(self.evaluate())
            self.keep_if_better()
        self.model.load_state_dict(self.best_state)
        with torch.no_grad():
            self.model.head.bias -= torch.from_numpy(self.log_sampling_odds).to(self.model.head.bias.device)
        self.train_seconds = time.monotonic() - self.loop_started

    def summary(self) -> dict:
        return {"steps": self.step, "stop_reason": self.stop_reason, "best_step": self.best["step"],
                "untuned_tuning_auroc": self.rows[0]["tuning_auroc"], "best_tuning_auroc": self.best["tuning_auroc"],
                "train_histories": int(len(self.train_ids))}


class MaskedModel(ComparedModel):
    """The masked baseline behind the compared-model interface: a masked run (pretrained, or fine-tuned
    for predictions only) loaded on ``device``; ``fit`` fine-tunes it on the train rows, choosing the weights
    on the tuning rows. ``max_minutes`` (else the config's) bounds everything from construction on."""

    kind = FINE_TUNED

    def __init__(self, run: Path, device: str | None = None, config_path: Path | None = None,
                 max_minutes: float | None = None):
        self.started = time.monotonic()
        self.run = Path(run)
        self.device = resolve_device(None if device is None else str(device))
        self.model, self.run_config = load_run(self.run, self.device)
        self.config = finetune_config(self.run_config, self.run, config_path, max_minutes)
        self.name = f"masked-{self.run_config.get('preset', 'custom')}"
        self.outputs: list[str] = self.run_config.get("outputs") or []
        self.input_counts: dict = {}
        self.seconds: dict = {}
        self.fine_tuning: FineTuning | None = None

    def read(self, meds_dir: Path, labels: Labels) -> Histories:
        histories = read_inputs(self.run, meds_dir, labels, self.model.config)
        self.labels_dir, self.input_counts = labels.source.parent, histories.counts
        self.seconds["tokenize"] = time.monotonic() - self.started
        return histories

    def _init_head(self, targets: np.ndarray, labelled: np.ndarray) -> None:
        """A fresh head with every output at its train prevalence, so early steps learn ranking, not the base rate."""
        self.model.add_head(len(self.outputs))
        with torch.no_grad():
            prevalence = (targets * labelled).sum(0) / np.maximum(labelled.sum(0), 1)
            self.model.head.bias.copy_(torch.logit(torch.from_numpy(prevalence).clamp(1e-4, 1 - 1e-4)))
        self.model.to(self.device)

    def fit(self, inputs: Histories, train: pl.DataFrame, tuning: pl.DataFrame) -> "MaskedModel":
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.outputs = inputs.outputs
        targets, labelled = label_matrix(inputs, pl.concat([train, tuning]))
        train_ids, tuning_ids = np.unique(train["history_id"].to_numpy()), np.unique(tuning["history_id"].to_numpy())
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        self._init_head(targets[train_ids], labelled[train_ids])
        optimizer = make_optimizer(self.model, config.lr, config.weight_decay, BETAS)
        if config.eval_histories and len(tuning_ids) > config.eval_histories:
            tuning_ids = np.sort(rng.choice(tuning_ids, config.eval_histories, replace=False))
        draw_weights, log_sampling_odds = positive_sampling(targets[train_ids], labelled[train_ids], config.positive_share)
        if len(tuning_ids) == 0:
            sys.stderr.write(f"warning: {self.labels_dir} has no labelled tuning rows; no early stopping, the last "
                             "weights are kept\n")
        run = FineTuning(self.model, config, self.device, inputs.windows, targets, labelled, train_ids, tuning_ids,
                         log_sampling_odds, self.started)
        run.start(inputs.n_predicted)
        run.train(optimizer, rng, draw_weights)
        self.fine_tuning = run
        self.seconds.update(train=run.train_seconds, first_evaluation=run.first_evaluation_seconds,
                            reserved_for_predictions=run.reserve)
        sys.stderr.write(f"masked fine-tuning: {run.summary()}\n")
        return self

    def predict_proba(self, inputs: Histories, rows: pl.DataFrame) -> np.ndarray:
        if not self.outputs:
            raise UserError(f"{self.run}: a pretrained run has no task head; fine-tune it first "
                            "(`nextvisit baseline masked finetune`)")
        column = {key: k for k, key in enumerate(self.outputs)}
        keys = rows.select(output_key()).to_series().to_list()
        missing = sorted(set(keys) - set(column))
        if missing:
            raise UserError(f"task/horizon {missing} has no head in {self.run}; fine-tune on these labels")
        predict_started = time.monotonic()
        ids, row_history = np.unique(rows["history_id"].to_numpy(), return_inverse=True)
        probabilities = predict_probabilities(self.model, [inputs.windows[i] for i in ids],
                                              self.config.predict_batch_size, self.device)
        self.seconds["predict"] = time.monotonic() - predict_started
        return probabilities[row_history, np.array([column[key] for key in keys], dtype=np.int64)].astype(np.float64)

    def info(self) -> dict:
        fit = self.fine_tuning.summary() if self.fine_tuning is not None else {}
        seconds = {**self.seconds, "total": time.monotonic() - self.started}
        fit["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
        return {"config": {"model": asdict(self.model.config), "finetune": asdict(self.config),
                           "pretrained_run": str(self.run.resolve())},
                "inputs": self.input_counts, "fit": fit}

    def save(self, folder: Path) -> None:
        """The fine-tuned run: the tokenizer files, the weights, the metrics rows and the resolved config."""
        folder = Path(folder)
        copy_tokenizer_files(self.run, folder)
        save_weights(self.model, folder / WEIGHTS_FILE)
        write_metrics(folder / METRICS_FILE, self.fine_tuning.rows)
        resolved = {**self.run_config, "finetune": asdict(self.config), "outputs": self.outputs,
                    "pretrained_run": str(self.run.resolve())}
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))


def finetune(run: Path, meds_dir: Path, labels_dir: Path, out: Path, max_minutes: float | None = None,
             device: str | None = None, config_path: Path | None = None, overwrite: bool = False) -> Path:
    """Fine-tune a pretrained masked run on train-split labels (early stopping on tuning AUROC) and write
    predictions for the tuning and held_out rows into ``out`` (a predictions folder and a run)."""
    model = MaskedModel(run, device=device, config_path=config_path, max_minutes=max_minutes)
    compare.run(model, meds_dir, labels_dir, out, overwrite)
    return Path(out)


def predict(run: Path, meds_dir: Path, labels_dir: Path, device="cpu") -> pl.DataFrame:
    """Scores of a fine-tuned run for the tuning and held_out label rows of ``labels_dir`` (histories cut and
    tokenized exactly as in fine-tuning): the label columns plus the probability."""
    model = MaskedModel(run, device=device)
    if not model.outputs:
        raise UserError(f"{run}: a pretrained run has no task head; fine-tune it first (`nextvisit baseline masked finetune`)")
    labels = Labels.load(labels_dir)
    histories = model.read(Path(meds_dir), labels)
    missing = sorted(set(histories.outputs) - set(model.outputs))
    if missing:
        raise UserError(f"{labels_dir}: task/horizon {missing} has no head in {run}; fine-tune on these labels")
    rows = labels.rows.filter(pl.col("split").is_in(list(PREDICTION_SPLITS)))
    return rows.with_columns(pl.Series(PROBABILITY, model.predict_proba(histories, rows))).drop("history_id")


def finetune_cli(args) -> int:
    finetune(args.run, args.meds_dir, args.labels, args.out, max_minutes=args.max_minutes, device=args.device,
             config_path=args.config, overwrite=args.overwrite)
    return 0
