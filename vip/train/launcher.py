"""Process-level plumbing of a training command: argument parsing under a launcher, rank-aware
logging, seeding, pre-emption signals, failure reports, a clean process-group shutdown and a fast exit."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback

import torch
import torch.distributed as dist

log = logging.getLogger("vip.train")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def unblock_stop_signals() -> None:
    """launch/pretrain.sh starts the launcher with SIGTERM/SIGINT blocked (so deepspeed's launcher
    does not kill the ranks 30 s after a signal: the script forwards it and enforces --grace); the
    block is inherited by the ranks, which take the signals back here. A signal that arrived
    while blocked is delivered now."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Preemption:
    """SIGTERM/SIGINT set a flag; ranks agree on it at step boundaries, checkpoint, and exit."""

    def __init__(self):
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        unblock_stop_signals()

    def _handler(self, signum, frame):
        if not self.requested:
            log.warning("signal %d: will checkpoint and stop at the next step boundary", signum)
        self.requested = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def failure_report(where: dict):
    """Log any exception with the rank and step held in `where` (updated by the loop), re-raise."""
    try:
        yield where
    except Exception as e:
        log.error("rank %s failed at step %s: %s: %s\n%s", where.get("rank"), where.get("step"), type(e).__name__,
                  e, traceback.format_exc())
        sys.stderr.flush()
        raise


def launcher_main(run, prog: str, argv=None, default_preset: str = "default") -> int:
    """Entry for `python -m …` under a launcher: `--config P k=v …` (DeepSpeed adds --local_rank),
    rank-aware logging, `run(cfg)`, then a clean process-group shutdown."""
    from vip.config import ConfigError, load_config
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", "-c", default=default_preset)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    unblock_stop_signals()   # until a trainer installs Preemption, a signal stops this rank as usual
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    joined_before = dist.is_initialized()    # a caller's process group is the caller's to end
    try:
        rc = run(load_config(args.config, args.overrides))
    except ConfigError as e:       # at load, or a preflight check before any work (e.g. no caption sidecars)
        print(f"{prog}: config error: {e}", file=sys.stderr)
        rc = 2
    if dist.is_initialized() and not joined_before:
        dist.barrier()
        dist.destroy_process_group()   # a clean gloo shutdown: no teardown timeouts at exit
    return rc


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's final garbage collection: with torch, deepspeed
    and transformers loaded it takes ~10 s per rank, and everything is already written and closed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
