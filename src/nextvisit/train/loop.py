"""The optimizer steps of a pretraining run, and the logging, validation and checkpoints on their schedule.

One optimizer step consumes ``train.batch_contexts`` packed contexts of the train split, split over the
processes of a distributed run and over gradient-accumulation micro-batches of ``train.micro_batch`` contexts.
The loss of a step is normalised by the step's global number of SEP positions, so 1 process with accumulation
and P processes give the same gradient.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from nextvisit.config import RunConfig
from nextvisit.errors import UserError
from nextvisit.model import fused_head
from nextvisit.model.optim import warmup_cosine
from nextvisit.model.run import CHECKPOINT
from nextvisit.model.sequence import TrainingPlan
from nextvisit.model.transformer import NextVisitModel
from nextvisit.model.visit_time import edges_tensor, gap_nll
from nextvisit.train.checkpoint import checkpoint_step, save_checkpoint
from nextvisit.train.data import step_micro_batches
from nextvisit.model.distributed import Distributed
from nextvisit.train.metrics import MetricsWriter
from nextvisit.train.validation import Validation


def learning_rate(step: int, config) -> float:
    """Linear warm-up to ``lr``, cosine to ``min_lr`` over ``decay_steps``, then flat.

    >>> from nextvisit.config import TrainConfig
    >>> c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=100)
    >>> learning_rate(0, c), learning_rate(9, c), learning_rate(60, c), learning_rate(500, c)
    (0.1, 1.0, 0.55, 0.1)
    """
    progress = (step - config.warmup_steps) / max(1, config.decay_steps)
    return warmup_cosine(step, progress, config.lr, config.min_lr, config.warmup_steps)


@dataclass
class Trainee:
    """What every step uses. ``ddp_model`` is ``model`` itself on one process, its DDP wrapper on several."""

    model: NextVisitModel
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    plan: TrainingPlan
    config: RunConfig
    supervised: torch.Tensor  # boolean [V]: the predicted tokens
    n_supervised: int
    autocast: Callable
    dist: Distributed
    device: torch.device
    run_dir: Path
    ema: AveragedModel | None = None  # the moving average of ``model`` (train.ema_decay), updated after every step

    @property
    def published(self) -> torch.nn.Module:
        """The weights the run validates and writes to model.safetensors: the moving average, else the model."""
        return self.model if self.ema is None else self.ema.module


def moving_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights for ``train.ema_decay`` (None when it is 0): after
    each step, average = decay * average + (1 - decay) * weights; the first update copies the weights. Buffers
    are not averaged (the model's are constants)."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


@dataclass
class Limits:
    """When this invocation stops: after ``steps`` steps in all (the run's, counted from its start), or once
    ``seconds`` have passed since ``start`` (``time.monotonic()``; setup included), whichever comes first."""

    steps: int
    seconds: float | None
    start: float

    def out_of_time(self, trainee: Trainee) -> bool:
        """Whether the time is up, on any process (then all stop together)."""
        stop = self.seconds is not None and time.monotonic() - self.start >= self.seconds
        if trainee.dist.active:
            stop = trainee.dist.all_sum(float(stop)) > 0
        return stop


def _accumulate_gradients(trainee: Trainee, micro: list, normalizer: float, step: int,
                          time_normalizer: float = 1.0) -> tuple[float, float, int]:
    """Forward and backward of this process's micro-batches of one step: (sum of their next-visit losses, sum of
    their visit-time losses (unweighted), their tokens). DDP averages the gradients over processes at the last one.
    The objective is the next-visit loss plus ``loss.visit_time_weight`` times the visit-time loss (the mean
    negative log-likelihood of the gaps to the next visit: ``time_normalizer`` is the step's gaps per process)."""
    model, loss_config = trainee.model, trainee.config.loss
    timed = model.visit_time is not None
    edges = edges_tensor(model.config.visit_time_edges, trainee.device) if timed else None
    loss_sum, time_sum, tokens = 0.0, 0.0, 0
    try:
        for k, batch in enumerate(micro):
            batch = batch.to(trainee.device)
            sync = k == len(micro) - 1
            context = trainee.ddp_model.no_sync() if (trainee.dist.active and not sync) else nullcontext()
            with context:
                with trainee.autocast():
                    hidden = trainee.ddp_model(batch.tokens, batch.days, batch.att_days, batch.doc_ids,
                                               batch.positions, head=False, is_query=batch.is_query, recurrence=batch.recurrence,
                                               time_positions=batch.time_positions if timed else None)
                    if timed:
                        hidden, time_logits = hidden
                    # the tied head runs inside the loss, chunk by chunk over the vocabulary
                    loss = fused_head.next_visit_loss_from_hidden(
                        hidden, model.embed.weight, model.output_bias, batch.target_rows, batch.target_tokens,
                        batch.target_repeats, trainee.supervised, loss_config, normalizer=max(normalizer, 1.0))
                    objective = loss
                    if timed:
                        time_loss = gap_nll(time_logits, batch.time_gaps, edges).sum() / max(time_normalizer, 1.0)
                        objective = loss + loss_config.visit_time_weight * time_loss
                        time_sum += float(time_loss.detach())
                objective.backward()
            loss_sum += float(loss.detach())
            tokens += batch.n_tokens
    except RuntimeError as exc:
        if "memory" in str(exc).lower() or "alloc" in str(exc).lower():
            micro_batch = trainee.config.train.micro_batch
            raise UserError(f"out of memory at step {step} with train.micro_batch {micro_batch}; lower "
                            f"train.micro_batch (gradient accumulation keeps the step size); the last "
                            f"checkpoint in {trainee.run_dir / CHECKPOINT} is kept") from None
        raise
    return loss_sum, time_sum, tokens


def optimizer_step(trainee: Trainee, state: dict) -> tuple[float, float, float, int]:
    """One optimizer step; advances ``state`` (step, data position, tokens; ``visit_time_loss``, the step's
    visit-time loss, for a model with that head). Returns (learning rate, next-visit loss, gradient norm before
    clipping, tokens of the step over all processes)."""
    tc, dist = trainee.config.train, trainee.dist
    step = state["step"]
    lr = learning_rate(step, tc)
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    micro = step_micro_batches(trainee.plan, state, tc.batch_contexts, tc.micro_batch, dist)
    n_seps = dist.all_sum(float(sum(len(b.positions) for b in micro)))
    normalizer = n_seps * trainee.n_supervised / dist.world  # DDP averages gradients over processes
    n_gaps = dist.all_sum(float(sum(len(b.time_gaps) for b in micro))) if trainee.model.visit_time is not None else 0.0
    trainee.ddp_model.train()
    loss_sum, time_sum, tokens = _accumulate_gradients(trainee, micro, normalizer, step, n_gaps / dist.world)
    step_loss = dist.all_sum(loss_sum) / dist.world
    if trainee.model.visit_time is not None:
        state["visit_time_loss"] = dist.all_sum(time_sum) / dist.world
    if not math.isfinite(step_loss):
        run_dir = trainee.run_dir
        raise UserError(f"loss is {step_loss} at step {step}; training stopped. The last good weights are in "
                        f"{run_dir / CHECKPOINT} (step {checkpoint_step(run_dir)}); lower train.lr or use "
                        f"train.precision fp32, then --resume")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), tc.grad_clip))
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    if trainee.ema is not None:
        trainee.ema.update_parameters(trainee.model)
    tokens = int(dist.all_sum(float(tokens)))
    state["step"] = step + 1
    state["tokens"] += tokens
    return lr, step_loss, grad_norm, tokens


def _step_row(state: dict, lr: float, loss: float, grad_norm: float, tokens_per_s: float | None = None) -> dict:
    """The training columns of a metrics row (``tokens_per_s`` only on logged steps)."""
    row = {"step": state["step"], "epoch": state["epoch"], "tokens": state["tokens"], "lr": f"{lr:.3e}",
           "loss": f"{loss:.6f}", "grad_norm": f"{grad_norm:.4f}"}
    if "visit_time_loss" in state:
        row["visit_time_loss"] = f"{state['visit_time_loss']:.5f}"
    if tokens_per_s is not None:
        row["tokens_per_s"] = f"{tokens_per_s:.0f}"
    row["elapsed_s"] = f"{state['elapsed_s']:.1f}"
    return row


def run_steps(trainee: Trainee, state: dict, limits: Limits, validation: Validation | None,
              metrics: MetricsWriter | None, progress: bool) -> dict:
    """Optimizer steps until ``limits``: a metrics row every ``train.log_every`` steps and at the last step of
    ``limits.steps``, validation every ``train.eval_every`` (process 0), a checkpoint every
    ``train.checkpoint_every``. Returns the last metrics row written ({} if none)."""
    tc, dist = trainee.config.train, trainee.dist
    previous_elapsed = state["elapsed_s"]
    bar = tqdm(total=limits.steps, initial=state["step"], disable=not (progress and dist.main), desc="pretrain",
               unit="step", file=sys.stderr, dynamic_ncols=True,
               # the postfix carries the ETA, which also honours --max-minutes
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
    window_tokens, window_start = 0, time.monotonic()
    last = {}
    try:
        while state["step"] < limits.steps:
            if limits.out_of_time(trainee):
                break
            lr, step_loss, grad_norm, tokens = optimizer_step(trainee, state)
            window_tokens += tokens
            bar.update(1)

            now = time.monotonic()
            state["elapsed_s"] = previous_elapsed + now - limits.start
            row = None
            if state["step"] % tc.log_every == 0 or state["step"] == limits.steps:
                rate = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                row = _step_row(state, lr, step_loss, grad_norm, rate)
                steps_per_s = bar.format_dict.get("rate")  # None until tqdm has timed a few steps
                eta = (limits.steps - state["step"]) / steps_per_s if steps_per_s else None
                if limits.seconds is not None:
                    left = limits.seconds - (now - limits.start)
                    eta = left if eta is None else min(eta, left)
                eta_text = "?" if eta is None else f"{max(eta, 0) / 60:.1f}"
                bar.set_postfix_str(f"loss {step_loss:.4f} {rate:,.0f} tok/s eta {eta_text} min")
            if state["step"] % tc.eval_every == 0 and dist.main:
                row = row or _step_row(state, lr, step_loss, grad_norm)
                row.update(validation.run(trainee.published))
            if row is not None and dist.main:
                metrics.write(row)
                last = row
            if state["step"] % tc.checkpoint_every == 0:
                if dist.main:
                    save_checkpoint(trainee.run_dir, trainee.model, trainee.optimizer, state, trainee.ema)
                dist.barrier()
    finally:
        bar.close()
    return last


VISIT_TIME_CALIBRATION = "visit_time_calibration.json"


def write_calibration(run_dir: Path, calibration: dict, last: dict) -> None:
    """``RUN/visit_time_calibration.json``: the visit-time head's predicted against observed share of next visits
    within each checked gap, on the validation visits of the last validation (its step in ``step``)."""
    import json

    from nextvisit.artifacts.folders import atomic_write

    document = {"step": last.get("step"), "val_visit_time_loss": last.get("val_visit_time_loss"), **calibration}
    atomic_write(Path(run_dir) / VISIT_TIME_CALIBRATION,
                 lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))


def finish(trainee: Trainee, state: dict, last: dict, validation: Validation | None,
           metrics: MetricsWriter | None) -> dict:
    """The end of an invocation: a validation (unless the last step just had one) and a checkpoint on process
    0, and a summary line. Returns the final metrics row."""
    if trainee.dist.main:
        if not last or last.get("step") != state["step"] or "val_loss" not in last:
            row = {"step": state["step"], "epoch": state["epoch"], "tokens": state["tokens"],
                   "elapsed_s": f"{state['elapsed_s']:.1f}"}
            row.update(validation.run(trainee.published))
            metrics.write(row)
            last = row
        save_checkpoint(trainee.run_dir, trainee.model, trainee.optimizer, state, trainee.ema)
        if validation.calibration is not None:
            write_calibration(trainee.run_dir, validation.calibration, last)
        print(f"nextvisit pretrain: step {state['step']}, {state['tokens']:,} tokens in "
              f"{state['elapsed_s'] / 60:.1f} min; validation loss {float(last['val_loss']):.5f} (code-frequency "
              f"baseline {float(last['val_loss_frequency_baseline']):.5f}), new-onset AUROC "
              f"{float(last['val_new_onset_auroc']):.3f} (baseline "
              f"{float(last['val_new_onset_auroc_frequency_baseline']):.3f})"
              + (f", visit-time loss {float(last['val_visit_time_loss']):.4f}" if 'val_visit_time_loss' in last else "")
              + f"; run in {trainee.run_dir}", file=sys.stderr)
    trainee.dist.barrier()
    return last
