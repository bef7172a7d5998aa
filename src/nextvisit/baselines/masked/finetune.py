"""Fine-tuning as a compared model (``nextvisit.compare``): ``MaskedModel`` reads the label rows'
histories (``inputs.read_inputs``), fine-tunes every weight plus one ``CLS`` logit per (task, horizon) on
the train rows, and scores rows; ``save`` writes the fine-tuned run (tokenizer files, weights, metrics,
config) into the predictions folder. ``finetune`` runs it through ``compare.run`` (``nextvisit baseline
masked finetune``).

The stopping step is chosen as ``nextvisit.baselines.selection`` says, for all outputs together (they share
the encoder): early stopping on the tuning rows when every output's tuning rows hold at least 30 positive
subjects; else by cross-validation within train: one fine-tuning run per fold of subjects, early-stopped
on that fold's validation subjects, the median of the folds' best steps, and a refit on all train rows
that repeats the folds' schedule and stops there (``FinetuneConfig.cv_*`` for cheaper variants)."""

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
from nextvisit.baselines import selection
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


def evaluation_subset(ids: np.ndarray, targets: np.ndarray, labelled: np.ndarray, budget: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Up to ``budget`` of the evaluation histories ``ids``, sorted: the histories with a positive label in
    any output first (all of them, or a random half of the budget when they are more and the others can fill
    the other half), the rest of the budget filled at random from the others. A uniform draw of a rare outcome's histories leaves the stopping rule a
    handful of positives (500 of 8,243 tuning histories held 12 dementia onsets), so the tuning AUROC it
    follows is mostly noise; drawing within each class keeps the AUROC's expectation and gives both classes
    room. ``budget`` 0, or at least ``len(ids)``: every history."""
    if not budget or len(ids) <= budget:
        return ids
    positive = (targets[ids] * labelled[ids]).any(axis=1)
    positives, others = ids[positive], ids[~positive]
    keep = max(budget // 2, budget - len(others))
    if len(positives) > keep:
        positives = rng.choice(positives, keep, replace=False)
    others = rng.choice(others, min(len(others), budget - len(positives)), replace=False)
    return np.sort(np.concatenate([positives, others]))


def tuning_auroc(probabilities: np.ndarray, targets: np.ndarray, labelled: np.ndarray) -> float:
    """Mean AUROC over outputs whose tuning rows hold both classes (NaN when none does)."""
    values = []
    for k in range(targets.shape[1]):
        y = targets[labelled[:, k], k]
        if len(np.unique(y)) == 2:
            values.append(roc_auc_score(y, probabilities[labelled[:, k], k]))
    return float(np.mean(values)) if values else math.nan


class FineTuning:
    """One fine-tuning run: the train loop over ``train_ids`` histories, evaluations on ``tuning_ids``
    histories (the tuning split's, or a train fold's validation subjects), the best weights so far.
    ``rows`` are the metrics rows (step 0 = the untuned head on the pretrained encoder).

    ``deadline`` (monotonic seconds, None = no time budget) ends training, less what the last evaluation, the
    ``later_runs``' first and last evaluations and the final predictions need; ``share`` of what is left goes
    to this run (the rest to the later runs). A refit passes ``total_steps`` (the schedule of the runs it
    repeats), ``stop_step`` (train exactly this many steps) and ``keep_best=False`` (keep the last weights;
    evaluated at its first and last step only, to report)."""

    def __init__(self, model: MaskedEncoder, config: FinetuneConfig, device, windows: list, targets: np.ndarray,
                 labelled: np.ndarray, train_ids: np.ndarray, tuning_ids: np.ndarray, log_sampling_odds: np.ndarray,
                 started: float, deadline: float | None, share: float = 1.0, later_runs: int = 0,
                 total_steps: int | None = None, stop_step: int | None = None, keep_best: bool = True,
                 name: str = "all"):
        self.model, self.config, self.device, self.windows, self.started = model, config, device, windows, started
        self.deadline, self.share, self.later_runs = deadline, share, later_runs
        self.stop_step, self.keep_best, self.name = stop_step, keep_best, name
        self.targets, self.labelled, self.train_ids, self.tuning_ids = targets, labelled, train_ids, tuning_ids
        self.tuning_windows = [windows[i] for i in tuning_ids]
        self.tuning_targets, self.tuning_mask = targets[tuning_ids], labelled[tuning_ids]
        self.log_sampling_odds = log_sampling_odds
        steps_per_epoch = max(1, math.ceil(len(train_ids) / config.batch_size))
        self.eval_every = config.eval_every or steps_per_epoch
        self.total_steps = total_steps or min(config.max_epochs * steps_per_epoch, config.max_steps or math.inf)
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
        return {"run": self.name, "step": self.step, "seconds": round(time.monotonic() - self.started, 1),
                "train_loss": round(self.last_loss, 4), "tuning_loss": round(loss, 4), "tuning_auroc": round(auroc, 4)}

    def better(self, row: dict) -> bool:
        """``row`` beats the best so far: higher tuning AUROC, or lower tuning loss where AUROC is undefined;
        without tuning rows, or when not keeping the best, every row does (the last weights are kept)."""
        if len(self.tuning_ids) == 0 or not self.keep_best:
            return True
        return beats(row, self.best)

    def keep_if_better(self) -> bool:
        if self.better(self.rows[-1]):
            self.best, self.best_state = self.rows[-1], copy.deepcopy(self.model.state_dict())
            return True
        return False

    def start(self, n_predicted: int) -> None:
        """The step-0 evaluation, and the training budget: the time budget covers the whole command, so the
        last evaluation and the final predictions of ``n_predicted`` histories are reserved, estimated from
        the throughput of this evaluation's forward passes (and two evaluations of each later run, estimated
        as this one); this run trains for ``share`` of what is left, and the learning-rate schedule runs over
        it."""
        self.loop_started = time.monotonic()
        self.rows.append(self.evaluate())
        self.first_evaluation_seconds = time.monotonic() - self.loop_started
        seconds_per_history = self.eval_predict_seconds / max(1, len(self.tuning_ids))
        self.reserve = (self.first_evaluation_seconds * (1 + 2 * self.later_runs)
                        + seconds_per_history * n_predicted)
        self.train_started = time.monotonic()
        self.train_budget_s = (None if self.deadline is None
                               else max(1e-9, self.share * (self.deadline - self.train_started - self.reserve)))
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
            if self.stop_step is not None and self.step >= self.stop_step:
                return "chosen_steps"
            if self.step >= self.total_steps:
                return "max_steps"
            if (self.train_budget_s is not None and elapsed >= self.train_budget_s
                    and self.step >= min(self.config.min_steps, self.stop_step or self.config.min_steps)):
                return "max_minutes"
            self.train_step(optimizer, order[i : i + self.config.batch_size], elapsed)
            progress_bar.update(1)
            if self.keep_best and self.step % self.eval_every == 0:
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
        progress_bar = tqdm(total=self.stop_step or self.total_steps, desc=f"masked fine-tune ({self.name})",
                            unit="step", mininterval=2)
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
        if self.rows[-1]["step"] != self.step:
            self.rows.append(self.evaluate())
            self.keep_if_better()
        self.model.load_state_dict(self.best_state)
        with torch.no_grad():
            self.model.head.bias -= torch.from_numpy(self.log_sampling_odds).to(self.model.head.bias.device)
        self.train_seconds = time.monotonic() - self.loop_started

    def summary(self) -> dict:
        """``best_step``/``best_tuning_auroc``: the kept weights (the last ones when not keeping the best)."""
        return {"run": self.name, "steps": self.step, "stop_reason": self.stop_reason, "best_step": self.best["step"],
                "untuned_tuning_auroc": self.rows[0]["tuning_auroc"], "best_tuning_auroc": self.best["tuning_auroc"],
                "train_histories": int(len(self.train_ids)), "evaluated_histories": int(len(self.tuning_ids))}


def beats(row: dict, best: dict) -> bool:
    """Metrics ``row`` is better than ``best``: higher tuning AUROC, or lower tuning loss where AUROC is
    undefined."""
    if not math.isnan(row["tuning_auroc"]) and not math.isnan(best["tuning_auroc"]):
        return row["tuning_auroc"] > best["tuning_auroc"]
    return row["tuning_loss"] < best["tuning_loss"]


class MaskedModel(ComparedModel):
    """The masked baseline behind the compared-model interface: a masked run (pretrained, or fine-tuned
    for predictions only) loaded on ``device``; ``fit`` fine-tunes it on the train rows, choosing the weights
    on the tuning rows. ``max_minutes`` (else the config's) bounds everything from construction on."""

    kind = FINE_TUNED

    def __init__(self, run: Path, device: str | None = None, config_path: Path | None = None,
                 max_minutes: float | None = None, max_steps: int | None = None):
        self.started = time.monotonic()
        self.run = Path(run)
        self.device = resolve_device(None if device is None else str(device))
        self.model, self.run_config = load_run(self.run, self.device)
        self.config = finetune_config(self.run_config, self.run, config_path, max_minutes, max_steps)
        self.name = f"masked-{self.run_config.get('preset', 'custom')}"
        self.outputs: list[str] = self.run_config.get("outputs") or []
        self.input_counts: dict = {}
        self.seconds: dict = {}
        self.fine_tuning: FineTuning | None = None
        self.fold_runs: list[FineTuning] = []
        self.selections: dict[str, dict] = {}

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

    def _method(self, train: pl.DataFrame, tuning: pl.DataFrame) -> tuple[str, np.ndarray | None]:
        """How the stopping step is chosen (``nextvisit.baselines.selection``), for all outputs together: on
        tuning only when every output's tuning rows can rank; else by folds of train subjects, the fold of
        each train row (None: no split exists, the whole schedule runs and the last weights are kept)."""
        if all(selection.method(tuning.filter(output_key() == key)) == selection.TUNING for key in self.outputs):
            return selection.TUNING, None
        fold = selection.subject_folds(train, self.config.cv_folds, self.config.seed)
        return (selection.CV_WITHIN_TRAIN, fold) if fold is not None else (selection.DEFAULT, None)

    def _run(self, inputs: Histories, train_ids: np.ndarray, tuning_ids: np.ndarray, rng: np.random.Generator,
             name: str, **options) -> FineTuning:
        """One fine-tuning run from the pretrained encoder with a fresh head: train on ``train_ids``, evaluate
        on (up to ``eval_histories`` of, drawn within each class: ``evaluation_subset``) ``tuning_ids``;
        ``options`` go to ``FineTuning``."""
        config = self.config
        self.model.load_state_dict(self.pretrained, strict=False)
        self._init_head(self.targets[train_ids], self.labelled[train_ids])
        optimizer = make_optimizer(self.model, config.lr, config.weight_decay, BETAS)
        tuning_ids = evaluation_subset(tuning_ids, self.targets, self.labelled, config.eval_histories, rng)
        draw_weights, log_sampling_odds = positive_sampling(self.targets[train_ids], self.labelled[train_ids],
                                                            config.positive_share)
        run = FineTuning(self.model, config, self.device, inputs.windows, self.targets, self.labelled, train_ids,
                         tuning_ids, log_sampling_odds, self.started, self.deadline, name=name, **options)
        run.start(inputs.n_predicted)
        run.train(optimizer, rng, draw_weights)
        sys.stderr.write(f"masked fine-tuning: {run.summary()}\n")
        return run

    def fit(self, inputs: Histories, train: pl.DataFrame, tuning: pl.DataFrame) -> "MaskedModel":
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        fit_started = time.monotonic()
        self.outputs = inputs.outputs
        self.targets, self.labelled = label_matrix(inputs, pl.concat([train, tuning]))
        self.deadline = None if config.max_minutes is None else self.started + 60 * config.max_minutes
        # every run starts from the pretrained encoder (a head of an earlier fine-tuning is replaced)
        self.pretrained = {k: v.clone() for k, v in self.model.state_dict().items() if not k.startswith("head.")}
        train_ids, tuning_ids = np.unique(train["history_id"].to_numpy()), np.unique(tuning["history_id"].to_numpy())
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        how, fold = self._method(train, tuning)
        folds = None
        if how == selection.TUNING:
            run = self._run(inputs, train_ids, tuning_ids, rng, "all")
            chosen, scores = {"steps": run.best["step"]}, [{"step": r["step"], "auroc": r["tuning_auroc"]} for r in run.rows]
        elif how == selection.DEFAULT:
            sys.stderr.write(f"warning: {self.labels_dir}: train cannot be split into folds by outcome; no early "
                             "stopping, the last weights are kept\n")
            run = self._run(inputs, train_ids, tuning_ids, rng, "all", keep_best=False)
            chosen, scores = {"steps": run.step}, []
        else:
            run, chosen, scores, folds = self._cross_validate(inputs, train, fold, train_ids, tuning_ids, rng)
        self.fine_tuning = run
        for key in self.outputs:
            self.selections[key] = {**selection.record(how, tuning.filter(output_key() == key), folds, chosen, scores),
                                    "scope": "all outputs"}
        self.seconds.update(train=time.monotonic() - fit_started, first_evaluation=run.first_evaluation_seconds,
                            reserved_for_predictions=run.reserve)
        return self

    def _cross_validate(self, inputs: Histories, train: pl.DataFrame, fold: np.ndarray, train_ids: np.ndarray,
                        tuning_ids: np.ndarray, rng: np.random.Generator):
        """Fold runs (early-stopped on each fold's validation subjects), the median of their best steps, and
        the refit on all train rows stopped there (or, ``cv_refit: false``, the one fold run's best weights).
        The refit's evaluations on tuning rows only report (they choose nothing)."""
        config = self.config
        history_fold = np.full(inputs.frame.height, -1, np.int64)
        history_fold[train["history_id"].to_numpy()] = fold
        n_folds = int(fold.max()) + 1
        n_runs = min(config.cv_folds_run or n_folds, n_folds)
        for index in range(n_runs):
            later = n_runs - index - 1 + (1 if config.cv_refit else 0)
            self.fold_runs.append(self._run(inputs, train_ids[history_fold[train_ids] != index],
                                            train_ids[history_fold[train_ids] == index], rng, f"fold{index}",
                                            share=1.0 / (later + 1), later_runs=later))
        best_steps = [run.best["step"] for run in self.fold_runs]
        steps = int(round(float(np.median(best_steps))))
        scores = [{"fold": int(index), "best_step": run.best["step"], "auroc": run.best["tuning_auroc"]}
                  for index, run in enumerate(self.fold_runs)]
        chosen = {"steps": steps, "fold_best_steps": best_steps, "refit": config.cv_refit}
        if not config.cv_refit:
            return self.fold_runs[0], chosen, scores, n_folds
        refit = self._run(inputs, train_ids, tuning_ids, rng, "refit", total_steps=self.fold_runs[0].total_steps,
                          stop_step=steps, keep_best=False)
        return refit, chosen, scores, n_folds

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
        if self.fold_runs:
            fit["fold_runs"] = [run.summary() for run in self.fold_runs]
        seconds = {**self.seconds, "total": time.monotonic() - self.started}
        fit["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
        return {"config": {"model": asdict(self.model.config), "finetune": asdict(self.config),
                           "pretrained_run": str(self.run.resolve())},
                "inputs": self.input_counts, "fit": fit, "selection": self.selections}

    def save(self, folder: Path) -> None:
        """The fine-tuned run: the tokenizer files, the weights, the metrics rows and the resolved config."""
        folder = Path(folder)
        copy_tokenizer_files(self.run, folder)
        save_weights(self.model, folder / WEIGHTS_FILE)
        runs = [run for run in self.fold_runs if run is not self.fine_tuning] + [self.fine_tuning]
        write_metrics(folder / METRICS_FILE, [row for run in runs for row in run.rows])
        resolved = {**self.run_config, "finetune": asdict(self.config), "outputs": self.outputs,
                    "pretrained_run": str(self.run.resolve())}
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))


def finetune(run: Path, meds_dir: Path, labels_dir: Path, out: Path, max_minutes: float | None = None,
             device: str | None = None, config_path: Path | None = None, overwrite: bool = False,
             max_steps: int | None = None) -> Path:
    """Fine-tune a pretrained masked run on train-split labels (early stopping on tuning AUROC) and write
    predictions for the tuning and held_out rows into ``out`` (a predictions folder and a run)."""
    model = MaskedModel(run, device=device, config_path=config_path, max_minutes=max_minutes, max_steps=max_steps)
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
             config_path=args.config, overwrite=args.overwrite, max_steps=args.max_steps)
    return 0
