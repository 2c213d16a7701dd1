"""torchrun support: process group set-up (gloo on CPU, NCCL on GPU) and small reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over all processes (float64, so counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on rank 0 (rank 0 decides, e.g. by the clock)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def local_first(self, build, enabled: bool = True):
        """build() on each node's local rank 0 first, then on that node's other ranks: what
        build() caches on disk (decoded images, rendered scenes) is made once per node and read
        by the rest, instead of by every process at once. A no-op order when not enabled."""
        if self.world == 1 or not enabled:
            return build()
        if self.local_rank != 0:
            dist.barrier()
        try:
            return build()
        finally:
            if self.local_rank == 0:
                dist.barrier()      # also after a failure, so the others go on (and meet it)


def setup() -> Dist:
    """Join the process group when launched by torchrun; else a single process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return Dist(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
