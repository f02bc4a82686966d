"""OCL in miniature: CLIP-ViP's Table 3 on synthetic clips with ASR-like subtitles.

The paper post-pretrains CLIP-ViP on HD-VILA (video + ASR subtitle + OFA caption of the middle
frame) with each OCL loss variant from the same CLIP init and budget, then evaluates text→video
retrieval on MSR-VTT / DiDeMo. Here, in miniature:

* post-pretraining corpus: synthetic clips (a coloured shape moving one way) whose subtitles are
  in the speech register (`shards.texts.speech_subtitle`: fillers, slang, off-topic lines, motion
  in other words) and whose captions come from the small CoCa trained on other frames
  (`captioning.trainer`), run on each clip's middle frame through the caption job's captioner
  class (it sees appearance, not motion);
* downstream set: held-out clips with short MSR-VTT-like descriptions (colour, shape, motion),
  one clip per colour × shape × direction, so every query has one right answer; a separate
  fine-tuning split with freshly drawn descriptions each step (MSR-VTT has 20 per clip);
* rows: CLIP (the init, no post-pretraining), CLIP-MeanPool with L_V↔S, CLIP-ViP with L_V↔S and
  with (a) (b) (c) (d) (`vip.losses`). Every row starts from the same random vip-tiny CLIP
  (one seed per repeat), trains for the same steps on the same batches through the one engine
  (`vip.train.engine.build_engine` + `train_step`, DeepSpeed on the CPU, a world of one), and is
  scored zero-shot and after the same short fine-tune; mean ± std over seeds.

Run (repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/ocl.py                 # the recorded table (docs/benchmarks.md)
    OMP_NUM_THREADS=1 .venv/bin/python bench/ocl.py --quick         # smoke: 2 rows, a few steps
    .venv/bin/python bench/ocl.py --captioner data/captioner --seeds 0 1 2 --json ocl.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioning.config import CaptionerTrainConfig  # noqa: E402
from shards.reader import _Tokenizer, normalise  # noqa: E402
from shards.synth import COLOURS, DIRECTIONS, SHAPES, ClipPlan, render_frame  # noqa: E402
from shards.texts import description, speech_subtitle  # noqa: E402
from vip.config import ModelConfig, OptimConfig, TrainConfig  # noqa: E402

SIZE = 64
CONTEXT = 32
ROWS = {   # row name → (video encoder, loss variant or None for no post-pretraining)
    "CLIP (init)": ("vip", None),
    "CLIP-MeanPool, L_V↔S": ("meanpool", "vs"),
    "CLIP-ViP, L_V↔S": ("vip", "vs"),
    "CLIP-ViP, (a) L_V↔S + L_F↔C": ("vip", "a"),
    "CLIP-ViP, (b) L_V↔S + L_V↔C": ("vip", "b"),
    "CLIP-ViP, (c) L_V↔S + L_V↔C + L_F↔C": ("vip", "c"),
    "CLIP-ViP, (d) L_V↔S,C + L_F↔C": ("vip", "d"),
}
QUICK_ROWS = ("CLIP-ViP, L_V↔S", "CLIP-ViP, (d) L_V↔S,C + L_F↔C")


# --------------------------------------------------------------------------- data
def clip_attrs(n: int | None, seed: int) -> list[dict]:
    """n random clips (None: one per colour × shape × direction, shuffled) with a background each."""
    rng = np.random.default_rng(seed)
    if n is None:
        combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
        combos = [combos[i] for i in rng.permutation(len(combos))]
    else:
        combos = [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(DIRECTIONS))))
                  for _ in range(n)]
    return [{"colour": c, "shape": s, "direction": d, "background": tuple(int(v) for v in rng.integers(0, 90, 3))}
            for c, s, d in combos]


def render(attrs: list[dict], T: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(video [N, T, 3, S, S], middle frame [N, 3, S, S]: CLIP-normalised model inputs; captioner
    inputs uint8 [N, s, s, 3]: the middle frame at the corpus's 16:9 through the caption job's path)."""
    from captioning.trainer import RENDER_H, RENDER_W
    times = (np.arange(T) + 0.5) / T
    vids, mids, caps = [], [], []
    for i, a in enumerate(attrs):
        plan = ClipPlan(f"c{i}", 0.0, 1.0, a["colour"], a["shape"], a["direction"], a["background"], 0)
        vids.append(np.stack([render_frame(plan, float(t), SIZE, SIZE) for t in times]))
        mids.append(render_frame(plan, 0.5, SIZE, SIZE))
        caps.append(render_frame(plan, 0.5, RENDER_W, RENDER_H))
    return normalise(np.stack(vids)), normalise(np.stack(mids)), np.stack(caps)


def caption_frames(model_dir: str, frames: np.ndarray, batch: int = 64) -> list[str]:
    """Captions of full-size middle frames by the caption job's captioner class (greedy, 2–12 tokens),
    each frame prepared as the job prepares it."""
    from captioning.captioners import build_captioner
    from captioning.trainer import caption_config, job_input
    cap = build_captioner(caption_config(model_dir))
    x = np.stack([job_input(f, cap.input_spec.size, cap.input_spec.resize) for f in frames])
    out: list[str] = []
    for i in range(0, len(x), batch):
        out += cap.caption(x[i:i + batch], keys=[str(j) for j in range(i, min(len(x), i + batch))])
    return out


@dataclasses.dataclass
class Data:
    pre: dict           # video, frame, subtitle (tokens), caption (tokens), has_caption, texts
    ft: dict            # video, attrs (descriptions drawn per step)
    test: dict          # video, text (tokens): one description per clip


def make_data(captioner: str, n_pre: int, n_ft: int, frames: int, seed: int = 0, n_test: int | None = None) -> Data:
    tok = _Tokenizer("ViT-B-32", CONTEXT)
    rng = np.random.default_rng(seed + 7)
    pre_a = clip_attrs(n_pre, seed)
    v, f, full = render(pre_a, frames)
    subs = [speech_subtitle(a["colour"], a["shape"], a["direction"], rng) for a in pre_a]
    caps = caption_frames(captioner, full)
    pre = {"video": v, "frame": f, "subtitle": tok(subs), "caption": tok([c or "" for c in caps]),
           "has_caption": torch.tensor([bool(c) for c in caps]), "subtitles": subs, "captions": caps, "attrs": pre_a}
    ft_a = clip_attrs(n_ft, seed + 1)
    test_a = clip_attrs(n_test, seed + 2)
    tv, _, _ = render(test_a, frames)
    test_texts = [description(a["colour"], a["shape"], a["direction"], rng) for a in test_a]
    return Data(pre=pre, ft={"video": render(ft_a, frames)[0], "attrs": ft_a},
                test={"video": tv, "text": tok(test_texts), "texts": test_texts})


# --------------------------------------------------------------------------- train + eval
def build_row_model(encoder: str, frames: int, seed: int):
    from vip.model import CLIPViP
    from vip.model.archs import build_clip
    torch.manual_seed(seed)
    clip = build_clip("vip-tiny")               # the same init for every row of a seed
    cfg = ModelConfig(arch="vip-tiny", video_encoder=encoder, max_frames=frames, num_proxies=4,
                      init_logit_scale=2.66, seq_layers=2)
    torch.manual_seed(seed + 1)                 # proxies / temporal embeddings: the same for every ViP row
    return CLIPViP(copy.deepcopy(clip), cfg)


def run_engine(model, rt, steps: int, batch: int, lr: float, make_batch, objective):
    """`steps` optimiser steps through the one engine; returns the last loss."""
    from vip.train.engine import build_engine, train_step
    tc = TrainConfig(global_batch=batch, precision="fp32", zero_stage=1, tensorboard=False)
    eng = build_engine(model, rt, tc, OptimConfig(lr=lr, warmup_ratio=0.05, weight_decay=0.05), micro_batch=batch,
                       total_steps=steps)
    last = float("nan")
    for s in range(steps):
        res = train_step(eng, make_batch(s), objective)
        if res.loss is not None:
            last = float(res.loss)
    return eng.module, last


@torch.no_grad()
def evaluate(model, test: dict) -> dict:
    from vip.eval.metrics import retrieval_metrics
    model.eval()
    v = torch.cat([model.encode_video(test["video"][i:i + 64]) for i in range(0, len(test["video"]), 64)])
    t = model.encode_text(test["text"])
    model.train()
    m = retrieval_metrics(t @ v.T, np.arange(len(t)))
    return {k: m[f"t2v_{k}"] for k in ("R@1", "R@5", "R@10")}


def run_row(name: str, data: Data, rt, seed: int, pre_steps: int, ft_steps: int, batch: int, lr: float,
            ft_lr: float, frames: int) -> dict:
    from vip.train.objectives import PretrainObjective, RetrievalObjective
    encoder, variant = ROWS[name]
    t0 = time.perf_counter()
    model = build_row_model(encoder, frames, seed)
    pre, loss = data.pre, float("nan")
    if variant is not None:
        order = np.random.default_rng(seed + 11)
        n = len(pre["subtitle"])

        def pre_batch(step):
            idx = torch.from_numpy(order.choice(n, batch, replace=False))
            return {"key": [str(int(i)) for i in idx], **{k: pre[k][idx] for k in
                    ("video", "frame", "subtitle", "caption", "has_caption")}}
        model, loss = run_engine(model, rt, pre_steps, batch, lr, pre_batch, PretrainObjective(variant, rt))
    zero = evaluate(model, data.test)
    tok = _Tokenizer("ViT-B-32", CONTEXT)
    ft_rng = np.random.default_rng(seed + 13)
    nf = len(data.ft["attrs"])

    def ft_batch(step):
        idx = ft_rng.choice(nf, batch, replace=False)
        texts = [description(*(data.ft["attrs"][i][k] for k in ("colour", "shape", "direction")), ft_rng) for i in idx]
        return {"key": [str(int(i)) for i in idx], "video": data.ft["video"][torch.from_numpy(idx)], "text": tok(texts)}
    model, _ = run_engine(model, rt, ft_steps, batch, ft_lr, ft_batch, RetrievalObjective(rt))
    tuned = evaluate(model, data.test)
    return {"row": name, "seed": seed, "zero_shot": zero, "finetuned": tuned, "pretrain_loss": loss,
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- run
def run(captioner: str, seeds: list[int], rows: list[str], pre_steps: int, ft_steps: int, n_pre: int, n_ft: int,
        frames: int = 4, batch: int = 32, lr: float = 5e-4, ft_lr: float = 2e-4, n_test: int | None = None,
        progress: bool = True, rt=None) -> dict:
    """Every row × seed; rt: a training Runtime (default: join a world of one on 127.0.0.1)."""
    from vip.train.runtime import init_runtime
    t0 = time.perf_counter()
    data = make_data(captioner, n_pre, n_ft, frames, n_test=n_test)
    acc = np.mean([a["colour"] in c.split() and a["shape"] in c.split()
                   for a, c in zip(data.pre["attrs"], data.pre["captions"])])
    t_data = time.perf_counter() - t0
    rt = rt or init_runtime(device="cpu", precision="fp32", training=True)
    results = []
    for seed in seeds:
        for name in rows:
            r = run_row(name, data, rt, seed, pre_steps, ft_steps, batch, lr, ft_lr, frames)
            results.append(r)
            if progress:
                print(f"seed {seed} {name}: zero-shot R@1 {r['zero_shot']['R@1']:.1f}, fine-tuned R@1 "
                      f"{r['finetuned']['R@1']:.1f} ({r['seconds']:.0f}s)", flush=True)
    return {"seeds": seeds, "rows": rows, "pre_steps": pre_steps, "ft_steps": ft_steps, "batch": batch,
            "n_pre": n_pre, "n_ft": n_ft, "n_test": len(data.test["texts"]), "frames": frames, "lr": lr,
            "ft_lr": ft_lr, "caption_accuracy_on_corpus": float(acc), "data_seconds": round(t_data, 1),
            "seconds": round(time.perf_counter() - t0, 1), "results": results,
            "examples": [{"subtitle": s, "caption": c, "truth": a} for s, c, a in
                         zip(data.pre["subtitles"][:6], data.pre["captions"][:6], data.pre["attrs"][:6])],
            "test_examples": data.test["texts"][:6]}


def _ms(vals: list[float]) -> str:
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"


def table(res: dict) -> str:
    lines = [f"Text→video retrieval on {res['n_test']} held-out clips with MSR-VTT-like descriptions "
             f"(chance R@1 {100 / res['n_test']:.1f}); post-pretraining {res['pre_steps']} steps × {res['batch']} "
             f"on {res['n_pre']} clips with ASR-like subtitles + captions of the middle frame; fine-tune "
             f"{res['ft_steps']} steps on {res['n_ft']} described clips; seeds {res['seeds']} (mean ± std)", "",
             "| model, post-pretraining loss | ZS R@1 | ZS R@5 | ZS R@10 | FT R@1 | FT R@5 | FT R@10 | FT mean R |",
             "|---|---|---|---|---|---|---|---|"]
    for name in res["rows"]:
        rs = [r for r in res["results"] if r["row"] == name]
        z = [_ms([r["zero_shot"][k] for r in rs]) for k in ("R@1", "R@5", "R@10")]
        f = [_ms([r["finetuned"][k] for r in rs]) for k in ("R@1", "R@5", "R@10")]
        mean_r = _ms([np.mean([r["finetuned"][k] for k in ("R@1", "R@5", "R@10")]) for r in rs])
        lines.append(f"| {name} | {' | '.join(z)} | {' | '.join(f)} | {mean_r} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captioner", default="data/captioner", help="captioner directory (trained here if missing)")
    ap.add_argument("--quick", action="store_true", help="smoke: 2 rows, 1 seed, a few steps, small data")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="*", default=None, choices=list(ROWS))
    ap.add_argument("--pre-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--n-pre", type=int, default=768)
    ap.add_argument("--n-ft", type=int, default=192)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ft-lr", type=float, default=2e-4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from captioning.trainer import accuracy_table, ensure_captioner
    cap_cfg = CaptionerTrainConfig(out=args.captioner)
    record = Path(args.captioner) / "captioner.json"
    if args.quick and record.exists():          # smoke: whatever captioner is there
        rec = json.loads(record.read_text())
    else:                                       # smoke without one: a few steps (colour only, roughly)
        rec = ensure_captioner(dataclasses.replace(cap_cfg, steps=100, train_images=512, eval_images=32)
                               if args.quick else cap_cfg)
    print(accuracy_table(rec))
    if args.quick:
        res = run(args.captioner, [0], list(QUICK_ROWS), 4, 3, 64, 32, args.frames, 16, args.lr, args.ft_lr, n_test=32)
    else:
        res = run(args.captioner, args.seeds, args.rows or list(ROWS), args.pre_steps, args.ft_steps, args.n_pre,
                  args.n_ft, args.frames, args.batch, args.lr, args.ft_lr)
    print(table(res))
    print(f"captions of the corpus naming colour and shape: {100 * res['caption_accuracy_on_corpus']:.1f} %; "
          f"total {res['seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
