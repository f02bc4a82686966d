"""Part 2, train_step: the trainer's own step at the largest micro-batch that fits (the batch search)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from typing import TYPE_CHECKING

from bench.gpu_check.device import ensure_optimizer
from bench.gpu_check.report import GIB, PartTimeout, clean, first_line, release_memory, say, write_atomic

if TYPE_CHECKING:
    from bench.gpu_check.__main__ import Check


# --------------------------------------------------------------------------- 2. train step
@dataclasses.dataclass(frozen=True)
class Row:
    arch: str
    encoder: str
    grad_ckpt: bool
    search: bool          # find the largest micro-batch (else: the ViP row's batch, or the fixed one)


def train_plan(ck: Check) -> tuple[list[Row], argparse.Namespace]:
    if not ck.cuda:
        t = argparse.Namespace(frames=4, image_size=64, context=32, steps=2 if ck.quick else 3, warmup=1,
                               batch=2 if ck.quick else 4)
        ckpts = (False,) if ck.quick else (False, True)
        return [Row("vip-tiny", e, c, False) for c in ckpts for e in ("vip", "meanpool")], t
    t = argparse.Namespace(frames=12, image_size=224, context=70, steps=3 if ck.quick else 4,
                           warmup=1 if ck.quick else 2, batch=128)
    if ck.quick:
        return [Row("ViT-B-32", "vip", False, False), Row("ViT-B-32", "meanpool", False, False)], t
    rows = []
    for ckpt in (False, True):              # in priority order: what the budget leaves out comes last
        for arch in ("ViT-B-32", "ViT-B-16"):
            rows.append(Row(arch, "vip", ckpt, True))
            if not ckpt:
                rows.append(Row(arch, "meanpool", ckpt, False))
    rows += [Row(a, "meanpool", True, False) for a in ("ViT-B-32", "ViT-B-16")]
    return rows, t


def part_train_step(ck: Check, res: dict) -> None:
    from bench import train_step as ts
    from vip.train.objectives import PretrainObjective
    rt = ck.runtime()
    ensure_optimizer(ck, res)
    if ck.peak_flops is None:
        ck.peak_flops = ts.matmul_peak_flops(rt.device, rt.dtype, 8192 if ck.cuda else 512)
    plan, targs = train_plan(ck)
    targs.adam = ck.adam()                    # optim.adam of the engines built below
    res.update(precision=rt.precision, zero_stage=1, frames=targs.frames, image_size=targs.image_size,
               context=targs.context, steps=targs.steps, warmup=targs.warmup, peak_flops=ck.peak_flops,
               max_batch=ck.args.max_batch if ck.cuda and not ck.quick else None, rows=[], skipped_rows=[],
               row_errors=[], batch_search={})
    objective = PretrainObjective("d", rt)
    chosen: dict = {}                         # (arch, grad_ckpt) → the ViP row's micro-batch
    longest = 0.0
    for row in plan:
        label = f"{row.arch} {row.encoder} ckpt={'on' if row.grad_ckpt else 'off'}"
        if res["rows"] and ck.left() < 1.2 * longest:
            res["skipped_rows"].append({**dataclasses.asdict(row), "reason": f"time budget ({ck.left():.0f} s left)"})
            continue
        t0 = time.monotonic()
        try:
            if row.search:
                B, probes = largest_batch(ck, ts, row, targs, rt, objective)
                res["batch_search"][label] = probes
            else:
                B = chosen.get((row.arch, row.grad_ckpt), targs.batch)
            r = bench_row_backoff(ts, row, B, targs, rt, ck.peak_flops, objective)
        except PartTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            res["row_errors"].append({**dataclasses.asdict(row), "error": traceback.format_exc()[-3000:]})
            say(f"  {label}: {first_line(e)}")
            release_memory()
            continue
        if row.encoder == "vip":
            chosen[(row.arch, row.grad_ckpt)] = r["batch"]
        r["seconds"] = time.monotonic() - t0
        longest = max(longest, r["seconds"])
        res["rows"].append(r)
        add_ratios(res["rows"])
        say(f"  {label}: micro-batch {r['batch']}, {r['clips_per_s']:.1f} clips/s, MFU {100 * r['mfu']:.1f}%")
        release_memory()
        write_train_json(ck, res)
        ck.save()
    if res["row_errors"]:
        res["error"] = f"{len(res['row_errors'])} row(s) failed; first:\n{res['row_errors'][0]['error']}"
    elif not res["rows"]:
        res["error"] = "no row measured"


def bench_row_backoff(ts, row: Row, B: int, targs, rt, peak: float, objective) -> dict:
    """bench_row at micro-batch B; on a GPU that runs out of memory, once more at 85%."""
    import torch
    for attempt in range(2):
        args = argparse.Namespace(**{**vars(targs), "batch": str(B)})
        try:
            r = ts.bench_row(row.arch, row.encoder, row.grad_ckpt, args, rt, peak)
            return {**r, "search": row.search}
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if attempt or "out of memory" not in str(e).lower():
                raise
            release_memory()
            B = max(8, int(B * 0.85) // 8 * 8)
    raise AssertionError("unreachable")


def _fits(ts, row: Row, B: int, targs, rt, objective) -> tuple[bool, float]:
    import torch
    release_memory()
    torch.cuda.reset_peak_memory_stats()
    try:
        ok = ts.fits(row.arch, row.encoder, row.grad_ckpt, B, targs, rt, objective)
    except RuntimeError as e:              # an OOM surfacing as a plain RuntimeError (NCCL, DeepSpeed)
        if "out of memory" not in str(e).lower():
            raise
        ok = False
    peak = torch.cuda.max_memory_allocated()
    release_memory()
    return ok, peak


def largest_batch(ck: Check, ts, row: Row, targs, rt, objective) -> tuple[int, list]:
    """The largest multiple of 8 (≤ --max-batch) whose step fits: peak memory at 8 and 16 gives a
    line; its prediction for 90% of the free memory is tried, then 80% of that, … (`--batch auto`
    bisects instead: ~15 engine builds per row, too many for the time here)."""
    import torch
    release_memory()
    free = torch.cuda.mem_get_info(rt.device)[0]
    cap = ck.args.max_batch
    probes = []
    for B in (8, 16):
        ok, peak = _fits(ts, row, B, targs, rt, objective)
        probes.append({"batch": B, "fits": ok, "peak_gib": peak / GIB})
        if not ok:
            if B == 8:
                raise RuntimeError(f"{row.arch} {row.encoder}: not even a micro-batch of 8 fits")
            return 8, probes
    slope = max((probes[1]["peak_gib"] - probes[0]["peak_gib"]) * GIB / 8, 1.0)
    base = probes[0]["peak_gib"] * GIB - 8 * slope
    guess = min(cap, int((0.9 * free - base) / slope) // 8 * 8)
    while guess > 16:
        ok, peak = _fits(ts, row, guess, targs, rt, objective)
        probes.append({"batch": guess, "fits": ok, "peak_gib": peak / GIB})
        if ok:
            return guess, probes
        guess = int(guess * 0.8) // 8 * 8
    return 16, probes


def add_ratios(rows: list[dict]) -> None:
    ref = {(r["arch"], r["grad_ckpt"]): r for r in rows if r["encoder"] == "meanpool"}
    for r in rows:
        m = ref.get((r["arch"], r["grad_ckpt"]))
        r["vs_meanpool"] = r["clips_per_s"] / m["clips_per_s"] if m else None
        r["vs_meanpool_same_batch"] = bool(m) and m["batch"] == r["batch"]


def write_train_json(ck: Check, res: dict) -> None:
    """DIR/train_step.json in bench/train_step.py's --json format (bench/scaling.py --train reads it)."""
    import torch
    info = {"device": ck.results["meta"]["device"] if ck.cuda else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "source": "bench/gpu.py"}
    args = {k: res.get(k) for k in ("frames", "image_size", "context", "steps", "warmup")}
    write_atomic(ck.out / "train_step.json", json.dumps(clean(
        {"args": {**args, "dtype": res.get("precision"), "device": ck.args.device}, "peak_flops": res["peak_flops"],
         "info": info, "rows": res["rows"]}), indent=2))

