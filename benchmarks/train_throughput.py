"""Training throughput of the next-visit model against a naive reference, and the machine's matmul peak.

    .venv/bin/python -m benchmarks.train_throughput                      # tiny and small, vocab 42,343 and 2,000
    .venv/bin/python -m benchmarks.train_throughput --presets tiny --vocab 42343 --steps 5
    .venv/bin/python -m benchmarks.train_throughput --attention          # SDPA, matmul and FlexAttention kernels

For each (preset, vocabulary) it prints training tokens/s (forward, loss, backward, AdamW step) and the
achieved model FLOP/s (the same analytic count for both implementations: the work the objective needs, i.e.
matmuls of the layers and attention scores and values over each token's own document, the last layer only
where its outputs are read (keys and values everywhere, the rest at SEP positions), and the output head
where the loss lives), next to the measured float32 and bfloat16 matmul peaks of this machine in the same
run. Tokens/s are medians over all timed steps, and each speedup comes with the lowest and highest speedup
of a single round. The implementations take turns step by step (each with its own model and optimizer), so
the machine's state (clock speed under sustained load, neighbours) touches all of them alike. The naive
reference is written here on purpose: a dense float mask rebuilt in every layer, unfused attention (explicit
softmax), and the head, sigmoid and focal loss at every position (batch x positions x vocabulary), masked to
SEP positions afterwards. "ours" is the trainer's step (hidden states at SEP positions, the head fused into the loss).

Batches are real packed contexts (``nextvisit.model.sequence.TrainingPlan``) of a synthetic store shaped like the
paper's data (about 11 tokens per visit, ~40 visits per subject, codes drawn from a Zipf law).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like standard modules (tokenize.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np
import torch
import torch.nn.functional as F

from nextvisit.config import LossConfig, preset
from nextvisit.model.fused_head import next_visit_loss_from_hidden
from nextvisit.model.transformer import LayerMask, NextVisitModel, apply_rotary, attention_allowed, rotary_tables
from nextvisit.model.sequence import TrainingPlan
from nextvisit.tokenize.store import SPECIAL_TOKENS, SplitWriter, TokenStore, Vocabulary, write_store_info
from nextvisit.model.optim import make_optimizer
from nextvisit.model.run import autocast_for
from nextvisit.train.memory import keep_large_buffers_in_the_heap

PAPER_VOCAB = 42_343  # paper: vocabulary size
TOKENS_PER_VISIT = 11  # paper: 11.2 tokens per visit on average


def _optimizer(model):
    """The trainer's optimizer with the tiny preset's settings."""
    train = preset("tiny").train
    return make_optimizer(model, train.lr, train.weight_decay, (train.beta1, train.beta2))


def synthetic_store(folder: Path, vocab_size: int, n_subjects: int, seed: int = 0) -> TokenStore:
    n_age = 20
    tokens = list(SPECIAL_TOKENS) + [f"AGE//{i}" for i in range(n_age)]
    tokens += [f"CODE//{i}" for i in range(vocab_size - len(tokens))]
    kinds = ["special"] * len(SPECIAL_TOKENS) + ["age"] * n_age + ["code"] * (vocab_size - len(SPECIAL_TOKENS) - n_age)
    vocab = Vocabulary(tokens, kinds)
    folder.mkdir(parents=True, exist_ok=True)
    vocab.save(folder / "vocab.json")
    rng = np.random.default_rng(seed)
    first_code = len(SPECIAL_TOKENS) + n_age
    writer = SplitWriter(folder / "train")
    for s in range(n_subjects):
        n_visits = int(np.clip(rng.geometric(1 / 38), 2, 400))
        lengths = np.clip(rng.poisson(TOKENS_PER_VISIT - 1, size=n_visits), 1, 60) + 1
        codes = first_code + np.minimum(rng.zipf(1.3, size=int(lengths.sum())) - 1, vocab_size - first_code - 1)
        days = np.cumsum(rng.integers(1, 120, size=n_visits))
        writer.append(s, 0, days, lengths, codes)
    sizes = {"train": writer.close()}
    for split in ("tuning", "held_out"):
        sizes[split] = SplitWriter(folder / split).close()
    write_store_info(folder, sizes, vocab_size)
    return TokenStore(folder)


def matmul_peak(dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on this machine (all threads torch uses)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops(model_config, batch) -> float:
    """Analytic FLOPs of one training step (forward + backward = 3x forward) for the real batch: the work the
    objective needs, whichever implementation does it. Layer matmuls per real token and attention over each
    token's own document, except in the last layer, whose outputs are read at SEP positions only: there keys
    and values for every token, and queries, attention, projection and MLP for the SEP positions; then the head
    at SEP positions."""
    d, L, V = model_config.d_model, model_config.n_layers, model_config.vocab_size
    tokens, n_seps = batch.n_tokens, len(batch.positions)
    layer_matmul = 2 * (4 * d * d + 2 * model_config.mlp_ratio * d * d)  # qkv + proj + MLP, per token
    doc_sizes, sep_doc_sizes = [], []
    positions = torch.sort(batch.positions).values
    seps_of_row = torch.bincount(positions // batch.tokens.shape[1], minlength=batch.tokens.shape[0])
    for row, seps in zip(batch.doc_ids, positions.split(seps_of_row.tolist())):
        sizes = torch.bincount(row[row > 0])
        doc_sizes += sizes.tolist()
        sep_doc_sizes += sizes[row[seps % batch.tokens.shape[1]]].tolist()
    attention = sum(2 * 2 * n * n * d for n in doc_sizes)  # scores and values within each document
    last_layer = tokens * 2 * 2 * d * d + n_seps * (layer_matmul - 2 * 2 * d * d) + \
        sum(2 * 2 * n * d for n in sep_doc_sizes)
    head = 2 * n_seps * d * V
    return 3 * ((L - 1) * (tokens * layer_matmul + attention) + last_layer + head)


# -- the naive reference ------------------------------------------------------------------------------------------

def naive_step(model: NextVisitModel, batch, supervised: torch.Tensor, loss_config: LossConfig) -> torch.Tensor:
    """Same weights and objective, written the straightforward way."""
    config = model.config
    B, T = batch.tokens.shape
    H, d = config.n_heads, config.d_model // config.n_heads
    cos, sin = rotary_tables(batch.days, d, config.rope_base)
    x = model.embed(batch.tokens)
    for block in model.blocks:
        # dense float mask rebuilt per layer
        allowed = (batch.doc_ids[:, :, None] == batch.doc_ids[:, None, :]) & (batch.doc_ids[:, :, None] > 0) & \
            (batch.att_days[:, :, None] >= batch.att_days[:, None, :])
        allowed = allowed | torch.eye(T, dtype=torch.bool)
        float_mask = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], float("-inf"))
        h = block.ln_attn(x)
        q, k, v = block.attn.qkv(h).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + float_mask
        y = torch.softmax(scores, dim=-1) @ v
        x = x + block.attn.proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.fc_out(F.gelu(block.fc(block.ln_mlp(x))))
    logits = model.ln_final(x) @ model.embed.weight.T  # [B, T, V] at every position
    target = torch.zeros(B * T, logits.shape[-1])
    weight = torch.ones(B * T, logits.shape[-1])
    rows = batch.positions[batch.target_rows]
    target[rows, batch.target_tokens] = 1.0
    weight[rows, batch.target_tokens] = torch.clamp(
        loss_config.repeat_decay ** batch.target_repeats.float(), min=loss_config.repeat_floor)
    logits = logits.reshape(B * T, -1).float()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = loss_config.alpha * target + (1 - loss_config.alpha) * (1 - target)
    focal = alpha_t * (1 - p_t) ** loss_config.gamma * bce * weight
    is_sep = torch.zeros(B * T, 1)
    is_sep[batch.positions] = 1.0
    loss = (focal * is_sep * supervised.float()).sum() * loss_config.scale
    return loss / (len(batch.positions) * supervised.sum())


def fast_step(model, batch, supervised, loss_config):
    """The trainer's step: hidden states at SEP positions, then the tied head fused into the loss."""
    hidden = model(batch.tokens, batch.days, batch.att_days, batch.doc_ids, batch.positions, head=False)
    return next_visit_loss_from_hidden(hidden, model.embed.weight, model.output_bias, batch.target_rows,
                                       batch.target_tokens, batch.target_repeats, supervised, loss_config)


def time_training(model, batches, supervised, loss_config, step_fn, autocast,
                  steps: int) -> tuple[list[float], float]:
    """(seconds of each timed step, tokens per step) after one warm-up step, always on the same batch so every
    step does the same work."""
    optimizer = _optimizer(model)
    times = []
    batch = batches[0]
    for i in range(steps + 1):
        t = time.perf_counter()
        with autocast():
            loss = step_fn(model, batch, supervised, loss_config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return times, float(batch.n_tokens)


class Runner:
    """One implementation in one precision with its own model and optimizer; ``step`` trains one step and
    returns its seconds."""

    def __init__(self, impl, precision, model, optimizer, step_fn, autocast):
        self.impl, self.precision, self.model, self.optimizer = impl, precision, model, optimizer
        self.step_fn, self.autocast = step_fn, autocast

    def step(self, batch, supervised, loss_config) -> float:
        t = time.perf_counter()
        with self.autocast():
            loss = self.step_fn(self.model, batch, supervised, loss_config)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def run_throughput(args):
    # the trainer does this on CPU; both implementations run under the same allocator setting
    heap = keep_large_buffers_in_the_heap()
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    peaks = {"fp32": [peak32], "bf16": [peak16]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul peak: "
          f"fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s; "
          f"large buffers kept in the heap: {'yes' if heap else 'no'}")
    print(f"tokens/s: median over {args.rounds} rounds x {args.steps} steps, the implementations taking turns "
          f"step by step; %fp32pk: share of the fp32 matmul peak, %ownpk: of the peak in the row's precision; "
          f"rounds: the lowest and highest speedup of a single round; "
          f"ceiling: the speedup over naive if the row ran at 100% of its precision's peak")
    print(f"{'preset':6} {'vocab':>6} {'impl':6} {'prec':4} {'ctx x B':>8} {'tok/s':>8} {'GFLOP/s':>8} "
          f"{'%fp32pk':>7} {'%ownpk':>6} {'speedup':>7} {'rounds':>12} {'ceiling':>7}")
    for vocab_size in args.vocab:
        with tempfile.TemporaryDirectory() as tmp:
            store = synthetic_store(Path(tmp) / "store", vocab_size, n_subjects=args.subjects)
            supervised = torch.from_numpy(store.vocab.supervised_mask())
            for name in args.presets:
                config = preset(name)
                config.model.vocab_size = vocab_size
                config.model.output_bias = False  # the reference has none
                contexts = args.contexts or config.train.micro_batch
                plan = TrainingPlan(store.split("train"), store.vocab.supervised_mask(), config.data.context,
                                    True, config.data.max_window_fraction, seed=0)
                batches = [plan.batch(0, range(i * contexts, (i + 1) * contexts)) for i in range(2)]
                flops, n_tokens = model_flops(config.model, batches[0]), batches[0].n_tokens
                # one model and optimizer per implementation, warmed up, then timed one step at a time in turn:
                # the CPU's clock falls under sustained load (compute-bound steps slowed by up to a third after a
                # minute here while memory-bound ones did not), so every implementation is measured side by side
                runners = []
                for impl, step_fn in (("naive", naive_step), ("ours", fast_step)):
                    for precision in args.precision:
                        autocast, used = autocast_for(precision, torch.device("cpu"))
                        if impl == "naive" and used != "fp32" and "fp32" in args.precision:
                            continue  # the reference runs in plain float32
                        if any((r.impl, r.precision) == (impl, used) for r in runners):
                            continue  # e.g. "auto" resolving to a precision already listed
                        torch.manual_seed(0)
                        model = NextVisitModel(config.model)
                        runner = Runner(impl, used, model, _optimizer(model), step_fn,
                                        autocast)
                        try:
                            runner.step(batches[0], supervised, config.loss)  # warm-up
                        except RuntimeError as exc:  # the naive head can exhaust memory at 42k
                            print(f"{name:6} {vocab_size:>6} {impl:6} {used:4} failed: {str(exc)[:80]}")
                            continue
                        runners.append(runner)
                step_times = {}  # (impl, precision) -> one list of step seconds per round
                for round_ in range(args.rounds):
                    peaks["fp32"].append(matmul_peak(torch.float32, repeats=3))
                    peaks["bf16"].append(matmul_peak(torch.bfloat16, repeats=3))
                    for runner in runners:
                        step_times.setdefault((runner.impl, runner.precision), []).append([])
                    for _ in range(args.steps):
                        for runner in runners:
                            step_times[runner.impl, runner.precision][-1].append(
                                runner.step(batches[0], supervised, config.loss))
                del runners
                rates = {key: n_tokens / float(np.median(sum(rounds, []))) for key, rounds in step_times.items()}
                naive = rates.get(("naive", "fp32"))
                for (impl, used), rate in rates.items():
                    achieved = flops / n_tokens * rate
                    own_peak = max(peaks[used])
                    speed = f"{rate / naive:.1f}x" if naive else ""
                    ceiling = f"{own_peak / (flops / n_tokens * naive):.1f}x" if naive else ""
                    spread = ""
                    if naive and impl != "naive":  # the speedup of each round alone (its steps' medians)
                        per_round = [float(np.median(base)) / float(np.median(own))
                                     for base, own in zip(step_times["naive", "fp32"], step_times[impl, used])]
                        spread = f"{min(per_round):.2f}-{max(per_round):.2f}x"
                    print(f"{name:6} {vocab_size:>6} {impl:6} {used:4} {config.data.context:>4}x{contexts:<3} "
                          f"{rate:>8.0f} {achieved / 1e9:>8.1f} {achieved / max(peaks['fp32']):>7.0%} "
                          f"{achieved / own_peak:>6.0%} {speed:>7} {spread:>12} {ceiling:>7}", flush=True)
    print(f"best matmul peaks over the run: fp32 {max(peaks['fp32']) / 1e9:.1f}, bf16 {max(peaks['bf16']) / 1e9:.1f} "
          f"GFLOP/s (each row's % columns divide by the best measured up to that row)")


def run_attention(args):
    """SDPA given the boolean mask in every layer, SDPA given one additive mask built per batch, the same mask
    with scores and softmax as plain batched matmuls, and compiled FlexAttention with one block mask per batch.
    Medians of ``--steps`` forward passes and training steps."""
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "store", 2000, n_subjects=args.subjects)
        supervised = torch.from_numpy(store.vocab.supervised_mask())
        print(f"{'preset':6} {'attention':9} {'prec':4} {'ctx x B':>8} {'fwd ms':>8} {'train tok/s':>11} {'first call s':>12}")
        for name in args.presets:
            config = preset(name)
            config.model.vocab_size = 2000
            contexts = args.contexts or config.train.micro_batch
            plan = TrainingPlan(store.split("train"), store.vocab.supervised_mask(), config.data.context, True,
                                config.data.max_window_fraction, seed=0)
            batches = [plan.batch(0, range(i * contexts, (i + 1) * contexts)) for i in range(2)]
            batches = [_pad_to(b, config.data.context) for b in batches]
            for attention in ("sdpa-bool", "sdpa", "matmul", "flex"):
                for precision in args.precision:
                    config.model.attention = "sdpa" if attention == "sdpa-bool" else attention
                    torch.manual_seed(0)
                    model = NextVisitModel(config.model)
                    if attention == "sdpa-bool":  # the boolean mask handed to every layer, converted by SDPA
                        model.attention_mask = lambda att_days, doc_ids: LayerMask(
                            attention_allowed(att_days, doc_ids)[:, None], [])
                    autocast, used = autocast_for(precision, torch.device("cpu"))
                    b = batches[0]
                    t = time.perf_counter()
                    try:
                        with torch.no_grad(), autocast():
                            model.query_logits(b)
                    except Exception as exc:  # compilation can fail on some CPUs / compilers
                        print(f"{name:6} {attention:9} {used:4} failed: {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    first = time.perf_counter() - t
                    times = []
                    with torch.no_grad(), autocast():
                        for _ in range(args.steps):
                            t = time.perf_counter()
                            model.query_logits(b)
                            times.append(time.perf_counter() - t)
                    try:
                        step_times, tokens = time_training(model, batches, supervised, config.loss, fast_step,
                                                           autocast, args.steps)
                        train_rate = f"{tokens / np.median(step_times):>11.0f}"
                    except NotImplementedError:  # torch 2.x: FlexAttention has no CPU backward
                        train_rate = f"{'no backward':>11}"
                    print(f"{name:6} {attention:9} {used:4} {config.data.context:>4}x{contexts:<3} "
                          f"{np.median(times) * 1e3:>8.1f} {train_rate} {first:>12.1f}", flush=True)


def _pad_to(batch, width: int):
    """Pad a batch to a fixed width (FlexAttention compiles once per shape)."""
    B, T = batch.tokens.shape
    if T == width:
        return batch
    pad = width - T

    def widen(t, value=0):
        return F.pad(t, (0, pad), value=value)

    rows, cols = batch.positions // T, batch.positions % T
    batch.tokens, batch.days = widen(batch.tokens), widen(batch.days)
    batch.att_days, batch.doc_ids = widen(batch.att_days), widen(batch.doc_ids)
    batch.positions = rows * width + cols
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[PAPER_VOCAB, 2000])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "auto"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up)")
    parser.add_argument("--contexts", type=int, default=8,
                        help="contexts per batch (default 8: the naive head at 42k tokens needs ~3 GB at 16 x 256)")
    parser.add_argument("--subjects", type=int, default=400, help="synthetic subjects")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurement rounds (the peaks are measured again in each); tokens/s is the median over "
                             "all steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attention", action="store_true", help="compare SDPA and FlexAttention instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (run_attention if args.attention else run_throughput)(args)


if __name__ == "__main__":
    main()
