"""Ranks under torch.distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
who this process is, which chunks it draws, and barriers. Without torchrun: one rank, no group."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group, so it closes it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items) -> list:
        """Round-robin share of items: rank r takes items r, r + W, r + 2W, ..."""
        return list(items)[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_succeeded(self, ok: bool) -> bool:
        """True on every rank only when ok is True on every rank (so all raise together)."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def device(self, device) -> torch.device:
        """The device this rank samples on: cuda:LOCAL_RANK when the run asks for cuda."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_env(device=None, timeout_s: float = 1800.0) -> Ranks:
    """This process's Ranks; joins (or creates) the process group when WORLD_SIZE > 1:
    NCCL when sampling on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' asked for, but torch sees no GPU")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        owns = True
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, owns_group=owns)
