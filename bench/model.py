"""Model benchmark: video encoders' forward+backward cost against the image-tower floor.

For each architecture (ViT-B/32 and ViT-B/16 shapes, random weights) and a batch of B
clips of T frames, one training step of the vision side (forward, ``sum`` of the
embedding as the loss, backward into every parameter) is measured for

- floor: the stock open_clip ``VisionTransformer`` encoding the same B·T frames
  independently (what any frame-wise video model must pay at least);
- ViP-fast: ``VideoViT`` with proxy-guided attention, block-sparse path (the default);
- ViP-dense: ``VideoViT`` with the dense (M+TN)² mask through SDPA (the test oracle);
- FullAttention: joint space-time attention over all T·N + 1 tokens.

All four share one set of weights and run interleaved in the same process (rep 1 of
every variant, then rep 2, …; medians), so machine load drifts hit them alike; ratios to
the floor are what to read.

Memory (per variant, once, outside the timed reps):

- CPU: peak RSS of the step: the kernel's high-water mark (VmHWM) is reset through
  /proc/self/clear_refs after a malloc_trim, then peak = VmHWM - RSS before the step
  (includes weight gradients and allocator slack; noisy to a few MiB);
- CUDA: ``torch.cuda.max_memory_allocated`` over the step minus allocated before;
- both: activations saved for backward (``saved_tensors_hooks``, bytes of distinct
  storages): deterministic, allocator-independent.

Run (repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/model.py                 # B/32 + B/16, T=12, B=1, CPU fp32
    OMP_NUM_THREADS=2 .venv/bin/python bench/model.py --quick         # CI smoke (tiny shapes), < 20 s
    .venv/bin/python bench/model.py --device cuda --dtype bf16 --batch 8 --reps 10
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("floor", "ViP-fast", "ViP-dense", "FullAttention")


# --------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _trim() -> None:
    """Return freed heap to the OS (tensors die by refcount; a full gc pass costs seconds here)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or Linux VmHWM after a clear_refs reset."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")              # reset VmHWM to the current RSS
                self.base = _status_kib("VmRSS") * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        elif self.base is not None:
            self.peak_mib = (_status_kib("VmHWM") * 1024 - self.base) / 2 ** 20
        return False


def saved_activation_mib(fn) -> float:
    """MiB of distinct tensor storages autograd saves for backward while running fn()."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2 ** 20


# --------------------------------------------------------------------------- models
def build_variants(arch: str, num_proxies: int, max_frames: int, device, dtype) -> dict:
    """The four vision encoders on one set of random weights."""
    from open_clip.model import _build_vision_tower

    from vip.model.archs import clip_config
    from vip.model.vip_vit import VideoViT
    cfg = clip_config(arch)
    torch.manual_seed(0)
    vit = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
    floor = copy.deepcopy(vit)
    fast = VideoViT(copy.deepcopy(vit), num_proxies, max_frames, attention="proxy")
    dense = VideoViT(copy.deepcopy(vit), num_proxies, max_frames, attention="proxy_dense")
    dense.load_state_dict(fast.state_dict())
    full = VideoViT(copy.deepcopy(vit), 1, max_frames, attention="full")
    models = {"floor": floor, "ViP-fast": fast, "ViP-dense": dense, "FullAttention": full}
    return {k: m.to(device=device, dtype=dtype).train() for k, m in models.items()}, cfg["vision_cfg"]


def make_step(name: str, model, video):
    """A closure: one forward (+ backward when `backward`) of `model` on the clip batch."""
    B, T = video.shape[:2]
    frames = video.flatten(0, 1)                                           # [B·T, 3, H, W]

    def forward():
        return model(frames) if name == "floor" else model(video)          # [B·T, D] or [B, D]

    def step(backward: bool = True):
        out = forward()
        if backward:
            out.float().sum().backward()
            for p in model.parameters():
                p.grad = None
        return out

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- main
def bench_arch(arch: str, args, device, dtype) -> list[dict]:
    models, vcfg = build_variants(arch, args.proxies, args.frames, device, dtype)
    size = args.image_size or vcfg["image_size"]
    g = torch.Generator().manual_seed(1)
    video = torch.randn(args.batch, args.frames, 3, size, size, generator=g).to(device, dtype)
    steps = {k: make_step(k, m, video) for k, m in models.items()}
    patch = vcfg["patch_size"]
    N = (size // patch) ** 2
    tokens = {"floor": args.batch * args.frames * (N + 1), "ViP-fast": args.batch * (args.proxies + args.frames * N),
              "ViP-dense": args.batch * (args.proxies + args.frames * N),
              "FullAttention": args.batch * (1 + args.frames * N)}
    rows = {k: {"arch": arch, "variant": k, "tokens": tokens[k], "wall_s": [], "cpu_s": []} for k in VARIANTS}
    for k in VARIANTS:                                                     # warm-up + memory, untimed
        steps[k]()
        with PeakMemory(device) as pm:
            steps[k]()
        rows[k]["peak_mib"] = pm.peak_mib
        rows[k]["saved_mib"] = saved_activation_mib(lambda: steps[k](backward=False))
        _trim()
    for _ in range(args.reps):                                             # interleaved timed reps
        for k in VARIANTS:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[k]()
            _sync(device)
            rows[k]["wall_s"].append(time.perf_counter() - t0)
            rows[k]["cpu_s"].append(time.process_time() - c0)
    out = []
    floor = rows["floor"]
    fw, fc = statistics.median(floor["wall_s"]), statistics.median(floor["cpu_s"])
    for k in VARIANTS:
        r = rows[k]
        r["wall_med_s"], r["cpu_med_s"] = statistics.median(r["wall_s"]), statistics.median(r["cpu_s"])
        r["wall_x"], r["cpu_x"] = r["wall_med_s"] / fw, r["cpu_med_s"] / fc
        r["peak_x"] = r["peak_mib"] / floor["peak_mib"] if floor["peak_mib"] > 0 else float("nan")
        r["saved_x"] = r["saved_mib"] / floor["saved_mib"]
        out.append(r)
    return out


def table(rows: list[dict], args, device, dtype) -> str:
    head = (f"B={args.batch}, T={args.frames}, M={args.proxies}, {device.type} {str(dtype).replace('torch.', '')}, "
            f"{torch.get_num_threads()} threads, median of {args.reps}")
    lines = [head, "",
             "| arch | encoder | tokens | fwd+bwd ms | × floor | CPU s | × floor | peak MiB | × floor "
             "| saved act. MiB | × floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['variant']} | {r['tokens']} | {1000 * r['wall_med_s']:.0f} | "
                     f"{r['wall_x']:.2f} | {r['cpu_med_s']:.2f} | {r['cpu_x']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_x']:.2f} | {r['saved_mib']:.0f} | {r['saved_x']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="ViT-B-32,ViT-B-16", help="open_clip / vip tiny arch names, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--proxies", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=None, help="default: the arch's")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.quick:
        args.archs, args.frames, args.reps = "vip-tiny", 4, 2
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for arch in args.archs.split(","):
        rows += bench_arch(arch.strip(), args, device, dtype)
    print(table(rows, args, device, dtype))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
