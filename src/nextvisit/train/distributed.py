"""Distributed pretraining (torchrun, DDP): the process's rank and world, and the few collectives the trainer uses.
Outside torchrun (``WORLD_SIZE`` unset or 1) everything is a no-op on one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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


def init_distributed(device_name: str | None) -> tuple[Distributed, torch.device]:
    """This process's place in the run and its device; joins the process group under torchrun (NCCL on GPUs,
    gloo on CPU)."""
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
