"""Which kernels of a CPU training step give other bits at another thread count (docs/scale.md, "Reproducibility").

    .venv/bin/python -m benchmarks.thread_kernels STORE                       # tiny preset, default precision, 1 vs 2
    .venv/bin/python -m benchmarks.thread_kernels STORE --precision fp32 --threads 4

One optimizer step of the trainer (forward, fused head and loss, backward, gradient clipping, AdamW) on the first
step's micro-batches of STORE, run under a ``TorchDispatchMode`` that executes every ATen operation twice on the
same inputs: at one thread (its result is the one the step goes on with) and, on copies of the inputs, at
``--threads``. It prints each operation whose floating-point outputs (for an in-place operation: the tensors it
writes) differ, with how many of its calls differ and the largest difference. Operations that only allocate
(``empty``) or return views of such memory are left out: their bits are whatever memory held. The reference for
"no difference" is the same step run twice at one thread: every operation agrees (the script checks it first).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds scripts named like standard modules (tokenize.py): keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402

from nextvisit.config import preset  # noqa: E402
from nextvisit.model.distributed import Distributed  # noqa: E402
from nextvisit.model.optim import make_optimizer  # noqa: E402
from nextvisit.model.run import autocast_for  # noqa: E402
from nextvisit.model.transformer import NextVisitModel  # noqa: E402
from nextvisit.tokenize.store import TokenStore  # noqa: E402
from nextvisit.train.data import training_plan  # noqa: E402
from nextvisit.train.loop import Trainee, optimizer_step  # noqa: E402

# their outputs are uninitialised memory (or views of it), not results
UNINITIALISED = {"aten.empty.memory_format", "aten.new_empty.default", "aten.empty_like.default",
                 "aten.empty_strided.default"}
VIEWS = {"aten.slice.Tensor", "aten.select.int", "aten.transpose.int", "aten.view.default", "aten.t.default",
         "aten.permute.default", "aten.expand.default", "aten.unsqueeze.default", "aten.as_strided.default",
         "aten._unsafe_view.default", "aten.split.Tensor", "aten.unbind.int", "aten.alias.default"}


def _written(func, args, kwargs, out):
    """The tensors an operation produced: its outputs, or for an in-place / out= operation its arguments."""
    if func._schema.is_mutable:
        return [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def _largest_difference(first, second) -> float | None:
    """None when every floating-point tensor of ``first`` equals its counterpart bit for bit."""
    worst = None
    for a, b in zip(first, second):
        if a.is_floating_point() and not torch.equal(a, b):
            both = torch.isfinite(a) & torch.isfinite(b)
            gap = float((a[both].double() - b[both].double()).abs().max()) if both.any() else float("inf")
            worst = gap if worst is None else max(worst, gap)
    return worst


class TwoThreadCounts(TorchDispatchMode):
    """Runs each operation at ``threads`` on copies of its inputs, then at one thread on the inputs themselves."""

    def __init__(self, threads: int):
        super().__init__()
        self.threads = threads
        self.calls: Counter = Counter()
        self.differing: dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.calls[name] += 1
        if name in UNINITIALISED or name in VIEWS or torch.Tag.nondeterministic_seeded in func.tags:
            return func(*args, **kwargs)
        copied = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        other_args, other_kwargs = tree_map(copied, args), tree_map(copied, kwargs)
        torch.set_num_threads(self.threads)
        other = func(*other_args, **other_kwargs)
        torch.set_num_threads(1)
        out = func(*args, **kwargs)
        gap = _largest_difference(_written(func, args, kwargs, out), _written(func, other_args, other_kwargs, other))
        if gap is not None:
            self.differing.setdefault(name, []).append(gap)
        return out


def one_step(store: TokenStore, preset_name: str, precision: str, mode: TorchDispatchMode) -> None:
    """The trainer's first optimizer step of a new model (``train.seed``), under ``mode``."""
    config = preset(preset_name)
    config.model.vocab_size = len(store.vocab)
    config.train.precision = precision
    supervised = store.vocab.supervised_mask()
    _, plan = training_plan(store, config, supervised)
    torch.manual_seed(config.train.seed)
    model = NextVisitModel(config.model)
    tc = config.train
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    autocast, _ = autocast_for(precision, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as run_dir:
        trainee = Trainee(model, model, optimizer, plan, config, torch.from_numpy(supervised), int(supervised.sum()),
                          autocast, Distributed(), torch.device("cpu"), Path(run_dir))
        state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "elapsed_s": 0.0}
        with mode:
            optimizer_step(trainee, state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="a token store (nextvisit tokenize)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="the thread count compared with one (default 2)")
    args = parser.parse_args(argv)
    store = TokenStore(args.store)
    torch.set_num_threads(1)
    same = TwoThreadCounts(1)
    one_step(store, args.preset, args.precision, same)
    assert not same.differing, f"the same step at one thread twice differs: {sorted(same.differing)}"
    probe = TwoThreadCounts(args.threads)
    one_step(store, args.preset, args.precision, probe)
    _, precision = autocast_for(args.precision, torch.device("cpu"))
    print(f"preset {args.preset}, {precision}: {sum(probe.calls.values())} operation calls of "
          f"{len(probe.calls)} kinds; at 1 thread twice: none differs; 1 vs {args.threads} threads:")
    for name, gaps in sorted(probe.differing.items()):
        print(f"  {name}: {len(gaps)} of {probe.calls[name]} calls differ, largest difference {max(gaps):.2g}")
    if not probe.differing:
        print("  none differs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
