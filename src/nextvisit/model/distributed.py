"""The processes of a distributed run (``torchrun``, one or many nodes): this process's rank and world, and the
few collectives that pretraining (DDP) and forecasting (label rows sharded over processes) use. Outside torchrun
(``WORLD_SIZE`` unset or 1) every collective is a no-op on one process.

Both stages keep one rule for their output folders: process 0 owns the folder and its lock
(``nextvisit.artifacts.folders``); the other processes never write there. A step that may fail on one process
only (a check of ``--out``, the tokenizing of that process's histories) runs inside ``together()``, so that it
fails on every process, with the failing one's message, instead of leaving the others waiting in the next
collective.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from nextvisit.errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where this backend's collectives take their tensors

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def part(self, n: int) -> slice:
        """This process's contiguous share of ``n`` items (shares differ by at most one item).

        >>> [Distributed(rank, 3).part(8) for rank in range(3)]
        [slice(0, 2, None), slice(2, 5, None), slice(5, 8, None)]
        """
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def all_sum(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def all_sum_array(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``values`` (float64) over processes. Where one process holds a value and the
        others zeros, the sum is that value bit for bit (``x + 0.0 == x``)."""
        if not self.active:
            return values
        t = torch.from_numpy(np.ascontiguousarray(values, np.float64)).to(self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run a block on every process; when it raises on any of them, raise on all: the failing process its
        own error, the others a ``UserError`` that quotes it."""
        if not self.active:
            yield
            return
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - handed to the other processes, then raised again
            failure = exc
        messages: list = [None] * self.world
        torch.distributed.all_gather_object(messages, None if failure is None else _message(failure))
        if failure is not None:
            raise failure
        failed = next(((rank, text) for rank, text in enumerate(messages) if text is not None), None)
        if failed is not None:
            raise UserError(f"process {failed[0]} of {self.world} stopped: {failed[1]}")


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def init_distributed(device_name: str | None) -> tuple[Distributed, torch.device]:
    """This process's place in the run and its device; joins the process group under torchrun (NCCL on GPUs,
    gloo on CPU; each process takes the GPU of its ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        device = torch.device(device_name)
        return Distributed(device=device), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return Distributed(rank, world, local, device), device


def shutdown() -> None:
    """Leave the process group at the end of a command run under torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
