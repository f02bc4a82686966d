"""Captioning throughput: the whole Ray job next to the captioner alone on the same images.

    python bench/captioning.py --quick                     # CI: tiny random CoCa, 64 clips, CPU (< 60 s)
    python bench/captioning.py --arch coca_ViT-B-32 --clips 96 --max-tokens 20
    python bench/captioning.py --device cuda --arch coca_ViT-L-14 --decoding beam --clips 4096 \\
        --batch-size 64 --chunk-size 256                   # a GPU node (random weights unless --model)
    python bench/captioning.py --count-flops --arch coca_ViT-L-14 --decoding beam --max-tokens 30 \\
        --clips 2 --json flops.json                        # FLOPs per caption (any device; no job)

The images are middle-frame JPEGs in frame-only shards written by
captioning.tiny.make_frame_shards (or --shards DIR). "Captioner alone" decodes
them up front and times only `Captioner.caption` in batches in this process;
"job" is `run_caption_job` on a private local Ray (decode tasks, actors,
sidecar writes), reported end to end and after startup (Ray + model load).
Overhead = captioner-alone rate / job rate. Random weights (the default)
caption garbage but cost the same per token: every caption runs to
--max-tokens, the worst case. Prints a markdown table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioning.captioners import build_captioner  # noqa: E402
from captioning.frames import load_chunk, plan_chunks  # noqa: E402
from captioning.job import run_caption_job  # noqa: E402
from captioning.tiny import make_frame_shards, make_tiny_coca  # noqa: E402
from captioning.config import CaptionConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CoCa, 64 clips, 8 tokens (CI)")
    p.add_argument("--arch", default="coca_ViT-B-32", help="random-weight CoCa: 'tiny' or an open_clip coca_* name")
    p.add_argument("--model", default=None, help="real weights instead: open_clip name (with --pretrained) or local-dir:PATH")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--shards", default=None, help="existing shard folder (default: write frame-only shards)")
    p.add_argument("--clips", type=int, default=None, help="clips to caption (default 96; 64 with --quick)")
    p.add_argument("--clips-per-shard", type=int, default=16)
    p.add_argument("--frame-size", type=int, default=256, help="short side of the generated middle frames")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", default="auto")
    p.add_argument("--decoding", default="auto", help="auto (beam on GPU, greedy on CPU) | beam | greedy | top_k | top_p")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--actors", type=int, default=0, help="0: one per GPU / as many as fit on CPU")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs (torch threads on CPU) per actor")
    p.add_argument("--local-cpus", type=int, default=0, help="CPUs of the local Ray (0: all cores)")
    p.add_argument("--work-dir", default=None, help="keep model, shards and sidecars here (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--count-flops", action="store_true",
                   help="only count the captioner's FLOPs per caption (torch's flop formulas; no timing, no job)")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.clips_per_shard, args.max_tokens = "tiny", 16, 8
        args.batch_size, args.chunk_size, args.frame_size = 16, 16, 128
    if args.clips is None:
        args.clips = 64 if args.quick else 96
    return args


def caption_config(args, shards: Path, out: Path, model: str) -> CaptionConfig:
    return CaptionConfig(shards=str(shards), out=str(out), model=model, pretrained=args.pretrained,
                         decoding=args.decoding, max_tokens=args.max_tokens, min_tokens=min(5, args.max_tokens - 1),
                         batch_size=args.batch_size, chunk_size=args.chunk_size, device=args.device,
                         precision=args.precision, num_actors=args.actors, actor_cpus=args.actor_cpus,
                         local_cpus=args.local_cpus)


def load_images(shards: Path, size: int, resize: str) -> tuple[list, "object"]:
    """Every middle frame of a shard folder, decoded up front: (keys, uint8 images [N, size, size, 3])."""
    import numpy as np
    from shards.reader import load_shardset
    ss = load_shardset(shards)
    keys, images = [], []
    for sid, (name, n) in enumerate(zip(ss.names, ss.counts)):
        for chunk in plan_chunks(sid, name, str(shards / name), n, 10 ** 9):
            meta, imgs = load_chunk(chunk, size, resize)
            keys += meta["ok"]
            images.append(imgs)
    return keys, np.concatenate(images)


def time_captioner(cap, images, keys: list, batch_size: int, device: str) -> dict:
    """Captions/s of `cap.caption` over `images` in batches of `batch_size`, after one untimed warm-up
    batch (allocator, kernels)."""
    import torch
    bs = batch_size
    cap.caption(images[:bs], keys[:bs])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(keys), bs):
        cap.caption(images[i:i + bs], keys[i:i + bs])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"clips": len(keys), "seconds": dt, "captions_per_s": len(keys) / dt}


def captioner_alone(cfg: CaptionConfig, shards: Path, threads: int) -> dict:
    """Model throughput on pre-decoded images in this process (no Ray, no I/O)."""
    import torch
    if cfg.device == "cpu":
        torch.set_num_threads(threads)
    cap = build_captioner(cfg)
    spec = cap.input_spec
    keys, images = load_images(shards, spec.size, spec.resize)
    res = time_captioner(cap, images, keys, cfg.batch_size, cfg.device)
    return {**res, "provenance": dataclasses.asdict(cap.provenance)}


class InferenceFlops:
    """FLOPs of the matmuls, convolutions and attention run inside the block, by torch's own formulas
    (torch.utils.flop_counter.flop_registry). FlopCounterMode itself also tracks modules through
    autograd hooks, which fails inside no-grad generation; this counts the same ops without them."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                formula = flop_registry.get(func._overloadpacket)
                if formula is None:
                    # composite ops (aten.linear under inference_mode) reach here undecomposed: decompose
                    # them so that their matmuls are seen
                    with self:                 # the parts re-enter this mode and are counted
                        out = func.decompose(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
                    return func(*args, **kwargs)
                out = func(*args, **kwargs)
                counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.total = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def count_caption_flops(cfg: CaptionConfig, shards: Path, n: int) -> dict:
    """Model FLOPs per caption (matmuls, convolutions, attention; 2 per multiply-add) of captioning n
    middle frames with cfg's decoding. Random weights never stop early: every caption runs to
    max_tokens (the worst case; real captions stop at their end token)."""
    import numpy as np

    from shards.reader import load_shardset
    cap = build_captioner(cfg)
    ss = load_shardset(shards)
    chunk = next(iter(plan_chunks(0, ss.names[0], str(shards / ss.names[0]), ss.counts[0], 10 ** 9)))
    meta, images = load_chunk(chunk, cap.input_spec.size, cap.input_spec.resize)
    images = np.asarray(images[:n])
    with InferenceFlops() as fc:
        captions = cap.caption(images, meta["ok"][:n])
    gen = dataclasses.asdict(cap.provenance)["generation"]
    return {"model": cfg.model, "decoding": gen["decoding"], "max_tokens": cfg.max_tokens,
            "num_beams": gen.get("num_beams", 1), "images": len(images),
            "gflops_per_caption": fc.total / len(images) / 1e9,
            "caption_tokens": [len(c.split()) for c in captions], "generation": gen}


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t_all = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vip_bench_caption_"))
    if args.model:
        model = args.model
    else:
        model = make_tiny_coca(work / "model", image_size=None if args.arch != "tiny" else 64,
                               arch=None if args.arch == "tiny" else args.arch)
    if args.shards:
        shards = Path(args.shards)
    else:
        shards = work / "shards"
        n_shards = -(-args.clips // args.clips_per_shard)
        make_frame_shards(shards, n_shards, args.clips_per_shard, size=args.frame_size)
    cfg = caption_config(args, shards, work / f"captions_{int(time.time())}", model)
    if args.count_flops:
        res = count_caption_flops(cfg, shards, args.clips)
        print(f"{args.arch if not args.model else args.model}: {res['gflops_per_caption']:.1f} GFLOP per caption "
              f"({res['decoding']}, {res['num_beams']} beam(s), {args.max_tokens} tokens, {res['images']} images)")
        if args.json:
            Path(args.json).write_text(json.dumps({**res, "arch": args.arch}, indent=2))
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    say(f"model and shards ready after {time.perf_counter() - t_all:.1f} s; timing the captioner alone")
    alone = captioner_alone(cfg, shards, threads=max(1, int(args.actor_cpus)))
    say(f"captioner alone: {alone['captions_per_s']:.2f} captions/s; running the job")
    job = run_caption_job(cfg)
    assert job.clips == alone["clips"], (job.clips, alone["clips"])
    gen = alone["provenance"]["generation"]
    steady, overall = job.steady_captions_per_s, job.captions_per_s
    rate = alone["captions_per_s"]
    lines = [
        f"model `{alone['provenance']['model']}` ({'random weights' if not args.model else alone['provenance']['model_tag']}), "
        f"{gen['device']}/{gen['precision']}, decoding {gen['decoding']}, {args.max_tokens} tokens, "
        f"input {gen['input_size']} px, batch {args.batch_size}, chunk {args.chunk_size}, "
        f"{job.actors} actor(s) × {args.actor_cpus:g} CPU; {machine()}",
        "",
        "| run | clips | seconds | captions/s | overhead vs alone |",
        "|---|---:|---:|---:|---:|",
        f"| captioner alone (in-process, pre-decoded, {max(1, int(args.actor_cpus))} thread(s)) | {alone['clips']} | "
        f"{alone['seconds']:.1f} | {rate:.2f} | 1.00× |",
        f"| job after startup (decode tasks + actors + sidecars) | {job.clips} | {job.seconds - job.startup_seconds:.1f} | "
        f"{steady:.2f} | {rate / steady if steady else float('inf'):.2f}× |",
        f"| job end to end (+ Ray start, actor model load {job.startup_seconds:.1f} s) | {job.clips} | {job.seconds:.1f} | "
        f"{overall:.2f} | {rate / overall if overall else float('inf'):.2f}× |",
    ]
    print("\n".join(lines))
    print(f"\n(bench wall time {time.perf_counter() - t_all:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"alone": alone, "job": job.to_dict(), "args": vars(args)}, indent=2))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)  # random weights can be GBs
    return 0


if __name__ == "__main__":
    sys.exit(main())
