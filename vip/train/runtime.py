"""Where this process runs: rank, world size, device and compute dtype, resolved in one place.

Every command that touches a model (pretraining, fine-tuning, evaluation, benchmarks) asks
`init_runtime` once and passes the `Runtime` down. Under a launcher (deepspeed, torchrun, a
scheduler) the rank and world come from its environment; a bare `python -m …` is a world of
one. GPUs use nccl, CPUs gloo.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str                   # bf16 | fp16 | fp32 (resolved, never "auto")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed this process's generators for rank `rank`: torch (CPU and every CUDA device), numpy's
    global RNG and Python's `random`, all from seed + rank (ranks draw different numbers, e.g. their
    dropout masks; what must be the same on every rank, like model init, seeds torch with the seed
    itself). The same (seed, rank) makes all three produce the same numbers again."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)   # also seeds every CUDA device


def resolve_precision(precision: str, device_type: str) -> str:
    """auto → bf16 on GPUs that support it, fp32 otherwise (CPU)."""
    if precision == "auto":
        cuda_bf16 = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision must be auto|bf16|fp16|fp32, got {precision!r}")
    return precision


def world_info(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (for a world of one, and tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """auto → this process's GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def cpu_shm_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank (named after the
    launcher's MASTER_ADDR/MASTER_PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_shm() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed (0.18) maps one ~69 MB /dev/shm file per rank when all ranks share a machine
    and never unlinks it: every CPU run leaked memory until reboot (tens of GB over a test
    suite). After a barrier every rank has opened every buffer, so the names can go; the
    mappings live on until the processes exit."""
    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    if dist.get_backend() == "gloo":
        dist.barrier()
    try:
        os.unlink(cpu_shm_path(rank))
    except FileNotFoundError:
        pass


def init_runtime(device: str = "auto", precision: str = "auto", training: bool = False) -> Runtime:
    """Join the launcher's process group and pick the device.

    training=True always joins a group through DeepSpeed (its engine needs one; a bare run
    becomes a world of one on 127.0.0.1 and a free port). Otherwise a group is joined only
    when launched with WORLD_SIZE > 1 (e.g. `torchrun … vip eval`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if training:
            import deepspeed
            if "MASTER_ADDR" not in os.environ:          # a bare `python -m …`: one local process
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                                  LOCAL_RANK="0", WORLD_SIZE="1")
            deepspeed.init_distributed(dist_backend=backend)
            release_cpu_shm()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend)
    rank, world = world_info()
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=dev,
                   precision=resolve_precision(precision, dev.type))
