"""`vip demo`: the end-to-end run on built-in tiny synthetic data, CLIP-ViP's claim in miniature.

synthetic corpus (train: ASR-like subtitles; held-out: MSR-VTT-like descriptions) → shards →
a small image captioner trained on other frames (or reused) → auxiliary captions of the middle
frames (Ray job) → DeepSpeed post-pretraining on 2 processes with OCL (loss.variant, d) and,
from the same init and budget, the L_V↔S baseline → zero-shot retrieval of the untrained
model, the baseline and OCL side by side → plots. Every stage resumes: a re-run skips what is
already there.
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
STAGES = 8


def _stage(i: int, title: str) -> None:
    print(f"\n=== {i}/{STAGES} {title} ===", flush=True)


def _eval_cfgs(cfg: Config):
    synth = dataclasses.replace(cfg.synth, out=cfg.synth.out.rstrip("/") + "_eval", seed=cfg.synth.seed + 1000,
                                num_videos=max(2, cfg.synth.num_videos // 3),
                                text="description" if cfg.synth.text == "speech" else cfg.synth.text)
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

    _stage(1, "synthetic corpus: train (speech-like subtitles) + held-out (descriptions); HD-VILA format, h264")
    _synth(cfg.synth)
    _synth(eval_synth)

    _stage(2, "shards build")
    for b in (cfg.build, eval_build):
        summary = build_shards(b)
        print(summary.table())
        if summary.shards_failed:
            return 1

    _stage(3, "image captioner (trained on other synthetic frames, or reused)")
    _captioner(cfg)

    _stage(4, "auxiliary captions of middle frames (Ray job)")
    _captions(cfg)

    _stage(5, "zero-shot retrieval of the untrained model")
    before = _zero_shot(cfg, eval_build.out, weights=None)

    runs = {f"OCL {cfg.loss.variant}": cfg}
    if cfg.loss.variant != "vs":      # the paper's baseline: the same init and budget, L_V↔S only
        runs = {"L_V↔S (baseline)": dataclasses.replace(
            cfg, loss=dataclasses.replace(cfg.loss, variant="vs"),
            train=dataclasses.replace(cfg.train, out=cfg.train.out.rstrip("/") + "_vs")), **runs}
    _stage(6, f"post-pretrain with DeepSpeed (2 processes): {', '.join(runs)}")
    results = {"untrained": before}
    for name, run_cfg in runs.items():
        print(f"--- {name}: {run_cfg.train.out}", flush=True)
        t1 = time.perf_counter()
        rc = _pretrain(run_cfg, eval_build.out)
        if rc != 0:
            print(f"pretraining failed (exit {rc})")
            return rc
        print(f"{name}: {time.perf_counter() - t1:.0f}s", flush=True)
        results[name] = _zero_shot(run_cfg, eval_build.out, weights=Path(run_cfg.train.out) / "final")

    _stage(7, "language domain gap (K-means NMI in the post-pretrained text tower)")
    gap = _domain_gap(cfg, eval_synth)

    _stage(8, "results")
    from vip.eval.metrics import format_table
    from vip.plot import plot_metrics
    png = plot_metrics(Path(cfg.train.out) / "metrics.jsonl")
    table = format_table(results)
    write_text(Path(cfg.train.out) / "retrieval.md", table + "\n")
    write_json(Path(cfg.train.out) / "retrieval.json", {**results, "domain_gap": gap}, indent=2)
    print(table)
    keys = list(results)
    print("\n" + " | ".join(f"{k}: t2v R@1/5/10 {results[k]['t2v_R@1']:.1f}/{results[k]['t2v_R@5']:.1f}/"
                            f"{results[k]['t2v_R@10']:.1f}" for k in keys))
    print(f"\ncurves: {png}\nmetrics: {Path(cfg.train.out) / 'metrics.jsonl'}")
    print(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


def _captioner(cfg: Config) -> None:
    """Train the small captioner (or reuse it) when the caption job is pointed at its directory."""
    cap = cfg.caption
    if cap.captioner != "hf" or Path(cap.model).resolve() != Path(cfg.captioner.out).resolve():
        print(f"caption.model={cap.model}: not the demo's own captioner ({cfg.captioner.out}); not training one")
        return
    from captioning.trainer import accuracy_table, ensure_captioner
    rec = ensure_captioner(cfg.captioner, cap)
    print(("reused " if rec.get("reused") else f"trained in {rec['train_seconds']:.0f}s: ") + cfg.captioner.out)
    print(accuracy_table(rec))


def _domain_gap(cfg: Config, eval_synth) -> dict:
    """NMI(subtitles, descriptions) and NMI(captions, descriptions), mean ± std over repeats, in the
    text tower of the OCL model (the paper uses CLIP's; vip analyze domain-gap does the same)."""
    import torch

    from vip.eval.domain_gap import domain_gap_table
    from vip.model import build_model
    from vip.model.archs import tokenizer_for
    from vip.model.convert import load_weights_into
    captions = Path(cfg.caption.out or Path(cfg.build.out) / "captions")
    corpora = {"subtitles": cfg.build.subtitles, "captions": str(captions),
               "descriptions": str(Path(eval_synth.out) / "subtitles.jsonl")}
    model = build_model(cfg.model)
    load_weights_into(model, Path(cfg.train.out) / "final")
    model.eval()
    tokenize = tokenizer_for(cfg.model.arch, model.context_length)
    n = 256
    with torch.no_grad():
        table, rows = domain_gap_table(model, tokenize, corpora, [("subtitles", "descriptions"),
                                                                  ("captions", "descriptions")], n=n, repeats=10)
    print(table)
    print(f"(n = {n} texts per corpus per repeat, 10 repeats; higher = farther apart)")
    return {f"{r['a']}:{r['b']}": {"mean": r["nmi_mean"], "std": r["nmi_std"]} for r in rows}


def _captions(cfg: Config) -> None:
    """The real Ray captioning job over the training shards (a private Ray on 127.0.0.1), with the
    demo's small trained captioner (stage 3) or whatever caption.* names (docs/captioning.md)."""
    from captioning.job import run_caption_job
    summary = run_caption_job(dataclasses.replace(cfg.caption, shards=cfg.build.out))
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
    from vip.train.runtime import free_port
    # a free rendezvous port, not the launcher's default 29500: another run on the machine may hold it
    # (seen: both ranks waiting forever in the rendezvous while another job's ranks used 29500)
    port = os.environ.get("MASTER_PORT") or str(free_port())
    cmd = ["bash", str(root / "launch/pretrain.sh"), "--nproc", "2", "--master-port", port, "--python",
           sys.executable, "--", "--config", str(out / "demo_config.yaml")]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"})
