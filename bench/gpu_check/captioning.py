"""Part 5, captioning: CoCa captions/s (greedy and beam search), and the Ray job's overhead."""
from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from bench.gpu_check.report import PartTimeout, first_line, release_memory, say, version

if TYPE_CHECKING:
    from bench.gpu_check.__main__ import Check


# --------------------------------------------------------------------------- 5. captioning
def caption_plan(ck: Check) -> dict:
    if not ck.cuda:
        if ck.quick:
            return {"model": "tiny", "runs": [("greedy", 2)], "max_tokens": 8, "image_size": 64}
        return {"model": "coca_ViT-B-32", "runs": [("greedy", 4), ("beam", 2)], "max_tokens": 12, "image_size": None}
    if ck.quick:
        return {"model": "coca_ViT-L-14", "runs": [("greedy", 32), ("beam", 16)], "max_tokens": 30, "image_size": None}
    return {"model": "coca_ViT-L-14", "runs": [("greedy", 16), ("greedy", 64), ("greedy", 256), ("beam", 16),
                                               ("beam", 64)], "max_tokens": 30, "image_size": None}


def untie_logits(model) -> None:
    """open_clip zero-initialises CoCa's decoder output projection: with random weights every logit
    would tie. As captioning.tiny.make_tiny_coca does: random normal instead."""
    import torch
    with torch.no_grad():
        proj = model.text_decoder.text_projection
        proj.normal_(std=proj.shape[0] ** -0.5)


def part_captioning(ck: Check, res: dict) -> None:
    import copy

    from bench.captioning import load_images, time_captioner
    from captioning.captioners import build_captioner
    from captioning.config import CaptionConfig
    from captioning.tiny import make_frame_shards, make_tiny_coca
    plan = caption_plan(ck)
    work = ck.tmp / "captioning"
    device = "cuda" if ck.cuda else "cpu"
    if plan["model"] == "tiny":
        model = make_tiny_coca(work / "model", image_size=plan["image_size"])
    else:
        model = plan["model"]                             # open_clip builds it with random weights
    reps = 1 if ck.quick else 2        # timed batches per run (the first of them is also run once untimed)
    n_img = max(bs for _, bs in plan["runs"]) * reps
    shards = work / "frames"
    make_frame_shards(shards, 1, n_img, size=64 if plan["model"] == "tiny" else 256)
    cfg = CaptionConfig(shards=str(shards), model=model, pretrained=None, decoding="greedy",
                        max_tokens=plan["max_tokens"], min_tokens=min(5, plan["max_tokens"] - 1), device=device,
                        precision="auto", num_actors=1)
    t0 = time.perf_counter()
    greedy = build_captioner(cfg)
    if plan["model"] != "tiny":
        untie_logits(greedy.model)
    res.update(model="tiny CoCa" if plan["model"] == "tiny" else greedy.provenance.model, weights="random", precision=greedy.precision,
               max_tokens=plan["max_tokens"], input_size=greedy.input_spec.size,
               model_load_s=time.perf_counter() - t0, transformers=version("transformers"), rows=[])
    keys, images = load_images(shards, greedy.input_spec.size, greedy.input_spec.resize)
    ck.save()
    captioners = {"greedy": greedy}
    for decoding, bs in plan["runs"]:
        if decoding not in captioners:                   # the same model, another decoding
            cap = copy.copy(greedy)
            cap.cfg = dataclasses.replace(cfg, decoding=decoding)
            cap.decoding = decoding
            cap.provenance = dataclasses.replace(greedy.provenance, generation=cap._generation())
            captioners[decoding] = cap
        cap = captioners[decoding]
        gen = cap.provenance.generation
        row = {"decoding": decoding, "batch_size": bs, "num_beams": gen.get("num_beams", 1)}
        n = min(len(keys), bs * reps)
        try:
            t = time_captioner(cap, images[:n], keys[:n], bs, device)   # warm-up batch, then timed batches
            row.update(ok=True, images=t["clips"], seconds=t["seconds"], captions_per_s=t["captions_per_s"],
                       s_per_batch=t["seconds"] / max(1, math.ceil(t["clips"] / bs)))
        except PartTimeout:
            raise
        except Exception as e:  # noqa: BLE001 — e.g. transformers 5.x without BeamSearchScorer, or OOM
            row.update(ok=False, error=first_line(e, 500), traceback=traceback.format_exc()[-2000:])
            release_memory()
        res["rows"].append(row)
        say(f"  {decoding} batch {bs}: " + (f"{row['captions_per_s']:.2f} captions/s" if row["ok"] else row["error"]))
        ck.save()
    res["ray"] = ray_overhead(ck, cfg, greedy, shards, res)
    good = [r for r in res["rows"] if r["ok"]]
    if not good:
        res["error"] = f"every generate() failed; first: {res['rows'][0]['error']}"


def ray_overhead(ck: Check, cfg, cap, shards: Path, res: dict) -> dict:
    """The captioning job (Ray) vs the captioner alone on the same images: only when ray imports."""
    want = ck.args.ray
    if want == "off" or (want == "auto" and ck.quick):
        return {"skipped": "--ray off" if want == "off" else "--quick (use --ray on)"}
    try:
        import ray  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"ray does not import here: {first_line(e, 200)}"}
    if ck.left() < 60 and want != "on":
        return {"skipped": f"time budget ({ck.left():.0f} s left)"}
    from captioning.job import run_caption_job
    greedy = [r for r in res["rows"] if r["ok"] and r["decoding"] == "greedy"]
    alone = max(greedy, key=lambda r: r["captions_per_s"]) if greedy else None   # the job runs at its batch size
    if alone is None:
        return {"skipped": "no greedy captioner-alone rate to compare with"}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    jcfg = dataclasses.replace(cfg, out=str(ck.tmp / "captioning" / "sidecars"), batch_size=alone["batch_size"],
                               chunk_size=max(alone["batch_size"], 8), num_actors=1,
                               local_cpus=min(8, os.cpu_count() or 1))
    try:
        job = run_caption_job(jcfg)
        steady = job.steady_captions_per_s
        return {"ok": True, "clips": job.clips, "seconds": job.seconds, "startup_s": job.startup_seconds,
                "steady_captions_per_s": steady, "alone_captions_per_s": alone["captions_per_s"],
                "overhead": alone["captions_per_s"] / steady if steady else None,
                "note": "job actors build their own random-weight model"}
    except PartTimeout:
        raise
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": first_line(e, 500)}

