"""One CLIP-ViP training step through the DeepSpeed engine, on synthetic in-memory batches.

    python bench/train_step.py --quick                                  # CI: tiny model, CPU (< 60 s)
    OMP_NUM_THREADS=2 python bench/train_step.py --arch ViT-B-32,ViT-B-16 --batch 2   # CPU, slow
    python bench/train_step.py --device cuda --dtype bf16 --arch ViT-B-32,ViT-B-16 --batch auto  # a GPU

Step = the trainer's own `vip.train.engine.train_step` on the engine `build_engine` makes
(nothing re-implemented here): uint8 pixels (pinned on a GPU run) → device → CLIP normalisation in
the compute dtype (`shards.reader.to_model_input`, as `StreamLoader` does) → forward (video,
middle frame, subtitle, caption) → OCL loss (variant d) → backward → AdamW step, in a DeepSpeed
engine (world 1, ZeRO 1). Rows: for each arch, the ViP model and the stock frame-wise MeanPool
model as the reference point, each with and without gradient checkpointing. Reported: micro-batch,
step time (median), clips/s, model FLOPs per clip, MFU against this device's measured matmul peak
in the same dtype, and peak memory.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward +
backward (matmuls, convolutions and attention, 2 FLOPs per multiply-add); the optimizer step and
elementwise ops are not counted, as usual for MFU; recomputation under gradient checkpointing is
not counted (model FLOPs). Peak: the best of a few large square matmuls in the step's dtype on the
same device. `--batch auto` (GPU): the largest micro-batch (a multiple of 8) whose step fits in
memory, found by doubling and then bisecting, per row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model import PeakMemory  # noqa: E402
from shards.reader import to_model_input  # noqa: E402


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 5) -> float:
    """Measured FLOP/s of an n×n×n matmul on random data (best of `repeat`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_batch(B: int, T: int, size: int, L: int, device) -> dict:
    """A reader batch as workers hand it over: uint8 channels-last pixels (pinned for a GPU) + tokens."""
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(1, 49000, (2, B, L), generator=g)
    tok[:, :, -1] = 49407                                          # an end-of-text token per row
    pin = device.type == "cuda"
    video = torch.randint(0, 256, (B, T, size, size, 3), generator=g, dtype=torch.uint8)   # [B, T, H, W, 3]
    frame = torch.randint(0, 256, (B, size, size, 3), generator=g, dtype=torch.uint8)      # [B, H, W, 3]
    return {"video": video.pin_memory() if pin else video, "frame": frame.pin_memory() if pin else frame,
            "subtitle": tok[0], "caption": tok[1],                                         # [B, L]
            "has_caption": torch.ones(B, dtype=torch.bool)}


def make_engine(arch: str, encoder: str, grad_ckpt: bool, batch: int, rt, adam: str = "auto"):
    """The trainer's engine (vip.train.engine.build_engine) around a fresh model, world 1, ZeRO 1."""
    from vip.config import ModelConfig, OptimConfig, TrainConfig
    from vip.model import build_model
    from vip.train.engine import build_engine
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, video_encoder=encoder, max_frames=12, grad_checkpointing=grad_ckpt))
    return build_engine(model, rt, TrainConfig(global_batch=batch, precision=rt.precision, zero_stage=1),
                        OptimConfig(adam=adam), micro_batch=batch, total_steps=1000)


def step(engine, batch, objective):
    """The trainer's step (vip.train.engine.train_step) on a reader batch moved to the device."""
    from vip.train.engine import train_step
    return train_step(engine, to_model_input(batch, engine.rt.device, engine.rt.dtype), objective)


def count_flops(engine, batch, grad_ckpt: bool, objective) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    engine.module.set_grad_checkpointing(False)   # model FLOPs: recomputation is not counted
    with FlopCounterMode(display=False) as fc:
        objective(engine.module, to_model_input(batch, engine.rt.device, engine.rt.dtype))[0].backward()
    engine.module.zero_grad(set_to_none=True)
    engine.module.set_grad_checkpointing(grad_ckpt)
    return fc.get_total_flops()


def fits(arch, encoder, grad_ckpt, B, args, rt, objective) -> bool:
    """One full step at micro-batch B without running out of GPU memory."""
    engine = None
    try:
        engine = make_engine(arch, encoder, grad_ckpt, B, rt, getattr(args, "adam", "auto"))
        step(engine, synthetic_batch(B, args.frames, args.image_size, args.context, rt.device), objective)
        _sync(rt.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del engine
        import gc
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(arch, encoder, grad_ckpt, args, rt, objective, cap: int = 4096) -> int:
    """Largest multiple of 8 that fits: double from 8, then bisect between the last fit and the first miss."""
    lo, hi = 0, 8
    while hi <= cap and fits(arch, encoder, grad_ckpt, hi, args, rt, objective):
        lo, hi = hi, hi * 2
    if lo == 0:
        raise RuntimeError(f"{arch} {encoder}: not even a micro-batch of 8 fits")
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if fits(arch, encoder, grad_ckpt, mid, args, rt, objective) else (lo, mid)
    return lo


def bench_row(arch: str, encoder: str, grad_ckpt: bool, args, rt, peak: float) -> dict:
    from vip.train.objectives import PretrainObjective
    device, objective = rt.device, PretrainObjective("d", rt)
    if args.batch == "auto":
        if device.type != "cuda":
            raise SystemExit("--batch auto needs a GPU (it searches the memory limit)")
        B = largest_batch(arch, encoder, grad_ckpt, args, rt, objective)
    else:
        B = int(args.batch)
    engine = make_engine(arch, encoder, grad_ckpt, B, rt, getattr(args, "adam", "auto"))
    batch = synthetic_batch(B, args.frames, args.image_size, args.context, device)
    flops = count_flops(engine, batch, grad_ckpt, objective)
    for _ in range(args.warmup):
        step(engine, batch, objective)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            step(engine, batch, objective)
            _sync(device)
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    row = {"arch": arch, "encoder": encoder, "grad_ckpt": grad_ckpt, "batch": B, "step_s": t,
           "clips_per_s": B / t, "gflops_per_clip": flops / B / 1e9, "mfu": flops / t / peak,
           "peak_mib": mem.peak_mib}
    if device.type == "cuda":
        row["peak_total_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20   # weights + optimizer included
    del engine
    return row


def table(rows, args, device, peak) -> str:
    head = (f"T={args.frames}, {args.image_size}², {device.type} {args.dtype}"
            f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
            f"measured matmul peak {peak / 1e12:.3f} TFLOP/s")
    lines = [head, "", "| arch | encoder | grad ckpt | micro-batch | step s | clips/s | GFLOP/clip | MFU | peak MiB "
             "| clips/s vs MeanPool |", "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["arch"], r["grad_ckpt"]): r["clips_per_s"] for r in rows if r["encoder"] == "meanpool"}
    for r in rows:
        key = (r["arch"], r["grad_ckpt"])
        ratio = r["clips_per_s"] / ref[key] if key in ref else float("nan")
        lines.append(f"| {r['arch']} | {r['encoder']} | {'on' if r['grad_ckpt'] else 'off'} | {r['batch']} | "
                     f"{r['step_s']:.3f} | {r['clips_per_s']:.2f} | {r['gflops_per_clip']:.2f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_mib']:.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model at 64², CPU, few steps (CI)")
    p.add_argument("--arch", default="ViT-B-32", help="comma-separated open_clip archs")
    p.add_argument("--encoders", default="vip,meanpool")
    p.add_argument("--grad-ckpt", default="off,on", help="off, on or off,on")
    p.add_argument("--batch", default="2", help="micro-batch, or auto (GPU: largest that fits)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--context", type=int, default=70)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--adam", default="auto", choices=["auto", "fused", "torch"], help="optim.adam")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.image_size, args.frames, args.steps, args.warmup = "vip-tiny", "4", 64, 4, 3, 1
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from vip.train.runtime import init_runtime
    rt = init_runtime(device=args.device, precision=args.dtype, training=True)   # a world of one
    dtype = rt.dtype
    peak = matmul_peak_flops(device, dtype, 8192 if device.type == "cuda" else 1024)
    ckpts = [{"off": False, "on": True}[c.strip()] for c in args.grad_ckpt.split(",")]
    rows = []
    for arch in args.arch.split(","):
        for enc in args.encoders.split(","):
            for ck in ckpts:
                rows.append(bench_row(arch.strip(), enc.strip(), ck, args, rt, peak))
                print(f"  {rows[-1]['arch']} {enc} ckpt={ck}: B={rows[-1]['batch']} {rows[-1]['step_s']:.3f} s/step",
                      file=sys.stderr, flush=True)
    print(table(rows, args, device, peak))
    if args.json:
        info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak_flops": peak, "info": info, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
