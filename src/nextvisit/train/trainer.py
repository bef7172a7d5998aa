"""`nextvisit pretrain`: train the next-visit model on a token store (the run folder: ``nextvisit.model.run``).

``train`` puts a run together from the parts in ``nextvisit.train``: the run folder (``run_folder``), the
processes of a distributed run (``distributed``), the training data (``data``), the optimizer steps with
their logging, validation and checkpoints (``loop``, ``validation``, ``metrics``, ``checkpoint``); ``pretrain``
is the verb (the preset, its overrides, then ``train``), for the command line and the Python API alike.

Run folder (docs/interfaces.md §4): config.yaml, vocab.json, tokenizer.yaml, lab_stats.parquet, model.safetensors
(latest good weights), checkpoint/ (weights, optimizer, RNG, data position), metrics.csv.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from nextvisit.artifacts.folders import disk_full
from nextvisit.config import RunConfig, resolve
from nextvisit.errors import UserError
from nextvisit.model.optim import make_optimizer
from nextvisit.model.run import CONFIG_FILE, METRICS_FILE, autocast_for
from nextvisit.model.sequence import TrainingPlan, visit_cap
from nextvisit.model.transformer import NextVisitModel
from nextvisit.model.visit_time import constant_hazard_logits, gap_bin_counts
from nextvisit.tokenize.store import TokenStore, split_blocks
from nextvisit.train.checkpoint import has_checkpoint, load_checkpoint
from nextvisit.train.data import training_plan
from nextvisit.model.distributed import init_distributed, shutdown
from nextvisit.train.loop import Limits, Trainee, finish, moving_average, run_steps
from nextvisit.train.memory import keep_large_buffers_in_the_heap
from nextvisit.train.metrics import METRIC_FIELDS, MetricsWriter, truncate_metrics
from nextvisit.train.run_folder import shared_run_config
from nextvisit.train.validation import Validation, best_constant_logits, target_visit_share, validation_fields


def train(store_path: Path, run_dir: Path, config: RunConfig, resume: bool = False, max_minutes: float | None = None,
          max_steps: int | None = None, device_name: str | None = None, progress: bool = True) -> dict:
    """Train (or continue) a run. Returns the final metrics row.

    ``max_minutes`` bounds this invocation's wall time (setup included); ``max_steps`` replaces the config's
    ``train.max_steps`` as the step to stop at. Both apply to this invocation only: neither is written to the
    run's config.yaml, and either way the run stops with a validation and a checkpoint.
    """
    start_time = time.monotonic()
    if max_steps is not None and max_steps < 0:
        raise UserError(f"--max-steps {max_steps}: must be 0 or more")
    dist, device = init_distributed(device_name)
    if device.type == "cpu":
        keep_large_buffers_in_the_heap()
    store = TokenStore(store_path)
    run_dir = Path(run_dir)
    if not resume and not config.train.threads:
        # a CPU run is the same bit for bit only at the same thread count (docs/scale.md, "Reproducibility"):
        # the count this environment gives is written to the run's config, so that --resume keeps it
        config.train.threads = torch.get_num_threads()
    # one process at a time writes the run folder (its lock, beside it, is held to the end of the run)
    with ExitStack() as held:
        config = shared_run_config(run_dir, store, config, resume, dist, held)
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        supervised_np = store.vocab.supervised_mask()
        try:
            if dist.world > tc.batch_contexts:  # a process without a context would leave DDP's all-reduce waiting
                raise UserError(f"train.batch_contexts {tc.batch_contexts} (contexts per step, over all processes) is "
                                f"less than the {dist.world} processes of this run; raise it to at least "
                                f"{dist.world} or start fewer processes")
            train_split, plan = training_plan(store, config, supervised_np)
        except UserError:
            dist.barrier()  # every process fails here alike (the same config and store): all have read the folder
            if dist.main and not resume:  # the folder was empty or absent: leave no half-made run behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

        model, optimizer, ema, state = _model_optimizer_state(config, train_split, len(store.vocab), run_dir, resume,
                                                              device)
        ddp_model = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
        supervised = torch.from_numpy(supervised_np).to(device)
        autocast, precision = autocast_for(tc.precision, device)
        trainee = Trainee(model, ddp_model, optimizer, plan, config, supervised, int(supervised_np.sum()), autocast,
                          dist, device, run_dir, ema)

        validation = Validation(store, config, supervised_np, device, autocast) if dist.main else None
        timed = config.model.visit_time_head
        fields = METRIC_FIELDS + (["visit_time_loss"] if timed else []) + \
            validation_fields(config.loss.frequency_band_edges, visit_time=timed)
        metrics = MetricsWriter(run_dir / METRICS_FILE, fields) if dist.main else None
        if dist.main:
            _announce(trainee, plan, len(store.vocab), precision)
        limits = Limits(steps=tc.max_steps if max_steps is None else max_steps,
                        seconds=max_minutes * 60 if max_minutes is not None else None,  # setup included
                        start=start_time)
        try:
            last = run_steps(trainee, state, limits, validation, metrics, progress)
            return finish(trainee, state, last, validation, metrics)
        except Exception as exc:  # a checkpoint found the disk full (safetensors and torch word it their own way)
            if not disk_full(exc, run_dir):
                raise
            raise UserError(f"{run_dir}: no space left on the device while writing the run at step {state['step']}; "
                            "free some space there and continue it with --resume (the run keeps its last complete "
                            "checkpoint)") from None


def _model_optimizer_state(config: RunConfig, train_split, vocab_size: int, run_dir: Path, resume: bool,
                           device: torch.device):
    """(model on ``device``, optimizer, moving average of the weights (None without ``train.ema_decay``), state): a
    new model with its output bias at the code-frequency baseline, or, with ``resume``, everything from the
    checkpoint (metrics rows after it are dropped). A run stopped before
    its first checkpoint resumes as a new model with the run's config: from step 0, as it started."""
    tc = config.train
    restore = resume and has_checkpoint(run_dir)
    if resume and not restore:
        print(f"nextvisit pretrain: {run_dir} has no checkpoint yet (stopped before its first); starting it again "
              f"at step 0 with its {CONFIG_FILE}", file=sys.stderr)
        truncate_metrics(run_dir / METRICS_FILE, 0)
    torch.manual_seed(tc.seed)
    model = NextVisitModel(config.model).to(device)
    if model.output_bias is not None and not restore:
        share = target_visit_share(train_split, vocab_size)
        with torch.no_grad():
            model.output_bias.copy_(torch.from_numpy(best_constant_logits(share, config.loss)).float())
    if model.visit_time is not None and not restore:
        with torch.no_grad():
            model.visit_time.bias.copy_(torch.from_numpy(
                constant_hazard_logits(train_gap_counts(train_split, config.model.visit_time_edges))).float())
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    ema = moving_average(model, tc.ema_decay)
    state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "elapsed_s": 0.0}
    if restore:
        state = load_checkpoint(run_dir, model, optimizer, ema)
        truncate_metrics(run_dir / METRICS_FILE, state["step"])
    return model, optimizer, ema, state


def train_gap_counts(split, edges) -> np.ndarray:
    """``gap_bin_counts`` of the days between consecutive visits of each subject of a store split (the visit-time
    head's targets), read block by block (``split_blocks``)."""
    counts = np.zeros(len(edges) + 1, np.int64)
    for block in split_blocks(split):
        gaps = np.diff(block.visit_days.astype(np.int64))
        same_subject = np.ones(len(gaps), bool)
        crossing = block.subject_visits[1:-1] - 1  # the step from one subject's last visit to the next subject's first
        same_subject[crossing[(crossing >= 0) & (crossing < len(gaps))]] = False
        counts += gap_bin_counts(gaps[same_subject], edges)
    return counts


def _announce(trainee: Trainee, plan: TrainingPlan, vocab_size: int, precision: str) -> None:
    config, dist = trainee.config, trainee.dist
    print(f"nextvisit pretrain: {trainee.model.n_parameters() / 1e6:.2f}M parameters, vocabulary "
          f"{vocab_size} ({trainee.n_supervised} predicted), {plan.n_contexts(0)} contexts of "
          f"{config.data.context} tokens per epoch ({plan.skipped_single_visit} single-visit subjects have no "
          f"target; {plan.truncated_visits} visits longer than {visit_cap(plan.max_window)} tokens truncated, "
          f"{plan.truncated_tokens} tokens)"
          + (f", {plan.queries_by_epoch.get(0, 0):,} horizon queries in epoch 0" if plan.horizon_queries else "")
          + (f", history summary of up to {plan.summary.max_tokens} tokens" if plan.summary else "")
          + (f", visit-time head ({len(config.model.visit_time_edges)} gap bins, loss weight "
             f"{config.loss.visit_time_weight:g})" if config.model.visit_time_head else "")
          + f", {precision}, {trainee.device}"
          + (f" ({torch.get_num_threads()} threads)" if trainee.device.type == "cpu" else "")
          + f", {dist.world} process(es)",
          file=sys.stderr)


def pretrain(store_path: Path, run_dir: Path, preset: str = "tiny", config: Path | dict | None = None,
             resume: bool = False, max_minutes: float | None = None, max_steps: int | None = None,
             device_name: str | None = None, progress: bool = True) -> dict:
    """``nextvisit pretrain``: the preset with ``config``'s overrides (a YAML file or a mapping of its sections,
    docs/model.md), or with ``resume`` the run's own config.yaml, trained by ``train``. Returns the final
    metrics row."""
    if resume and config is not None:
        raise UserError(f"--config does not apply to --resume: the run continues with {Path(run_dir) / 'config.yaml'} "
                        f"(edit that file to change, e.g., train.max_steps)")
    resolved = resolve(preset, config) if not resume else RunConfig()
    final = train(store_path, run_dir, resolved, resume=resume, max_minutes=max_minutes, max_steps=max_steps,
                  device_name=device_name, progress=progress)
    shutdown()
    return final


def run_cli(args) -> int:
    """`nextvisit pretrain STORE --out RUN [--preset P] [--config YAML] [--resume] [--max-minutes M]
    [--max-steps N]`."""
    pretrain(args.store, args.out, args.preset, args.config, resume=args.resume, max_minutes=args.max_minutes,
             max_steps=args.max_steps, device_name=args.device)
    return 0
