"""The GPU check's shared pieces: its exceptions and helpers, and gpu.md (a markdown table per part)."""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from bench import md_table

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
GIB = 2 ** 30


class PartTimeout(BaseException):
    """A part ran past its time budget (raised from SIGALRM; a BaseException so that the parts' own
    `except Exception` handlers do not swallow it)."""


class Skip(Exception):
    """A part that cannot run here (the reason is recorded; not an error)."""



# --------------------------------------------------------------------------- helpers
def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def clean(x):
    """JSON-safe: non-finite floats → None, tuples → lists, paths → str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def release_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def sync(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def first_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return os.environ.get("VIP_GIT_COMMIT")
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VIP_GIT_COMMIT")


def version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def median_time(fn: Callable[[], object], device, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() (synchronised on a GPU) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)



# --------------------------------------------------------------------------- markdown
def _f(x, fmt: str = ".2f", none: str = "–") -> str:
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, fmt)
    return str(x)


def _md_device(r: dict) -> str:
    rows = [["device", _f(r.get("name"))], ["memory", f"{_f(r.get('memory_gib'), '.1f')} GiB"]]
    if r.get("device_type") == "cuda":
        smi = r.get("nvidia_smi") or {}
        rows += [["compute capability, SMs", f"{r.get('capability')}, {r.get('sm_count')}"],
                 ["driver", _f(smi.get("driver_version", smi.get("error")))],
                 ["CUDA / cuDNN / NCCL", f"{r.get('cuda')} / {r.get('cudnn')} / {r.get('nccl')}"],
                 ["power limit, max SM clock", f"{smi.get('power.limit', '–')}, {smi.get('clocks.max.sm', '–')}"],
                 ["DeepSpeed FusedAdam", json.dumps(r.get("fused_adam"))],
                 ["nvcc, ninja", f"{_f((r.get('tools') or {}).get('nvcc'))}, {_f((r.get('tools') or {}).get('ninja'))}"]]
    rows += [["torch, python", f"{r.get('torch')}, {r.get('python')}"],
             ["host CPU", f"{r.get('cpu')}, {r.get('cpu_count')} cores"],
             ["packages", ", ".join(f"{k} {v or '—'}" for k, v in (r.get("packages") or {}).items())]]
    m = r.get("matmul")
    if m:
        rows.append([f"measured matmul peak ({m['dtype']} {m['n']}³)", f"**{m['tflops']:.1f} TFLOP/s**"])
    return md_table(["what", "value"], rows)


def _md_train(r: dict) -> str:
    rows = []
    for x in r.get("rows", []):
        total = x.get("peak_total_mib")
        rows.append([x["arch"], x["encoder"], "on" if x["grad_ckpt"] else "off",
                     f"{x['batch']}{'' if not x.get('search') else ' (largest)'}", _f(x["step_s"], ".3f"),
                     f"**{x['clips_per_s']:.1f}**", _f(x["gflops_per_clip"], ".1f"), f"{100 * x['mfu']:.1f}%",
                     _f(total / 1024 if total else x["peak_mib"] / 1024, ".1f"), _f(x.get("vs_meanpool"))])
    out = [f"{r.get('precision')}, ZeRO-{r.get('zero_stage')}, T={r.get('frames')} at {r.get('image_size')}², "
           f"median of {r.get('steps')} steps after {r.get('warmup')}; MFU against "
           f"{_f((r.get('peak_flops') or 0) / 1e12, '.1f')} TFLOP/s; optimizer: {r.get('optimizer', '–')}"
           + (f"; micro-batch cap {r['max_batch']}" if r.get("max_batch") else ""), "",
           md_table(["arch", "encoder", "grad ckpt", "micro-batch", "step s", "clips/s", "GFLOP/clip", "MFU",
                     "peak GiB", "clips/s vs MeanPool"], rows)]
    for s in r.get("skipped_rows", []):
        out.append(f"- not measured: {s['arch']} {s['encoder']} ckpt {'on' if s['grad_ckpt'] else 'off'} ({s['reason']})")
    for e in r.get("row_errors", []):
        out.append(f"- **failed**: {e['arch']} {e['encoder']} ckpt {'on' if e['grad_ckpt'] else 'off'}: "
                   f"`{e['error'].strip().splitlines()[-1][:200]}`")
    return "\n".join(out)


def _md_attention(r: dict) -> str:
    out = [f"{r.get('arch')}, {r.get('dtype')}, M={r.get('proxies')}, vision encoder forward+backward "
           "(`bench/model.py`), × = vs. the frame-wise floor", "",
           md_table(["T", "batch", "encoder", "tokens", "fwd+bwd ms", "× floor", "saved act. MiB"],
                    [[str(e["T"]), str(e["batch"]), e["variant"], str(e["tokens"]), _f(1e3 * e["wall_med_s"], ".1f"),
                      _f(e["wall_x"]), _f(e["saved_mib"], ".0f")] for e in r.get("encoders", [])])]
    sd = r.get("sdpa")
    if sd:
        def cell(c):
            return f"{c['ms']:.2f} ms" if c.get("ok") else "✗"
        sh = r.get("sdpa_shape", {})
        out += ["", f"SDPA backends, forward+backward, ms (✗: the backend refuses the call); batch {sh.get('batch')}, "
                f"T={sh.get('T')}, {sh.get('heads')} heads × {sh.get('head_dim')}:", "",
                md_table(["call", "shape", *[b.split("_")[0] for b in BACKENDS], "default", "default picks"],
                         [[k, v["shape"], *[cell(v[b]) for b in BACKENDS], cell(v["default"]), v.get("dispatch", "–")]
                          for k, v in sd["calls"].items()]
                         + [[k, "whole function", *[cell(v[b]) for b in BACKENDS], cell(v["default"]), ""]
                            for k, v in sd.get("functions", {}).items()])]
    eq = r.get("equality")
    if eq:
        out += ["", md_table(["fast path vs dense oracle", "max abs diff"],
                             [["bf16: fast − dense", f"{eq['bf16_fast_vs_dense']:.3g}"],
                              ["bf16: fast − fp32 reference", f"{eq['bf16_fast_vs_fp32_ref']:.3g}"],
                              ["bf16: dense − fp32 reference", f"{eq['bf16_dense_vs_fp32_ref']:.3g}"],
                              ["fp32: fast − dense", f"{eq['fp32_fast_vs_dense']:.3g}"]])
                + f"\n\nfp32 equal: {_f(eq['fp32_equal'])}; bf16 fast path as accurate as the oracle: "
                  f"{_f(eq['bf16_as_accurate_as_oracle'])}"]
    fx = r.get("flex")
    if fx:
        if fx.get("ok"):
            t = (f"fwd+bwd {fx['fwd_bwd_ms']:.2f} ms vs the fast path's {fx['fast_path_fwd_bwd_ms']:.2f} ms "
                 f"({fx['vs_fast_path']:.2f}×)" if "fwd_bwd_ms" in fx else
                 f"forward {fx['fwd_ms']:.2f} ms vs the fast path's {fx['fast_path_fwd_ms']:.2f} ms ({fx.get('note')})")
            out += ["", f"FlexAttention (proxy-guided block mask, {'compiled' if fx.get('compiled') else 'eager'}; "
                    f"measured, not used): {t}; max abs diff vs dense {fx['max_abs_diff_vs_dense']:.3g}"]
        else:
            out += ["", f"FlexAttention: {fx.get('skipped') or 'failed: `' + str(fx.get('error')) + '`'}"]
    return "\n".join(out)


def _md_data(r: dict) -> str:
    cores = r.get("cores_per_gpu")
    basis = (f"{r.get('train_arch')} ViP at {r.get('train_clips_per_s', 0):.1f} clips/s" if cores is not None
             else r.get("cores_per_gpu_note", "–"))
    return "\n".join([
        f"StreamLoader, {r.get('workers')} worker(s), {r.get('content')} content, {r.get('format')} "
        f"({r.get('source')}), T={r.get('frames')} at {r.get('image_size')}², batch {r.get('batch_size')}, "
        "normalised on the device; per core = clips per worker CPU-second", "",
        md_table(["workers", "clips", "wall clips/s", "clips/s per data core", "incl. main process",
                  "worker CPU use", "data cores per GPU", "basis"],
                 [[str(r.get("workers")), str(r.get("clips")), _f(r.get("wall_clips_per_s"), ".1f"),
                   f"**{_f(r.get('clips_per_core'), '.1f')}**", _f(r.get("clips_per_cpu_s_with_main"), ".1f"),
                   f"{100 * (r.get('worker_utilisation') or 0):.0f}%", f"**{_f(cores, '.1f')}**", basis]])])


def _md_captioning(r: dict) -> str:
    rows = [[r.get("model", "–"), x["decoding"] + (f" ({x['num_beams']} beams)" if x.get("num_beams", 1) > 1 else ""),
             str(x["batch_size"]), f"**{x['captions_per_s']:.2f}**" if x["ok"] else "✗",
             _f(x.get("s_per_batch"), ".2f"), "" if x["ok"] else f"`{x['error'][:160]}`"] for x in r.get("rows", [])]
    out = [f"{r.get('weights', 'random')} weights, {r.get('precision')}, {r.get('max_tokens')} tokens per caption "
           f"(random weights never stop early), input {r.get('input_size')} px, transformers {r.get('transformers')}",
           "", md_table(["model", "decoding", "batch", "captions/s", "s per batch", "error"], rows)]
    ray = r.get("ray") or {}
    if ray.get("ok"):
        out.append(f"\nRay job: {ray['steady_captions_per_s']:.2f} captions/s after startup "
                   f"({ray['startup_s']:.1f} s), overhead vs alone {ray['overhead']:.2f}×")
    else:
        out.append(f"\nRay job: {ray.get('skipped') or 'failed: ' + str(ray.get('error'))}")
    return "\n".join(out)


def _md_pretrain(r: dict) -> str:
    rows = [[k, str(v["rc"]), _f(v["seconds"], ".1f"), "yes" if v.get("resumed") else "no"]
            for k, v in (r.get("runs") or {}).items()]
    w = r.get("weights") or {}
    return "\n".join([
        f"`python -m vip.train`, world {r.get('world')} ({r.get('backend')}), {r.get('precision')}, pinned memory "
        f"{_f(r.get('pin_memory'))}; A: {r.get('steps')} steps; B: {r.get('resume_at')} steps, then resumed to "
        f"{r.get('steps')}", "",
        md_table(["run", "exit", "seconds", "resumed"], rows), "",
        md_table(["check", "result"],
                 [["losses finite", _f(r.get("losses_finite"))],
                  ["final loss A / B", f"{_f(r.get('final_loss_a'), '.4f')} / {_f(r.get('final_loss_b'), '.4f')}"],
                  ["same samples in the same order", _f(r.get("same_samples"))],
                  ["final weights bit-identical", f"**{_f(r.get('bit_identical'))}**"
                   + ("" if r.get("bit_identical_required") else " (not required on a GPU)")],
                  ["tensors differing, max abs diff",
                   f"{w.get('tensors_differing', '–')} of {w.get('tensors', '–')}, {_f(w.get('max_abs_diff'), '.3g')}"]])])


MD_PARTS = {"device": _md_device, "train_step": _md_train, "attention": _md_attention, "data": _md_data,
            "captioning": _md_captioning, "pretrain": _md_pretrain}


def render_md(results: dict, header: bool = True) -> str:
    """The markdown fragment: the run's device, date and command, then a table (or more) per part."""
    m = results.get("meta", {})
    out = []
    if header:
        out += [f"Device: **{m.get('device')}**; {m.get('date')}; torch {m.get('torch')}; commit "
                f"{m.get('git_commit') or 'unknown'}; {'finished' if m.get('finished') else 'NOT finished (partial)'}"
                + (f" in {m['total_seconds']:.0f} s" if m.get("total_seconds") else ""), "",
                f"Command: `{m.get('command')}`", ""]
    for name, r in results.get("parts", {}).items():
        status = r.get("status", "?")
        out.append(f"**{name}** — {status}" + (f", {r['seconds']:.1f} s" if r.get("seconds") is not None else ""))
        out.append("")
        body = ""
        if status not in ("pending", "skipped"):
            try:
                body = MD_PARTS[name](r) if name in MD_PARTS else md_table(["result"], [[status]])
            except Exception as e:  # noqa: BLE001 — a partial result renders as far as it goes
                body = md_table(["result"], [[f"{status} (table not rendered: {first_line(e, 120)})"]])
        else:
            body = md_table(["result"], [[r.get("skipped") or status]])
        out.append(body)
        if r.get("error"):
            lines = str(r["error"]).strip().splitlines() or [""]
            out.append(f"\nError: `{(lines[0] if status == 'timeout' else lines[-1])[:300]}`")
        out.append("")
    return "\n".join(out).rstrip() + "\n"

