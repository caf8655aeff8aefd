"""torchrun / DDP and the process setup every stage does first.

    DistInfo / setup_distributed(device="auto") -> DistInfo   torchrun env vars; gloo on CPU, nccl on CUDA
    teardown_distributed()                                    destroy the process group if any
    get_logger(name, dist) -> logging.Logger                  INFO on rank 0, WARNING on other ranks
    start_run(device, *, seed, threads=0, logger_name)        setup_distributed + threads + seeds + logger
    wrap_ddp(model, dist, **kwargs)                           DDP under torchrun, else the model itself
    allreduce_grads(params, dist)                             average gradients of parameters DDP does not own
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from backend.errors import DiffTumorError
from backend.train.checkpoint import seed_everything


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; init the process group when WORLD_SIZE > 1
    (nccl on CUDA, gloo on CPU). Without torchrun: a single process on ``device``."""
    from backend.device import resolve_device

    dev = resolve_device(device)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown_distributed(*, wait_for_all: bool = False) -> None:
    """Destroy the process group. ``wait_for_all`` (a normal end of training): first a barrier, so that no
    rank tears down its gloo/NCCL threads while another (rank 0 validating or saving) is still working;
    a rank that leaves early could abort in the C++ runtime ("terminate called without an active
    exception"). After an error no barrier: the other ranks may never arrive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait_for_all:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def get_logger(name: str, dist: DistInfo | None = None) -> logging.Logger:
    """Logger that speaks on rank 0 only (warnings still show on every rank)."""
    log = logging.getLogger(name)
    if dist is not None and not dist.is_main:
        log.setLevel(logging.WARNING)
    return log


def start_run(device: str, *, seed: int, threads: int = 0,
              logger_name: str = __name__) -> tuple[DistInfo, logging.Logger]:
    """Process setup every stage does first: torchrun/device, rank-aware logger, CPU threads, seeds
    (``seed + rank``, so ranks draw different noise)."""
    try:
        dist = setup_distributed(device)
    except DiffTumorError as exc:  # resolve_device speaks of the inference CLIs' --device flag
        raise DiffTumorError(str(exc).replace("--device ", "device=")) from None
    if threads > 0:
        torch.set_num_threads(threads)
    seed_everything(seed + dist.rank)
    return dist, get_logger(logger_name, dist)


def wrap_ddp(model: torch.nn.Module, dist: DistInfo, **kwargs) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else itself."""
    if not dist.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, **kwargs)


def allreduce_grads(params, dist: DistInfo) -> None:
    """Average the gradients of ``params`` over the ranks (for modules trained outside DDP's wrapper)."""
    if not dist.distributed:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(dist.world_size)
