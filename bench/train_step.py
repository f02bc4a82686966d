"""One CLIP-ViP training step through the DeepSpeed engine, on synthetic in-memory batches.

    python bench/train_step.py --quick                                  # CI: tiny model, CPU (< 60 s)
    python bench/train_step.py --arch ViT-B-32 --batch 2 --image-size 224 --frames 12    # CPU, slow
    python bench/train_step.py --device cuda --dtype bf16 --arch ViT-B-32 --batch 64     # a GPU

Step = forward (video, middle frame, subtitle, caption) + OCL loss (variant d) + backward +
AdamW step, in a DeepSpeed engine (world 1, ZeRO 1). Rows: the ViP model and the stock
frame-wise MeanPool model as the reference point, each with and without gradient
checkpointing. Reported: step time (median), clips/s, model FLOPs per clip, MFU against
this device's measured matmul peak in the same dtype, and peak memory.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one
forward + backward (matmuls, convolutions and attention, 2 FLOPs per multiply-add);
the optimizer step and elementwise ops are not counted, as usual for MFU. Peak: the
best of a few large square matmuls in the step's dtype on the same device.
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


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 5) -> float:
    """Measured FLOP/s of an n×n×n matmul (best of `repeat`)."""
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


def synthetic_batch(B: int, T: int, size: int, L: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(1, 49000, (2, B, L), generator=g)
    tok[:, :, -1] = 49407                                          # an end-of-text token per row
    return {"video": torch.randn(B, T, 3, size, size, generator=g).to(device, dtype),   # [B, T, 3, H, W]
            "frame": torch.randn(B, 3, size, size, generator=g).to(device, dtype),      # [B, 3, H, W]
            "subtitle": tok[0].to(device), "caption": tok[1].to(device),                # [B, L]
            "has_caption": torch.ones(B, dtype=torch.bool, device=device)}


def make_engine(arch: str, encoder: str, grad_ckpt: bool, args, device):
    import deepspeed

    from vip.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from vip.ds_config import make_ds_config
    from vip.model import build_model
    from vip.optim import param_groups
    from vip.ds_config import promote_scalar_params
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, video_encoder=encoder, max_frames=12, grad_checkpointing=grad_ckpt))
    promote_scalar_params(model)
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(args.dtype, "fp32")
    ds = make_ds_config(TrainConfig(global_batch=args.batch, precision=precision, zero_stage=1), OptimConfig(),
                        DataConfig(batch_size=args.batch), world=1, device_type=device.type)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, OptimConfig()), config=ds)
    return engine


def step(engine, batch) -> torch.Tensor:
    from vip.losses import ocl_loss
    out = engine(video=batch["video"], frame=batch["frame"], subtitle=batch["subtitle"], caption=batch["caption"])
    loss, _ = ocl_loss("d", video=out["video"], frame=out["frame"], subtitle=out["subtitle"],
                       caption=out["caption"], has_caption=batch["has_caption"], logit_scale=out["logit_scale"])
    engine.backward(loss)
    with torch.no_grad():
        engine.step()
    return loss


def count_flops(engine, batch, grad_ckpt: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    from vip.losses import ocl_loss
    engine.module.set_grad_checkpointing(False)   # model FLOPs: recomputation is not counted
    with FlopCounterMode(display=False) as fc:
        out = engine.module(video=batch["video"], frame=batch["frame"], subtitle=batch["subtitle"],
                            caption=batch["caption"])
        loss, _ = ocl_loss("d", video=out["video"], frame=out["frame"], subtitle=out["subtitle"],
                           caption=out["caption"], has_caption=batch["has_caption"], logit_scale=out["logit_scale"])
        loss.backward()
    engine.module.zero_grad(set_to_none=True)
    engine.module.set_grad_checkpointing(grad_ckpt)
    return fc.get_total_flops()


def bench_row(encoder: str, grad_ckpt: bool, args, device, dtype, peak: float) -> dict:
    engine = make_engine(args.arch, encoder, grad_ckpt, args, device)
    batch = synthetic_batch(args.batch, args.frames, args.image_size, args.context, device, dtype)
    flops = count_flops(engine, batch, grad_ckpt)
    for _ in range(args.warmup):
        step(engine, batch)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            step(engine, batch)
            _sync(device)
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    return {"encoder": encoder, "grad_ckpt": grad_ckpt, "step_s": t, "clips_per_s": args.batch / t,
            "gflops_per_clip": flops / args.batch / 1e9, "mfu": flops / t / peak, "peak_mib": mem.peak_mib}


def table(rows, args, device, dtype, peak) -> str:
    head = (f"{args.arch}, B={args.batch}, T={args.frames}, {args.image_size}², {device.type} {args.dtype}, "
            f"measured matmul peak {peak / 1e12:.3f} TFLOP/s")
    lines = [head, "", "| encoder | grad ckpt | step s | clips/s | GFLOP/clip | MFU | peak MiB | clips/s vs MeanPool |",
             "|---|---|---|---|---|---|---|---|"]
    ref = {r["grad_ckpt"]: r["clips_per_s"] for r in rows if r["encoder"] == "meanpool"}
    for r in rows:
        ratio = r["clips_per_s"] / ref[r["grad_ckpt"]] if r["grad_ckpt"] in ref else float("nan")
        lines.append(f"| {r['encoder']} | {'on' if r['grad_ckpt'] else 'off'} | {r['step_s']:.3f} | "
                     f"{r['clips_per_s']:.2f} | {r['gflops_per_clip']:.2f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_mib']:.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model at 64², CPU, few steps (CI)")
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--context", type=int, default=70)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.image_size, args.frames, args.steps, args.warmup = "vip-tiny", 4, 64, 4, 3, 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29651")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    peak = matmul_peak_flops(device, dtype, 8192 if device.type == "cuda" else 1024)
    rows = [bench_row(enc, ck, args, device, dtype, peak) for enc in ("vip", "meanpool") for ck in (False, True)]
    print(table(rows, args, device, dtype, peak))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak_flops": peak, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
