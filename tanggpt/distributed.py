"""Data-parallel training with torchrun: which process this is, and the few collectives the loop needs.

    torchrun --standalone --nproc_per_node=N pretrain.py

starts N copies of the script and sets RANK / WORLD_SIZE / LOCAL_RANK in each. Every
process draws different batches (the rank is part of each batch's seed) and
DistributedDataParallel averages the gradients at each backward, so the N processes
take the same optimizer steps. Only rank 0 evaluates, prints and writes files. Without
torchrun all of this is a no-op: one process, rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def init_distributed(runtime_device: str) -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op without torchrun."""
    if "RANK" not in os.environ:
        return Distributed()
    dist_info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    use_cuda = runtime_device.startswith("cuda") or (runtime_device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist_info


def sum_over_processes(value: float, dist_info: Distributed, device: torch.device) -> float:
    """The sum of `value` over all processes (the value itself without torchrun)."""
    if dist_info.world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def barrier(dist_info: Distributed) -> None:
    """Wait until every process gets here."""
    if dist_info.world_size > 1:
        dist.barrier()
