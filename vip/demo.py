"""`vip demo`: the end-to-end run on built-in tiny synthetic data.

synthetic corpus (train + held-out) → shards → auxiliary captions →
DeepSpeed pretraining on 2 processes → zero-shot retrieval before/after →
plots. Every stage resumes: a re-run skips what is already there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from shards.atomic import write_json, write_text
from vip.config import Config, save_config

log = logging.getLogger(__name__)
STAGES = 6


def _stage(i: int, title: str) -> None:
    print(f"\n=== {i}/{STAGES} {title} ===", flush=True)


def _eval_cfgs(cfg: Config):
    synth = dataclasses.replace(cfg.synth, out=cfg.synth.out.rstrip("/") + "_eval", seed=cfg.synth.seed + 1000,
                                num_videos=max(2, cfg.synth.num_videos // 3))
    build = dataclasses.replace(cfg.build, metadata=f"{synth.out}/metadata.jsonl",
                                subtitles=f"{synth.out}/subtitles.jsonl", videos=f"{synth.out}/videos",
                                out=cfg.train.eval_shards or cfg.build.out.rstrip("/") + "_eval")
    return synth, build


def _synth(synth) -> None:
    if (Path(synth.out) / "metadata.jsonl").exists():
        print(f"found {synth.out}; keeping it")
        return
    from shards.synth import make_corpus
    print(json.dumps(make_corpus(synth)))


def run_demo(cfg: Config) -> int:
    t0 = time.perf_counter()
    from shards.build import build_shards
    eval_synth, eval_build = _eval_cfgs(cfg)

    _stage(1, "synthetic corpus: train + held-out (HD-VILA format, h264)")
    _synth(cfg.synth)
    _synth(eval_synth)

    _stage(2, "shards build")
    for b in (cfg.build, eval_build):
        summary = build_shards(b)
        print(summary.table())
        if summary.shards_failed:
            return 1

    _stage(3, "auxiliary captions of middle frames")
    _captions(cfg)

    _stage(4, "zero-shot retrieval of the untrained model")
    before = _zero_shot(cfg, eval_build.out, weights=None)

    _stage(5, "pretrain with DeepSpeed (2 processes)")
    rc = _pretrain(cfg, eval_build.out)
    if rc != 0:
        print(f"pretraining failed (exit {rc})")
        return rc
    after = _zero_shot(cfg, eval_build.out, weights=Path(cfg.train.out) / "final")

    _stage(6, "results")
    from vip.eval.metrics import format_table
    from vip.plot import plot_metrics
    png = plot_metrics(Path(cfg.train.out) / "metrics.jsonl")
    table = format_table({"untrained": before, "pretrained": after})
    write_text(Path(cfg.train.out) / "retrieval.md", table + "\n")
    write_json(Path(cfg.train.out) / "retrieval.json", {"untrained": before, "pretrained": after}, indent=2)
    print(table)
    print(f"\ncurves: {png}\nmetrics: {Path(cfg.train.out) / 'metrics.jsonl'}")
    print(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


def _captions(cfg: Config) -> None:
    """The real Ray captioning job over the training shards (a private Ray on 127.0.0.1).

    Offline, the demo's captioner is a tiny random-weight CoCa saved to a local folder: the
    job, the sidecars and the reader join are real; the captions themselves are noise. On a
    cluster set caption.model / caption.pretrained to a real captioner (docs/captioning.md)."""
    from captioning.job import run_caption_job
    cap = cfg.caption
    if cap.model.startswith("local-dir:") and not Path(cap.model[len("local-dir:"):]).exists():
        from captioning.tiny import make_tiny_coca
        make_tiny_coca(cap.model[len("local-dir:"):], image_size=64, seed=cfg.train.seed)
        print(f"made a tiny random-weight CoCa in {cap.model} (no network here)")
    summary = run_caption_job(dataclasses.replace(cap, shards=cfg.build.out))
    print(summary.table())


def _zero_shot(cfg: Config, eval_shards: str, weights: Path | None) -> dict:
    """Zero-shot retrieval on the held-out shards in this process: a world of one on the CPU."""
    import torch

    from vip.eval.retrieval import evaluate_shards
    from vip.model import build_model
    from vip.train.runtime import Runtime
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if weights is not None:
        from vip.model.convert import load_weights_into
        load_weights_into(model, weights)
    data = dataclasses.replace(cfg.data, shards=eval_shards, captions=None, num_workers=0)
    rt = Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"), precision="fp32")
    res = evaluate_shards(model, data, rt, max_clips=cfg.train.eval_max_clips)
    print(f"t2v R@1 {res['t2v_R@1']:.1f}  R@5 {res['t2v_R@5']:.1f}  v2t R@1 {res['v2t_R@1']:.1f} "
          f"({res['clips']} clips; chance R@1 {100 / max(res['clips'], 1):.1f})")
    return res


def _pretrain(cfg: Config, eval_shards: str) -> int:
    out = Path(cfg.train.out)
    if (out / "final" / "model.safetensors").exists():
        print(f"found {out / 'final'}; keeping it")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_shards=eval_shards))
    save_config(cfg, out / "demo_config.yaml")
    root = Path(__file__).resolve().parents[1]
    cmd = ["bash", str(root / "launch/pretrain.sh"), "--nproc", "2", "--python", sys.executable, "--",
           "--config", str(out / "demo_config.yaml")]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"})
