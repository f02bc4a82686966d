"""Part 4, data: the real StreamLoader's clips/s per data core, and data cores per GPU."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from bench.gpu_check.report import sync

if TYPE_CHECKING:
    from bench.gpu_check.__main__ import Check


# --------------------------------------------------------------------------- 4. data
def data_workers(ck: Check) -> int:
    if ck.args.data_workers is not None:
        return ck.args.data_workers
    return 1 if ck.quick and not ck.cuda else min(16, os.cpu_count() or 1)


def part_data(ck: Check, res: dict) -> None:
    import torch

    from bench.data import Format, Settings, build_corpus, build_format
    from bench.data_paths import _children, _proc_cpu_seconds
    from shards.config import DataConfig
    from shards.reader import StreamLoader
    W = data_workers(ck)
    cores = os.cpu_count() or 1
    if ck.cuda or not ck.quick:
        fmt = Format(4.0, 224, 4, True, True)                 # the default stored format
        # HD-VILA-length clips (13.4 s) from 720p sources, one rendering process per video
        s = Settings(out=ck.tmp / "data", formats=(fmt,), contents=("natural",), videos=8,
                     clips_per_video=1 if ck.quick else 2, image_size=224, batch_size=32, workers=W,
                     build_workers=max(1, cores))
        seconds = 3.0 if ck.quick else 10.0
    else:
        fmt = Format(4.0, 64, 4, True, True)
        s = Settings(out=ck.tmp / "data", formats=(fmt,), contents=("natural",), width=320, height=180, videos=1,
                     clips_per_video=2, clip_seconds=2.0, image_size=64, num_frames=4, batch_size=2, workers=W,
                     build_workers=1)
        seconds = 1.5
    res.update(workers=W, content="natural", format=fmt.label, frames=s.num_frames, image_size=s.image_size,
               batch_size=s.batch_size, source=f"{s.width}x{s.height} {s.src_fps} fps, {s.clip_seconds} s clips",
               cpu_count=cores)
    t0 = time.monotonic()
    corpus = build_corpus(s, "natural")
    res["corpus_seconds"] = time.monotonic() - t0
    shard_dir, res["build_seconds"] = build_format(s, corpus, "natural", fmt)
    res["clips_in_shards"] = s.videos * s.clips_per_video
    ck.save()
    cfg = DataConfig(shards=str(shard_dir), num_frames=s.num_frames, image_size=s.image_size,
                     batch_size=s.batch_size, num_workers=W, train=True, seed=0, shuffle_shards=4,
                     decode_threads=1, prefetch_factor=2)
    device = torch.device(ck.args.device)
    loader = StreamLoader(cfg, pin_memory=ck.cuda, device=device,
                          dtype=torch.bfloat16 if ck.cuda else torch.float32)
    before = set(_children())
    it = iter(loader)
    try:
        batch = None
        for _ in range(max(1, W)):                        # every worker's first batch: start-up, untimed
            batch = next(it)
        res["batch_shapes"] = {k: [list(v.shape), str(v.dtype), str(v.device)] for k, v in batch.items()
                               if hasattr(v, "shape")}
        pids = [p for p in _children() if p not in before]
        if len(pids) < W:
            raise RuntimeError(f"found {len(pids)} DataLoader workers in /proc, expected {W}")

        def workers_cpu() -> float:
            return sum(_proc_cpu_seconds(p) for p in pids)

        n, w0, c0, m0 = 0, time.perf_counter(), workers_cpu(), time.process_time()
        min_clips = 4 * s.batch_size * max(1, W)
        while time.perf_counter() - w0 < seconds or n < min_clips:
            n += len(next(it)["key"])
        sync(device)
        wall, wcpu, mcpu = time.perf_counter() - w0, workers_cpu() - c0, time.process_time() - m0
    finally:
        it.close()                                        # stops the workers now
    res.update(clips=n, wall_s=wall, worker_cpu_s=wcpu, main_cpu_s=mcpu, wall_clips_per_s=n / wall,
               clips_per_core=n / wcpu if wcpu > 0 else None,
               clips_per_cpu_s_with_main=n / (wcpu + mcpu) if wcpu + mcpu > 0 else None,
               worker_utilisation=wcpu / (wall * W), events=dict(loader.events))
    train = ck.part("train_step").get("rows") or []
    ref = next((r for r in train if r["encoder"] == "vip" and not r["grad_ckpt"]), None)
    if ref and res["clips_per_core"]:
        res.update(train_arch=ref["arch"], train_clips_per_s=ref["clips_per_s"],
                   cores_per_gpu=ref["clips_per_s"] / res["clips_per_core"])
    else:
        res["cores_per_gpu"] = None
        res["cores_per_gpu_note"] = "no train_step ViP row in this run"

