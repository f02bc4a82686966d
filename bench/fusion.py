"""Everything-at-Once benchmark: does fusing audio help where sound carries the information, and what it costs.

1. Retrieval after the same budget (`vip finetune finetune.method=eao`, the one engine, tiny
   random-init CLIP-ViP + fusion head, CPU): clips of a coloured square with a soundtrack
   (shards.synth_audio tones + noise), validation R@1 of text → video, text → audio and
   text → (video+audio) after the last epoch, on two tasks:
     * `audio`: each text names the colour and the sound; 4 clips share a colour, so the frames
       alone find a text's clip among 4 look-alikes at best (t→v R@1 ≤ ~25%);
     * `visual`: each text names the colour and the square's corner; the sound is random and
       unnamed: t→va should match t→v.
   Both with the original's loss weights (1 for t_v, 0.1 for the rest) and equal weights.
2. Fusion cost per clip as a ratio to the video tower (forward, eval mode, CPU, one thread):
   video tower alone vs. audio tower vs. fusion head (t-less: v, a, va).
3. Reader cost with audio (m4a decode + log-mel) as a ratio to without, on synthetic shards.

    .venv/bin/python bench/fusion.py              # ~30 min on 2 cores (4 fine-tunings of 40 epochs)
    .venv/bin/python bench/fusion.py --quick      # smoke: 4 epochs, one weighting, tiny cost model
    .venv/bin/python bench/fusion.py --parts retrieval --epochs 20
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import md_table  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}
CORNERS = {"top left": (6, 6), "top right": (6, 38), "bottom left": (38, 6), "bottom right": (38, 38)}
FUSION = ["model.fusion.dim=64", "model.fusion.num_heads=4", "model.fusion.projection_dim=64",
          "model.fusion.audio_width=32", "model.fusion.audio_layers=1", "model.fusion.audio_heads=2",
          "model.fusion.audio_patch_frames=10", "data.audio_seconds=1.0"]
WEIGHTS = {"original (1, 0.1×5)": "[1,0.1,0.1,0.1,0.1,0.1]", "equal": "[1,1,1,1,1,1]"}


def write_clip(path: Path, colour: str, sound: str, place: tuple, variant: int, seconds=1.2, fps=8, rate=16000):
    import av

    from shards.synth_audio import tone
    rng = np.random.default_rng(variant)
    with av.open(str(path), mode="w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        au = c.add_stream("aac", rate=rate)
        au.layout = "mono"
        y, x = place
        for i in range(int(seconds * fps)):
            img = np.full((64, 64, 3), 20, np.uint8)
            img[y:y + 20, x + i % 4:x + i % 4 + 20] = COLOURS[colour]
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        t = np.arange(int(seconds * rate)) / rate
        f = av.AudioFrame.from_ndarray((tone(sound, t) + rng.normal(0, 0.02, len(t))).astype(np.float32)[None],
                                       format="fltp", layout="mono")
        f.sample_rate, f.pts = rate, 0
        for p in [*au.encode(f), *au.encode()]:
            c.mux(p)


def make_task(d: Path, kind: str) -> Path:
    """kind audio: text = colour + sound (place varies unnamed); visual: text = colour + corner
    (sound random, unnamed). 16 classes × 3 clips: 2 train, 1 validation."""
    from shards.synth_audio import PHRASES, SOUNDS
    (d / "videos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    train, val, v = [], [], 0
    for colour in COLOURS:
        for j, second in enumerate(SOUNDS if kind == "audio" else CORNERS):
            for k in range(3):
                cid = f"{colour}_{j}_{k}"
                if kind == "audio":   # small unnamed shifts: look-alikes, not identical
                    sound, place = second, (8 + 6 * (v % 5), 8 + 5 * (v % 7))
                    text = f"a {colour} square {PHRASES[second]}"
                else:
                    sound, place = SOUNDS[int(rng.integers(4))], CORNERS[second]
                    text = f"a {colour} square at the {second}"
                write_clip(d / "videos" / f"{cid}.mp4", colour, sound, place, v)
                v += 1
                (val if k == 2 else train).append({"clip_id": cid, "text": text})
    for name, rows in (("train", train), ("val", val)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def init_model(d: Path) -> Path:
    import torch

    from vip.config import ModelConfig
    from vip.model import build_model
    from vip.model.convert import export
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4)
    return export(build_model(cfg), cfg, d / "init")


def finetune(task: Path, init: Path, out: Path, epochs: int, weights: str) -> dict:
    from vip.train.runtime import free_port
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    args = ["finetune.method=eao", f"finetune.annotations={task}/train.jsonl", f"finetune.videos={task}/videos",
            f"finetune.val_annotations={task}/val.jsonl", f"train.init_from={init}", f"train.out={out}",
            f"finetune.epochs={epochs}", "optim.lr=1e-3", "optim.weight_decay=0.0", "optim.warmup_ratio=0.0",
            "train.global_batch=8", "data.batch_size=8", "finetune.num_frames=4", "finetune.num_workers=0",
            "finetune.context_length=32", f"loss.fusion_weights={weights}", *FUSION]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "vip", "finetune", *args], env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {"seconds": time.perf_counter() - t0, **{k: last[f"val_{k}_R@1"] for k in ("t2v", "t2a", "t2va")}}


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def fusion_cost(arch: str, fusion_dim: int, heads: int, proj: int, frames: int, seconds: float, reps: int) -> dict:
    """CPU seconds per clip (batch 2, eval, no grad) of the video tower, the audio tower and the head."""
    import torch

    from vip.config import FusionConfig, ModelConfig
    from vip.model import build_model
    from vip.model.archs import image_size
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, max_frames=frames, fusion=FusionConfig(dim=fusion_dim, num_heads=heads,
                                                                        projection_dim=proj))
    m = build_model(cfg).eval()
    B, S = 2, image_size(m)
    video = torch.randn(B, frames, 3, S, S)
    mel = torch.randn(B, 40, int(seconds * 100))
    mask = torch.ones(B, mel.shape[2], dtype=torch.bool)
    with torch.no_grad():
        vt = m.video_tokens(video)
        at = m.audio(mel, mask)
        t_video = _time(lambda: m.video_tokens(video), reps) / B
        t_audio = _time(lambda: m.audio(mel, mask), reps) / B
        t_head = _time(lambda: m.fusion_head({"v": vt, "a": at}), reps) / B
    return {"arch": arch, "fusion": f"{fusion_dim}/{heads}h→{proj}", "frames": frames, "audio_s": seconds,
            "video": t_video, "audio": t_audio, "head": t_head}


def reader_cost(tmp: Path, clips_seconds: float, reps: int) -> dict:
    """CPU seconds per clip of the streaming reader (rank 0, no workers) without and with audio."""
    from shards.build import build_shards
    from shards.config import DataConfig, ShardBuildConfig, SynthConfig
    from shards.reader import StreamLoader
    from shards.synth import make_corpus
    syn = SynthConfig(out=str(tmp / "synth"), num_videos=4, clips_per_video=4, clip_seconds=clips_seconds,
                      width=640, height=360, fps=30, seed=0, texture="natural", audio=True)
    make_corpus(syn)
    out = tmp / "shards"
    build_shards(ShardBuildConfig(metadata=f"{syn.out}/metadata.jsonl", subtitles=f"{syn.out}/subtitles.jsonl",
                                  videos=f"{syn.out}/videos", out=str(out), clips_per_shard=4, workers=2))
    res = {}
    for audio in (False, True):
        cfg = DataConfig(shards=str(out), num_frames=12, batch_size=4, num_workers=0, train=False, audio=audio,
                         audio_seconds=clips_seconds)
        t0, n = time.process_time(), 0
        for _ in range(reps):
            for b in StreamLoader(cfg):
                n += len(b["key"])
        res["with" if audio else "without"] = (time.process_time() - t0) / n
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke: 4 epochs, equal weights only, small cost models")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per run (default 40; quick 4)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--parts", default="retrieval,cost,reader", help="comma-separated subset to run")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    epochs = args.epochs or (4 if args.quick else 40)
    weights = {"equal": WEIGHTS["equal"]} if args.quick else WEIGHTS
    res: dict = {"retrieval": [], "cost": [], "reader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = init_model(tmp)
        for kind in ("audio", "visual") if "retrieval" in parts else ():
            task = make_task(tmp / kind, kind)
            for wname, w in weights.items():
                r = finetune(task, init, tmp / f"ft_{kind}_{wname[:5]}", epochs, w)
                res["retrieval"].append({"task": kind, "weights": wname, "epochs": epochs, **r})
                print(f"[{kind} / {wname}] t2v {r['t2v']:.1f} t2a {r['t2a']:.1f} t2va {r['t2va']:.1f} "
                      f"({r['seconds']:.0f} s)", flush=True)
        sizes = [("vip-tiny", 64, 4, 64, 4, 1.0)] if args.quick else [
            ("vip-tiny", 64, 4, 64, 4, 1.0), ("ViT-B-32", 4096, 64, 6144, 12, 8.0)]
        for s in sizes if "cost" in parts else ():
            res["cost"].append(fusion_cost(*s, reps=1 if args.quick else 3))
        if "reader" in parts:
            res["reader"] = reader_cost(tmp, 2.0 if args.quick else 8.0, 1 if args.quick else 2)
    print()
    if res["retrieval"]:
        print(md_table(["task", "loss weights", "epochs", "t→v R@1", "t→a R@1", "t→va R@1", "t→va − t→v"],
                       [[r["task"], r["weights"], str(r["epochs"]), f"{r['t2v']:.1f}", f"{r['t2a']:.1f}",
                         f"{r['t2va']:.1f}", f"{r['t2va'] - r['t2v']:+.1f}"] for r in res["retrieval"]]))
        print()
    if res["cost"]:
        print(md_table(["backbone", "fusion (width/heads→joint)", "frames", "audio s", "video tower ms/clip",
                        "audio tower ms/clip", "fusion head ms/clip", "(audio + head) / video"],
                       [[c["arch"], c["fusion"], str(c["frames"]), f"{c['audio_s']:g}", f"{c['video'] * 1e3:.1f}",
                         f"{c['audio'] * 1e3:.1f}", f"{c['head'] * 1e3:.1f}",
                         f"{(c['audio'] + c['head']) / c['video']:.2f}"] for c in res["cost"]]))
        print()
    r = res["reader"]
    if r:
        print(md_table(["reader", "CPU ms/clip", "ratio"],
                       [["without audio", f"{r['without'] * 1e3:.1f}", "1.00"],
                        ["with audio (m4a decode + log-mel)", f"{r['with'] * 1e3:.1f}",
                         f"{r['with'] / r['without']:.2f}"]]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
