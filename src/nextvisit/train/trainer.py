"""`nextvisit pretrain`: train the next-visit model on a token store (the run folder: ``nextvisit.model.run``).

One optimizer step consumes ``train.batch_contexts`` packed contexts of the train split, split over the
processes of a distributed run (torchrun, DDP) and over gradient-accumulation micro-batches of
``train.micro_batch`` contexts. The loss of a step is normalised by the step's global number of SEP
positions, so 1 process with accumulation and P processes give the same gradient.

Run folder (docs/interfaces.md §4): config.yaml, vocab.json, tokenizer.yaml, lab_stats.parquet, model.safetensors
(latest good weights), checkpoint/ (weights, optimizer, RNG, data position), metrics.csv.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from nextvisit.config import RunConfig, resolve
from nextvisit.errors import UserError
from nextvisit.model.losses import (ValidationTotals, band_names, best_constant_logits, frequency_bands,
                              next_visit_loss_from_hidden)
from nextvisit.model.transformer import NextVisitModel
from nextvisit.model.sequence import PAD_MULTIPLE, TrainingPlan, visit_cap
from nextvisit.model.optim import make_optimizer, warmup_cosine
from nextvisit.model.run import (CHECKPOINT, WEIGHTS_FILE, autocast_for, copy_tokenizer_files, load_weights,
                                 save_weights)
from nextvisit.tokenize.store import TokenStore, Vocabulary
from nextvisit.artifacts.folders import atomic_write

METRIC_FIELDS = ["step", "epoch", "tokens", "lr", "loss", "grad_norm", "tokens_per_s", "elapsed_s"]


# -- distributed helpers ------------------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, value: float, device) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self):
        if self.active:
            torch.distributed.barrier()


def _init_distributed(device_name: str | None) -> tuple[Distributed, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return Distributed(), torch.device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return Distributed(rank, world, local), device


# -- schedule ----------------------------------------------------------------------------------------------------

def learning_rate(step: int, config) -> float:
    """Linear warm-up to ``lr``, cosine to ``min_lr`` over ``decay_steps``, then flat.

    >>> from nextvisit.config import TrainConfig
    >>> c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=100)
    >>> learning_rate(0, c), learning_rate(9, c), learning_rate(60, c), learning_rate(500, c)
    (0.1, 1.0, 0.55, 0.1)
    """
    progress = (step - config.warmup_steps) / max(1, config.decay_steps)
    return warmup_cosine(step, progress, config.lr, config.min_lr, config.warmup_steps)


# -- token statistics --------------------------------------------------------------------------------------------

def target_visit_share(split, vocab_size: int) -> np.ndarray:
    """Share of train visits after a subject's first (those that are targets) holding each token."""
    visit_tokens = np.asarray(split.visit_tokens)
    subject_visits = np.asarray(split.subject_visits)
    tokens = np.asarray(split.tokens)
    first_visits = subject_visits[:-1][np.diff(subject_visits) > 0]
    # the first visit of each subject is never a target: mark its token range (+1 at start, -1 at end)
    edges = np.zeros(len(tokens) + 1, np.int64)
    np.add.at(edges, visit_tokens[first_visits], 1)
    np.add.at(edges, visit_tokens[first_visits + 1], -1)
    in_first_visit = np.cumsum(edges[:-1]) > 0
    counts = np.bincount(tokens[~in_first_visit], minlength=vocab_size).astype(np.float64)
    n_target_visits = len(visit_tokens) - 1 - len(first_visits)
    return counts / max(n_target_visits, 1)


# -- checkpoints --------------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, model, optimizer, state: dict) -> None:
    """Write checkpoint/ atomically (a complete folder replaces the old one) and model.safetensors."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    final, old = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    save_weights(model, run_dir / WEIGHTS_FILE)


def load_checkpoint(run_dir: Path, model, optimizer) -> dict:
    folder = run_dir / CHECKPOINT
    if not folder.exists() and (run_dir / (CHECKPOINT + ".old")).exists():
        folder = run_dir / (CHECKPOINT + ".old")  # interrupted between the two renames
    if not (folder / "state.json").exists():
        raise UserError(f"{run_dir}: no checkpoint to resume from; start without --resume")
    load_weights(model, folder / WEIGHTS_FILE)
    try:
        extra = torch.load(folder / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(extra["optimizer"])
        state = json.loads((folder / "state.json").read_text())
    except Exception as exc:  # any unreadable part means the checkpoint cannot be trusted
        raise UserError(f"{folder}: corrupt checkpoint ({type(exc).__name__}: {exc}); start a new run") from None
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state


# -- the run -----------------------------------------------------------------------------------------------------

def _prepare_run_dir(run_dir: Path, store: TokenStore, config: RunConfig, resume: bool) -> RunConfig:
    vocab_path = run_dir / "vocab.json"
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir}: no config.yaml; nothing to resume (start without --resume)")
        config = RunConfig.load(run_dir / "config.yaml")
        if not vocab_path.exists() or Vocabulary.load(vocab_path).tokens != store.vocab.tokens:
            raise UserError(f"{run_dir}: the run's vocabulary differs from the store {store.path}'s; resume with the "
                            f"store it was trained on, or start a new run folder")
        return config
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir}: folder is not empty; use --resume to continue that run or choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(store.path, run_dir)
    config.model.vocab_size = len(store.vocab)
    config.save(run_dir / "config.yaml")
    return config


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_large_buffers_in_the_heap() -> bool:
    """On glibc, serve allocations up to 32 MiB from the heap and keep up to 512 MiB of freed heap memory.

    A training step on CPU allocates and frees the same tensors of 1-30 MiB every step (activations, the
    embedding gradient, the head's chunks). By default glibc maps the first of them with ``mmap`` and, as its
    thresholds adapt, trims freed memory at the top of the heap back to the system, so pages are faulted in
    and zeroed again step after step; that showed as system time in the profile. A fixed mmap threshold of
    32 MiB (glibc's maximum) and a 512 MiB trim threshold keep the blocks for reuse, at the price of up to
    512 MiB of freed memory the process keeps. Measured on 2 cores: ``tiny`` at 42,343 tokens, 9.4k -> 11.2k
    tokens/s (before the fused head; docs/model.md). Returns whether the setting was applied (False on other
    C libraries; nothing changes there).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024))


def train(store_path: Path, run_dir: Path, config: RunConfig, resume: bool = False, max_minutes: float | None = None,
          device_name: str | None = None, progress: bool = True) -> dict:
    """Train (or continue) a run. Returns the final metrics row."""
    start_time = time.monotonic()
    dist, device = _init_distributed(device_name)
    if device.type == "cpu":
        keep_large_buffers_in_the_heap()
    store = TokenStore(store_path)
    run_dir = Path(run_dir)
    if dist.main:
        config = _prepare_run_dir(run_dir, store, config, resume)
    dist.barrier()
    if not dist.main:
        config = RunConfig.load(run_dir / "config.yaml")
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    vocab = store.vocab
    supervised_np = vocab.supervised_mask()
    try:
        if not supervised_np.any():
            raise UserError(f"{store.path}/vocab.json: no code or lab tokens to predict")
        train_split = store.split("train")
        if len(train_split) == 0:
            raise UserError(f"{store.path}: the train split is empty")
        plan = TrainingPlan(train_split, supervised_np, config.data.context, config.data.pack,
                            config.data.max_window_fraction, tc.seed, pad_multiple=_pad_multiple(config))
        contexts_per_epoch = plan.n_contexts(0)
        if contexts_per_epoch == 0:
            raise UserError(f"{store.path}: no train subject has two visits; nothing to learn from")
    except UserError:
        if dist.main and not resume:  # the folder was empty or absent: leave no half-made run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    torch.manual_seed(tc.seed)
    model = NextVisitModel(config.model).to(device)
    if model.output_bias is not None and not resume:
        share = target_visit_share(train_split, len(vocab))
        with torch.no_grad():
            model.output_bias.copy_(torch.from_numpy(best_constant_logits(share, config.loss)).float())
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume:
        state = load_checkpoint(run_dir, model, optimizer)
        _truncate_metrics(run_dir / "metrics.csv", state["step"])
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    supervised = torch.from_numpy(supervised_np).to(device)
    n_supervised = int(supervised_np.sum())
    autocast, precision = autocast_for(tc.precision, device)

    validation = _Validation(store, plan, config, supervised_np, device, autocast) if dist.main else None
    names = band_names(config.loss.frequency_band_edges)
    fields = METRIC_FIELDS + ["val_loss", "val_loss_frequency_baseline", "val_new_onset_auroc",
                              "val_new_onset_auroc_frequency_baseline", "val_new_onset_pos_loss", "val_repeat_pos_loss",
                              "val_new_onset_targets", "val_repeat_targets"] + [f"val_loss_band[{n}]" for n in names]
    metrics = _MetricsWriter(run_dir / "metrics.csv", fields) if dist.main else None
    if dist.main:
        print(f"nextvisit pretrain: {model.n_parameters() / 1e6:.2f}M parameters, vocabulary {len(vocab)} "
              f"({n_supervised} predicted), {contexts_per_epoch} contexts of {config.data.context} tokens per epoch "
              f"({plan.skipped_single_visit} single-visit subjects have no target; {plan.truncated_visits} visits "
              f"longer than {visit_cap(plan.max_window)} tokens truncated, {plan.truncated_tokens} tokens), "
              f"{precision}, {device}, "
              f"{dist.world} process(es)", file=sys.stderr)

    budget_s = max_minutes * 60 if max_minutes is not None else None  # this invocation's time, setup included
    previous_elapsed = state["elapsed_s"]
    bar = tqdm(total=tc.max_steps, initial=state["step"], disable=not (progress and dist.main), desc="pretrain",
               unit="step", file=sys.stderr, dynamic_ncols=True,
               # the postfix carries the ETA, which also honours --max-minutes
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")
    window_tokens, window_start = 0, time.monotonic()
    last = {}
    try:
        while state["step"] < tc.max_steps:
            stop = budget_s is not None and time.monotonic() - start_time >= budget_s
            if dist.active:
                stop = dist.all_sum(float(stop), device) > 0
            if stop:
                break
            step = state["step"]
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = _step_micro_batches(plan, state, tc.batch_contexts, tc.micro_batch, dist)
            n_seps = dist.all_sum(float(sum(len(b.positions) for b in micro)), device)
            normalizer = n_seps * n_supervised / dist.world  # DDP averages gradients over processes
            ddp_model.train()
            loss_sum, tokens = 0.0, 0
            try:
                for k, batch in enumerate(micro):
                    batch = batch.to(device)
                    sync = k == len(micro) - 1
                    context = ddp_model.no_sync() if (dist.active and not sync) else nullcontext()
                    with context:
                        with autocast():
                            hidden = ddp_model(batch.tokens, batch.days, batch.att_days, batch.doc_ids, batch.positions,
                                               head=False)
                            # the tied head runs inside the loss, chunk by chunk over the vocabulary
                            loss = next_visit_loss_from_hidden(
                                hidden, model.embed.weight, model.output_bias, batch.target_rows, batch.target_tokens,
                                batch.target_repeats, supervised, config.loss, normalizer=max(normalizer, 1.0))
                        loss.backward()
                    loss_sum += float(loss.detach())
                    tokens += batch.n_tokens
            except RuntimeError as exc:
                if "memory" in str(exc).lower() or "alloc" in str(exc).lower():
                    raise UserError(f"out of memory at step {step} with train.micro_batch {tc.micro_batch}; lower "
                                    f"train.micro_batch (gradient accumulation keeps the step size); the last "
                                    f"checkpoint in {run_dir / CHECKPOINT} is kept") from None
                raise
            step_loss = dist.all_sum(loss_sum, device) / dist.world
            if not math.isfinite(step_loss):
                raise UserError(f"loss is {step_loss} at step {step}; training stopped. The last good weights are in "
                                f"{run_dir / CHECKPOINT} (step {_checkpoint_step(run_dir)}); lower train.lr or use "
                                f"train.precision fp32, then --resume")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens = int(dist.all_sum(float(tokens), device))
            state["step"] = step + 1
            state["tokens"] += tokens
            window_tokens += tokens
            bar.update(1)

            now = time.monotonic()
            state["elapsed_s"] = previous_elapsed + now - start_time
            row = None
            if state["step"] % tc.log_every == 0 or state["step"] == tc.max_steps:
                rate = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                row = {"step": state["step"], "epoch": state["epoch"], "tokens": state["tokens"], "lr": f"{lr:.3e}",
                       "loss": f"{step_loss:.6f}", "grad_norm": f"{grad_norm:.4f}", "tokens_per_s": f"{rate:.0f}",
                       "elapsed_s": f"{state['elapsed_s']:.1f}"}
                eta = (tc.max_steps - state["step"]) / max(bar.format_dict.get("rate") or 1e-9, 1e-9)
                if budget_s is not None:
                    eta = min(eta, budget_s - (now - start_time))
                bar.set_postfix_str(f"loss {step_loss:.4f} {rate:,.0f} tok/s eta {max(eta, 0) / 60:.1f} min")
            if state["step"] % tc.eval_every == 0 and dist.main:
                row = row or {"step": state["step"], "epoch": state["epoch"], "tokens": state["tokens"],
                              "lr": f"{lr:.3e}", "loss": f"{step_loss:.6f}", "grad_norm": f"{grad_norm:.4f}",
                              "elapsed_s": f"{state['elapsed_s']:.1f}"}
                row.update(validation.run(model))
            if row is not None and dist.main:
                metrics.write(row)
                last = row
            if state["step"] % tc.checkpoint_every == 0:
                if dist.main:
                    save_checkpoint(run_dir, model, optimizer, state)
                dist.barrier()
    finally:
        bar.close()
    # final: validation (unless just done) and a checkpoint
    if dist.main:
        if not last or last.get("step") != state["step"] or "val_loss" not in last:
            row = {"step": state["step"], "epoch": state["epoch"], "tokens": state["tokens"],
                   "elapsed_s": f"{state['elapsed_s']:.1f}"}
            row.update(validation.run(model))
            metrics.write(row)
            last = row
        save_checkpoint(run_dir, model, optimizer, state)
        print(f"nextvisit pretrain: step {state['step']}, {state['tokens']:,} tokens in {state['elapsed_s'] / 60:.1f} min; "
              f"validation loss {float(last['val_loss']):.5f} (code-frequency baseline "
              f"{float(last['val_loss_frequency_baseline']):.5f}), new-onset AUROC "
              f"{float(last['val_new_onset_auroc']):.3f} (baseline {float(last['val_new_onset_auroc_frequency_baseline']):.3f}); "
              f"run in {run_dir}", file=sys.stderr)
    dist.barrier()
    return last


def _pad_multiple(config: RunConfig) -> int:
    """FlexAttention compiles once per shape: give it full contexts. SDPA takes any width."""
    return config.data.context if config.model.attention == "flex" else PAD_MULTIPLE


def _checkpoint_step(run_dir: Path):
    path = run_dir / CHECKPOINT / "state.json"
    return json.loads(path.read_text())["step"] if path.exists() else "none yet"


def _step_micro_batches(plan: TrainingPlan, state: dict, batch_contexts: int, micro_batch: int, dist: Distributed):
    """This process's micro-batches of the next step; advances the data position (epoch, index)."""
    chosen = []  # (epoch, context index)
    epoch, index = state["epoch"], state["index"]
    while len(chosen) < batch_contexts:
        n = plan.n_contexts(epoch)
        take = min(batch_contexts - len(chosen), n - index)
        chosen += [(epoch, i) for i in range(index, index + take)]
        index += take
        if index >= n:
            epoch, index = epoch + 1, 0
    state["epoch"], state["index"] = epoch, index
    mine = chosen[dist.rank :: dist.world]
    batches = []
    for k in range(0, len(mine), micro_batch):
        part = mine[k : k + micro_batch]
        by_epoch = {}
        for e, i in part:
            by_epoch.setdefault(e, []).append(i)
        for e, indices in by_epoch.items():
            batches.append(plan.batch(e, indices))
    return batches


class _Validation:
    """A fixed set of tuning contexts, scored without repeat decay, against the code-frequency baseline."""

    def __init__(self, store, train_plan, config: RunConfig, supervised_np, device, autocast):
        self.config, self.device, self.autocast = config, device, autocast
        split = store.split("tuning")
        if len(split) == 0:
            split = store.split("train")
            print(f"nextvisit pretrain: {store.path}/tuning is empty; validating on train contexts", file=sys.stderr)
        plan = TrainingPlan(split, supervised_np, config.data.context, config.data.pack,
                            config.data.max_window_fraction, seed=config.train.seed + 1,
                            pad_multiple=_pad_multiple(config))
        n = plan.n_contexts(0)
        n = n if config.train.eval_contexts == 0 else min(n, config.train.eval_contexts)
        mb = config.train.micro_batch
        self.batches = [plan.batch(0, range(i, min(i + mb, n))) for i in range(0, n, mb)]
        vocab_size = config.model.vocab_size
        share = target_visit_share(store.split("train"), vocab_size)
        bands = frequency_bands(share, config.loss.frequency_band_edges)
        self.names = band_names(config.loss.frequency_band_edges)
        self.token_band = torch.from_numpy(bands).to(device)
        self.supervised = torch.from_numpy(supervised_np).to(device)
        # the fairest constant predictor: per token, the logit minimising this loss at its train visit rate
        self.baseline_logits = torch.from_numpy(best_constant_logits(share, config.loss)).float().to(device)
        self.baseline = self._score(lambda batch: self.baseline_logits.expand(len(batch.positions), -1))

    def _score(self, logits_of) -> dict:
        totals = ValidationTotals(n_bands=len(self.names))
        for batch in self.batches:
            batch = batch.to(self.device)
            totals.add(logits_of(batch), batch, self.supervised, self.token_band, self.config.loss)
        return totals.summary(self.names)

    @torch.no_grad()
    def run(self, model) -> dict:
        was_training = model.training
        model.eval()

        def logits_of(batch):
            with self.autocast():
                return model.query_logits(batch).float()

        result = self._score(logits_of)
        model.train(was_training)
        result["val_loss_frequency_baseline"] = self.baseline["val_loss"]
        result["val_new_onset_auroc_frequency_baseline"] = self.baseline["val_new_onset_auroc"]
        return {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in result.items()}


class _MetricsWriter:
    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=fields).writeheader()

    def write(self, row: dict):
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(row)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after the checkpoint's step: a resumed run recomputes them."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    atomic_write(path, lambda p: p.write_text("".join(",".join(_csv_cell(c) for c in r) + "\n" for r in kept)))


def _csv_cell(cell: str) -> str:
    return f'"{cell}"' if ("," in cell or '"' in cell) else cell


def run_cli(args) -> int:
    """`nextvisit pretrain STORE --out RUN [--preset P] [--config YAML] [--resume] [--max-minutes M]`."""
    if args.resume and args.config is not None:
        raise UserError(f"--config does not apply to --resume: the run continues with {args.out / 'config.yaml'} "
                        f"(edit that file to change, e.g., train.max_steps)")
    config = resolve(args.preset, args.config) if not args.resume else RunConfig()
    train(args.store, args.out, config, resume=args.resume, max_minutes=args.max_minutes, device_name=args.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
