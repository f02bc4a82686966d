"""The GPU check's orchestration: options, the parts run in order under their time budgets, gpu.json and
gpu.md rewritten after every part (`python bench/gpu.py …` or `python -m bench.gpu_check …`; see
bench/gpu_check/__init__.py)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from bench.gpu_check import __doc__ as DOC
from bench.gpu_check.attention import part_attention
from bench.gpu_check.captioning import part_captioning
from bench.gpu_check.data import part_data
from bench.gpu_check.device import part_device
from bench.gpu_check.pretrain import part_pretrain
from bench.gpu_check.report import (ROOT, PartTimeout, Skip, clean, device_name, git_commit, release_memory,
                                    render_md, say, write_atomic)
from bench.gpu_check.train import part_train_step

PARTS = ("device", "train_step", "attention", "data", "captioning", "pretrain")
# seconds per part: the lent GPU (full, --quick: ≤ 8 min and ≤ 2 min in all) and a CPU run (full, --quick: a
# safety net only, generous for shared CI machines; the CPU smoke takes ~1.5 min on 2 idle cores)
BUDGETS = {
    "device": ((20, 10), (120, 120)),
    "train_step": ((180, 25), (600, 240)),
    "attention": ((60, 10), (300, 120)),
    "data": ((60, 15), (300, 120)),
    "captioning": ((80, 20), (600, 120)),
    "pretrain": ((80, 40), (600, 300)),
}


# --------------------------------------------------------------------------- the run
class Check:
    """The run's state: options, device, results (written after every part), the part's deadline."""

    def __init__(self, args: argparse.Namespace, parts: dict[str, Callable]):
        self.args, self.parts = args, parts
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="vip-gpu-check-"))
        self.deadline = math.inf
        self.peak_flops: float | None = None
        self.optimizer: str | None = None         # the trainer's optimizer on this device (ensure_optimizer)
        self.adam_build: dict | None = None       # the background FusedAdam build (start_fused_adam_build)
        self._rt = None
        self.results = {"meta": self.meta(), "parts": {}}

    # -- facts
    @property
    def cuda(self) -> bool:
        return self.args.device.startswith("cuda")

    @property
    def quick(self) -> bool:
        return self.args.quick

    def adam(self) -> str:
        """optim.adam for the engines the check builds: torch's AdamW when ensure_optimizer fell back
        to it (or chose it), else the trainer's own choice for the device (auto)."""
        return "torch" if (self.optimizer or "").startswith("torch") else "auto"

    def meta(self) -> dict:
        import torch
        return {"device": device_name(self.args.device), "device_type": "cuda" if self.cuda else "cpu",
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)
                                                   if sys.argv and sys.argv[0].endswith(".py") else "bench/gpu.py",
                                                   *self.args.argv]),
                "torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit(),
                "quick": self.quick, "cpu_count": os.cpu_count(), "finished": False}

    def budget(self, name: str) -> float:
        gpu, cpu = BUDGETS.get(name, ((60, 30), (120, 60)))
        full, quick = gpu if self.cuda else cpu
        return (quick if self.quick else full) * self.args.budget_scale

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def runtime(self):
        """The trainer's Runtime (world of one, DeepSpeed's process group), made once per process."""
        if self._rt is None:
            from vip.train.runtime import init_runtime
            self._rt = init_runtime(device=self.args.device, precision="bf16" if self.cuda else "fp32",
                                    training=True)
        return self._rt

    def part(self, name: str) -> dict:
        return self.results["parts"].get(name, {})

    # -- output
    def save(self) -> None:
        write_atomic(self.out / "gpu.json", json.dumps(clean(self.results), indent=2, allow_nan=False))
        write_atomic(self.out / "gpu.md", render_md(clean(self.results)))

    def run(self, names: list[str]) -> dict:
        t_all = time.monotonic()
        for name in names:
            self.results["parts"][name] = {"ok": False, "status": "pending", "error": None, "skipped": None}
        self.save()
        for name in names:
            run_part(self, name)
        if self.adam_build and self.adam_build["proc"].poll() is None:     # not waited for: stop it
            os.killpg(self.adam_build["proc"].pid, signal.SIGKILL)
            self.adam_build["proc"].wait()
        self.results["meta"]["finished"] = True
        self.results["meta"]["total_seconds"] = round(time.monotonic() - t_all, 1)
        self.save()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.results


def _alarm(signum, frame):
    raise PartTimeout()


def run_part(ck: Check, name: str) -> dict:
    """Run one part under its budget (SIGALRM); record ok / skipped / error (traceback) and seconds."""
    budget = ck.budget(name)
    res = ck.results["parts"][name] = {"ok": False, "status": "running", "error": None, "skipped": None,
                                       "budget_s": round(budget, 1)}
    say(f"{name}: start (budget {budget:.0f} s)")
    t0 = time.monotonic()
    ck.deadline = t0 + budget
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        ck.parts[name](ck, res)
        res.update(ok=res.get("error") is None, status="ok" if res.get("error") is None else "error")
    except Skip as e:
        res.update(ok=False, status="skipped", skipped=str(e))
    except PartTimeout:
        res.update(ok=False, status="timeout", timed_out=True,
                   error=f"time budget of {budget:.0f} s exceeded\n{traceback.format_exc()}")
    except KeyboardInterrupt:
        res.update(ok=False, status="error", error="interrupted")
        raise
    except BaseException:   # noqa: B036 — SystemExit from a library must not end the check either
        res.update(ok=False, status="error", error=traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        ck.deadline = math.inf
        res["seconds"] = round(time.monotonic() - t0, 2)
        release_memory()
        ck.save()
    say(f"{name}: {res['status']} in {res['seconds']:.1f} s"
        + (f": {str(res['error']).strip().splitlines()[-1]}" if res.get("error") else ""))
    return res



# --------------------------------------------------------------------------- test-only
def part_boom(ck: Check, res: dict) -> None:
    """Test-only: always fails (the check must go on)."""
    res["before_failure"] = 1
    raise RuntimeError("boom (test-only part)")


PART_FUNCS: dict[str, Callable] = {"device": part_device, "train_step": part_train_step,
                                   "attention": part_attention, "data": part_data,
                                   "captioning": part_captioning, "pretrain": part_pretrain, "boom": part_boom}



# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu.json, gpu.md and train_step.json")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    p.add_argument("--quick", action="store_true", help="the short form (≤ 2 min on a GPU; the CPU smoke in CI)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, run in the given order ({','.join(PARTS)})")
    p.add_argument("--data-workers", type=int, default=None,
                   help="DataLoader workers of the data part (default min(16, cores); 1 on a CPU --quick)")
    p.add_argument("--max-batch", type=int, default=1024, help="cap of the largest-micro-batch search (GPU)")
    p.add_argument("--optimizer", default="auto", choices=["auto", "fused", "torch"],
                   help="GPU: auto = DeepSpeed FusedAdam (the trainer's), torch AdamW if it cannot be built")
    p.add_argument("--adam-build-limit", type=float, default=150.0,
                   help="GPU: seconds to wait for DeepSpeed's FusedAdam JIT build before using torch AdamW")
    p.add_argument("--ray", default="auto", choices=["auto", "on", "off"],
                   help="the captioning job's overhead (auto: when ray imports and not --quick)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary shards, runs and models")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PART_FUNCS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    args.part_names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    ck = Check(args, PART_FUNCS)
    say(f"{ck.results['meta']['device']}: parts {', '.join(args.part_names)} → {ck.out}")
    res = ck.run(args.part_names)
    print(render_md(clean(res)))
    bad = [n for n, r in res["parts"].items() if r["status"] not in ("ok", "skipped")]
    say(f"done in {res['meta']['total_seconds']:.0f} s; " + (f"not ok: {', '.join(bad)}" if bad else "all parts ok"))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)      # DeepSpeed's process group and DataLoader threads: no slow interpreter teardown
