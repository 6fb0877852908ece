"""Ranks under torchrun (`palikit run`, `palikit eval` and `palikit train` on several processes):
joining the process group (gloo beside nccl), and the collectives they need, barrier and all_sum,
which are no-ops in a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by torchrun. device: "auto"
    (a GPU when there is one), "cpu" or "cuda[:N]"; under torchrun each rank takes its local GPU."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA GPU is available")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            # gloo beside nccl: all_sum reduces small CPU tensors (losses, counts), which nccl cannot.
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, torch.device(("cuda" if cuda else "cpu") if device == "auto" else device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(*values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def leave() -> None:
    """Wait for every rank, then leave the process group (`palikit run` / `palikit eval` when done):
    an interpreter that exits with gloo's work alive can abort ("terminate called without an active
    exception", pytorch/pytorch#190489)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
