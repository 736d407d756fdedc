"""Data parallelism with `torchrun`: one process per GPU (or CPU slot), PyTorch's own engine.

`torchrun --nproc_per_node N train.py ...` starts N copies of this program and sets RANK,
WORLD_SIZE and LOCAL_RANK. Each copy holds the whole model, reads a disjoint slice of every
global batch, and `DistributedDataParallel` averages the adapter gradients across copies after
each backward. NCCL carries the traffic between GPUs, gloo between CPU processes.

Without torchrun (WORLD_SIZE unset) every helper here is a no-op, so the single-process path
is the same code.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def all_reduce_sums(values: list[float], device) -> list[float]:
    """Sum each number over all processes, in one collective (the numbers themselves when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_sum(value: float, device) -> float:
    """Sum one number over all processes."""
    return all_reduce_sums([value], device)[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(batch: list[int], info: DistInfo) -> list[int]:
    """This process's rows of a global batch: contiguous, balanced, never empty (len >= world)."""
    if not info.enabled:
        return batch
    n, w, r = len(batch), info.world_size, info.rank
    return batch[r * n // w : (r + 1) * n // w]


# torch 2.13 renamed `broadcast_buffers` to `forward_sync_buffers` (the old name warns).
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def wrap_for_data_parallel(module: torch.nn.Module, device: torch.device, info: DistInfo):
    """DDP around `module` under torchrun (it syncs gradients of work done in its forward).

    By default DDP copies every buffer from process 0 to the others before each forward. The
    model's buffers (rotary frequencies) are frozen and identical everywhere, so that copy
    would be pure traffic: we turn it off.
    """
    if not info.enabled:
        return module
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **NO_BUFFER_SYNC
    )


class StopFlag:
    """Set by Ctrl-C / SIGTERM; the loop saves a checkpoint at the next step boundary.

    A second Ctrl-C stops at once (the previous checkpoint is still valid), except under
    torchrun: there a terminal's Ctrl-C reaches each worker twice (from the terminal and
    forwarded by torchrun), and the second one must not cancel the save.
    """

    def __init__(self, escalate: bool = True):
        self.requested = False
        self.escalate = escalate

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and self.escalate:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name} received: saving a checkpoint after this step...", file=sys.stderr)


@contextmanager
def stop_signals(escalate: bool = True):
    """Inside this block Ctrl-C and SIGTERM set a `StopFlag` instead of killing the process."""
    flag = StopFlag(escalate)
    previous = {s: signal.signal(s, flag.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
