"""Part 1, device: versions, memory and the measured matmul peak; DeepSpeed's FusedAdam (built in the
background) or torch's AdamW: the optimizer the train_step and pretrain parts use."""
from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.gpu_check.report import GIB, ROOT, cpu_model, device_name, first_line, version

if TYPE_CHECKING:
    from bench.gpu_check.__main__ import Check


# --------------------------------------------------------------------------- 1. device
def part_device(ck: Check, res: dict) -> None:
    import torch

    from bench.train_step import matmul_peak_flops
    dev = torch.device(ck.args.device)
    start_fused_adam_build(ck)                    # overlaps this part; train_step waits for it
    res.update(name=device_name(ck.args.device), device_type=dev.type, torch=torch.__version__,
               python=platform.python_version(), cpu=cpu_model(), cpu_count=os.cpu_count())
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        res.update(memory_gib=props.total_memory / GIB, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
        try:
            res["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001
            res["nccl"] = first_line(e)
        res["nvidia_smi"] = nvidia_smi()
    else:
        res["memory_gib"] = _meminfo_gib()
    res["packages"] = {d: version(d) for d in ("deepspeed", "open_clip_torch", "transformers", "ray", "av",
                                               "numpy", "safetensors", "pyarrow")}
    res["tools"] = {"nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"),
                    "CUDA_HOME": os.environ.get("CUDA_HOME")}
    if dev.type == "cuda":
        res["fused_adam"] = fused_adam_status()
    dtype, n = (torch.bfloat16, 8192) if dev.type == "cuda" else (torch.float32, 512 if ck.quick else 1024)
    peak = matmul_peak_flops(dev, dtype, n)
    ck.peak_flops = peak
    res["matmul"] = {"dtype": str(dtype).replace("torch.", ""), "n": n, "tflops": peak / 1e12}


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def nvidia_smi() -> dict:
    q = "name,driver_version,memory.total,power.limit,clocks.max.sm"
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": first_line(e)}
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()[:300]}
    return dict(zip(q.split(","), [v.strip() for v in p.stdout.splitlines()[0].split(",")]))


def fused_adam_status() -> dict:
    """Can DeepSpeed's FusedAdam (what the trainer uses on a GPU) load? Only the cheap checks here: the
    load itself (a JIT build with nvcc when not prebuilt) happens in train_step, timed."""
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder
        b = FusedAdamBuilder()
        return {"compatible": bool(b.is_compatible(verbose=False)), "prebuilt": _op_prebuilt(b.name)}
    except Exception as e:  # noqa: BLE001
        return {"error": first_line(e)}


def _op_prebuilt(name: str) -> bool:
    try:
        import deepspeed.git_version_info as info
        return bool(getattr(info, "installed_ops", {}).get(name))
    except Exception:  # noqa: BLE001
        return False


FUSED_ADAM_BUILD = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(verbose=False)"


def start_fused_adam_build(ck: Check) -> None:
    """Build (or find cached) DeepSpeed's FusedAdam in a background process: DeepSpeed travels here
    without prebuilt ops, so the first load JIT-compiles it with nvcc (when there is one). Started
    early so the build overlaps the device part; `ensure_optimizer` waits for it, with a limit."""
    if not ck.cuda or ck.args.optimizer == "torch" or ck.adam_build is not None:
        return
    log = ck.tmp / "fused_adam_build.log"
    f = open(log, "w")
    p = subprocess.Popen([sys.executable, "-c", FUSED_ADAM_BUILD], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True)
    f.close()
    ck.adam_build = {"proc": p, "t0": time.monotonic(), "log": log}


def ensure_optimizer(ck: Check, res: dict) -> None:
    """On a GPU the trainer's DeepSpeed config asks for FusedAdam, a CUDA op built on first use. Use
    it when its build finishes within the limit (--adam-build-limit, and this part's budget); else
    torch's AdamW for the rest of the check, saying why (`pretrain` runs get the same fallback)."""
    if not ck.cuda or ck.optimizer:
        res["optimizer"] = ck.optimizer or "torch AdamW (CPU: the trainer's setting)"
        return
    if ck.args.optimizer == "torch":
        ck.optimizer = "torch AdamW (--optimizer torch)"
    else:
        start_fused_adam_build(ck)
        b = ck.adam_build
        limit = min(ck.args.adam_build_limit, max(0.0, ck.left() - (10 if ck.quick else 60)))
        try:
            rc = b["proc"].wait(timeout=max(0.0, limit - (time.monotonic() - b["t0"])))
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(b["proc"].pid, signal.SIGKILL)
            b["proc"].wait()
        res["fused_adam_build_s"] = time.monotonic() - b["t0"]
        tail = b["log"].read_text(errors="replace")[-1500:]
        if rc == 0:
            t0 = time.perf_counter()
            from deepspeed.ops.op_builder import FusedAdamBuilder
            FusedAdamBuilder().load(verbose=False)             # from the build's cache: fast
            res["fused_adam_load_s"] = time.perf_counter() - t0
            ck.optimizer = "DeepSpeed FusedAdam (the trainer's)"
        elif ck.args.optimizer == "fused":
            raise RuntimeError(f"FusedAdam could not be built (--optimizer fused):\n{tail}")
        else:
            why = "build still running after the limit" if rc is None else (tail.strip().splitlines() or ["?"])[-1]
            ck.optimizer = f"torch AdamW (fallback: FusedAdam not available: {why[:200]})"
            res["fused_adam_log"] = tail
    res["optimizer"] = ck.optimizer
