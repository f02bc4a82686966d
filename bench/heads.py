"""Retrieval heads (CLIP4Clip meanP / seqTransf, X-CLIP, DRL) on two synthetic tasks, and their scoring cost.

Part 1, quality. For each backbone (MeanPool: frame-wise CLIP, as the originals; ViP: CLIP-ViP's
proxy-guided encoder, frame features = each frame's patch tokens pooled and projected) and each
head (`none` = today's pooled features + InfoNCE, meanp, seqtransf, xclip, drl), one random-init
``vip-tiny`` (the same init for all) is fine-tuned with the one engine (`build_engine` +
`train_step` + `RetrievalObjective`, head parameters at their own lr) for the same number of steps
on two tasks, then scored on held-out clips with the head:

* ``order``: a coloured shape moving left vs right (or up vs down); a clip and its partner are
  exact time reversals and their captions differ only in the direction (bench/ablation.py's data);
* ``binding``: two shapes side by side; a clip and its partner swap the two colours and the
  captions differ only in which shape has which colour ("a red circle and a blue square" vs
  "a blue circle and a red square"): the words must be bound to the right frame content.

Printed: R@1 / R@5 text→video over all held-out clips, and R@1 within each pair (chance 50 %).

Part 2, cost. A training step's head loss (forward + backward) on a gathered global batch of 128
pairs' token features (what every rank holds after the all-gather), and scoring Nt × Nv with each head (D = 512, L = 32 words, T = 12 frames, blocks of
256 × 256) against plain dot-product scoring of pooled features: wall time and the peak resident
memory the scoring adds (each measurement in a fresh process). At 10k × 10k X-CLIP and DRL take
~10⁵ × the dot product's arithmetic, too slow for 2 CPU cores: by default their time is measured
on the first block-row(s) and scaled (marked "est."); their memory is measured (it does not grow
after the first block-row). `--full` runs everything.

Run (repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/heads.py                # default: quality + cost at 1k × 1k
    OMP_NUM_THREADS=2 .venv/bin/python bench/heads.py --no-quality --sizes 10000   # cost at 10k × 10k
    OMP_NUM_THREADS=2 .venv/bin/python bench/heads.py --quick        # CI smoke
    .venv/bin/python bench/heads.py --json heads.json
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS = ("none", "meanp", "seqtransf", "xclip", "drl")
BACKBONES = {"MeanPool": "meanpool", "ViP": "vip"}
SIZE, CONTEXT = 64, 16
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 220, 40),
                 "purple": (150, 60, 200), "white": (245, 245, 245)}
SHAPES2 = ("circle", "square", "triangle")
BIND_TEMPLATES = ("a {c1} {s1} and a {c2} {s2}", "a {c1} {s1} next to a {c2} {s2}",
                  "on the left a {c1} {s1}, on the right a {c2} {s2}")


# --------------------------------------------------------------------------- binding task data
def draw(img: np.ndarray, shape: str, colour: tuple, cx: float, cy: float, r: float) -> None:
    """A filled shape of radius r at (cx, cy) on img [H, W, 3] (in place)."""
    H, W = img.shape[:2]
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
    else:                                                                  # triangle, apex up
        m = (y <= cy + r * 0.8) & (y >= cy - r) & (np.abs(x - cx) <= (y - (cy - r)) * 0.6)
    img[m] = colour


def binding_clip(c1, s1, c2, s2, background, T, phase) -> np.ndarray:
    """uint8 [T, H, W, 3]: shape s1 (colour c1) on the left, s2 (c2) on the right, drifting down."""
    frames = []
    for t in range(T):
        img = np.empty((SIZE, SIZE, 3), np.uint8)
        img[:] = background
        dy = 4 * np.sin(phase + t * 0.6)
        draw(img, s1, SHAPE_COLOURS[c1], 17, 32 + dy, 11)
        draw(img, s2, SHAPE_COLOURS[c2], 47, 32 - dy, 11)
        frames.append(img)
    return np.stack(frames)


def binding_data(held_out: int, T: int, rng: np.random.Generator):
    """(train, test): (videos [G, 2, T, 3, H, W], captions [G][2] as (c1, s1, c2, s2)); a group is a
    colour pair × shape pair, its two clips swap the colours."""
    from shards.reader import normalise
    groups = [(a, b, s, u) for a, b in itertools.combinations(SHAPE_COLOURS, 2)
              for s, u in itertools.permutations(SHAPES2, 2)]
    order = rng.permutation(len(groups))
    split = {"test": [groups[i] for i in order[:held_out]], "train": [groups[i] for i in order[held_out:]]}
    out = {}
    for name, gs in split.items():
        clips, labels = [], []
        for c1, c2, s1, s2 in gs:
            bg = tuple(int(v) for v in rng.integers(0, 80, 3))
            phase = float(rng.uniform(0, 6.28))
            for a, b in ((c1, c2), (c2, c1)):
                clips.append(binding_clip(a, s1, b, s2, bg, T, phase))
                labels.append((a, s1, b, s2))
        v = normalise(np.stack(clips))
        out[name] = (v.view(len(gs), 2, *v.shape[1:]), labels)
    return out["train"], out["test"]


def binding_caption(label, template: int = 0) -> str:
    c1, s1, c2, s2 = label
    return BIND_TEMPLATES[template % len(BIND_TEMPLATES)].format(c1=c1, s1=s1, c2=c2, s2=s2)


def order_data(T: int, rng: np.random.Generator, quick: bool):
    from bench.ablation import group_tensors, make_groups, split_combos
    train_c, test_c = split_combos(rng, held_out=6)
    return (group_tensors(make_groups(train_c, 1 if quick else 3, rng), T),
            group_tensors(make_groups(test_c, 2, rng), T))


def order_caption(label, template: int = 0) -> str:
    from shards.synth import describe
    return describe(*label, template=template)


TASKS = {"order": (order_caption, 5), "binding": (binding_caption, len(BIND_TEMPLATES))}


# --------------------------------------------------------------------------- training through the engine
def fine_tune(model, head: str, train, caption, n_templates, rt, steps: int, lr: float, head_lr: float,
              T: int, seed: int) -> float:
    """`steps` optimiser steps of 8 groups (16 clips: every partner an in-batch negative) through the engine."""
    from vip.config import OptimConfig, TrainConfig
    from vip.model.archs import Tokenizer
    from vip.model.heads import attach_head, make_head
    from vip.train.engine import build_engine, train_step
    from vip.train.objectives import RetrievalObjective
    torch.manual_seed(seed)
    if head != "none":
        attach_head(model, make_head(head, model, context_length=CONTEXT, num_frames=T, layers=2))
        model.param_lr = {"head.": head_lr}
    tc = TrainConfig(out="/tmp/vip-bench-heads", global_batch=16, precision="fp32", zero_stage=0)
    oc = OptimConfig(lr=lr, warmup_ratio=0.05, weight_decay=0.05, adam="torch")
    engine = build_engine(model, rt, tc, oc, micro_batch=16, total_steps=steps)
    objective = RetrievalObjective(rt, head=head != "none", regulariser_weight=1e-3 if head == "drl" else 0.0)
    tok = Tokenizer("vip-tiny", CONTEXT)
    video, labels = train
    rng = np.random.default_rng(seed)
    G = video.shape[0]
    loss = float("nan")
    for _ in range(steps):
        idx = rng.choice(G, size=8, replace=False)
        texts = [caption(labels[2 * g + k], int(rng.integers(n_templates))) for g in idx for k in range(2)]
        res = train_step(engine, {"key": [str(i) for i in range(16)], "video": video[idx].flatten(0, 1),
                                  "text": tok(texts)}, objective)
        loss = float(res.loss) if res.loss is not None else loss
    return loss


@torch.no_grad()
def evaluate(model, head: str, test, caption) -> dict:
    """R@1 / R@5 text→video over all held-out clips; R@1 within each pair (ties split)."""
    from vip.model.archs import Tokenizer
    model.eval()
    video, labels = test
    v = video.flatten(0, 1)
    toks = Tokenizer("vip-tiny", CONTEXT)([caption(lab) for lab in labels])
    if head == "none":
        sim = model.encode_text(toks) @ model.encode_video(v).T
    else:
        frames, fm = model.encode_video_frames(v)
        s, w, wm = model.encode_text_tokens(toks)
        sim = model.head(s, w, wm, frames, fm)
    n = sim.shape[0]
    gt = sim.diagonal()[:, None]
    rank = (sim > gt + 1e-6).sum(1)
    pair = sim.view(n // 2, 2, n // 2, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)     # [G, 2 texts, 2 videos]
    pgt = pair.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    higher, ties = (pair > pgt + 1e-6).sum(-1), ((pair - pgt).abs() <= 1e-6).sum(-1)
    return {"R@1": float((rank < 1).float().mean() * 100), "R@5": float((rank < 5).float().mean() * 100),
            "pair_R@1": float(torch.where(higher == 0, 1.0 / ties, 0.0).mean() * 100), "clips": n}


def quality(quick: bool, steps: int, T: int, seed: int, lr: float, head_lr: float, heads, backbones, tasks) -> list:
    from vip.config import ModelConfig
    from vip.model import CLIPViP, build_clip
    from vip.train.runtime import init_runtime
    rt = init_runtime(device="cpu", precision="fp32", training=True)
    torch.manual_seed(seed)
    clip = build_clip("vip-tiny")
    rng = np.random.default_rng(seed)
    data = {"order": order_data(T, rng, quick), "binding": binding_data(8, T, rng)}
    rows = []
    for task in tasks:
        caption, n_templates = TASKS[task]
        train, test = data[task]
        for bname in backbones:
            for head in heads:
                t0 = time.perf_counter()
                torch.manual_seed(seed)
                cfg = ModelConfig(arch="vip-tiny", video_encoder=BACKBONES[bname], max_frames=T, num_proxies=4,
                                  init_logit_scale=float(np.log(10.0)))
                model = CLIPViP(copy.deepcopy(clip), cfg)
                loss = fine_tune(model, head, train, caption, n_templates, rt, steps, lr, head_lr, T, seed)
                r = evaluate(model, head, test, caption)
                rows.append({"task": task, "backbone": bname, "head": head, **r, "loss": loss,
                             "seconds": time.perf_counter() - t0})
                print(f"  {task:8s} {bname:8s} {head:9s} R@1 {r['R@1']:5.1f} R@5 {r['R@5']:5.1f} "
                      f"pair R@1 {r['pair_R@1']:5.1f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- scoring cost
def measure(head: str, n: int, chunk: int, rows: int | None, D: int = 512, L: int = 32, T: int = 12) -> dict:
    """In this process: score n texts × n videos; seconds and peak RSS added (MiB)."""
    from vip.model.heads import DRLHead, MeanPHead, SeqTransfHead, XCLIPHead
    torch.manual_seed(0)
    sentence, frames = torch.randn(n, D), torch.randn(n, T, D)
    words, wm = torch.randn(n, L, D), torch.ones(n, L, dtype=torch.bool)
    wm[:, L // 2:] = False                                                 # half the positions are padding
    fm = torch.ones(n, T, dtype=torch.bool)
    make = {"meanp": lambda: MeanPHead(), "seqtransf": lambda: SeqTransfHead(D, 4, 8),
            "xclip": lambda: XCLIPHead(D, L, T, heads=8), "drl": lambda: DRLHead(D, heads=8)}
    h = make[head]().eval() if head != "dot" else None
    peak = PeakRSS()
    t0 = time.perf_counter()
    with torch.no_grad():
        if h is None:
            v = torch.nn.functional.normalize(frames.mean(1), dim=-1)
            sim = torch.nn.functional.normalize(sentence, dim=-1) @ v.T
            blocks_done = blocks_all = 1
        else:                                     # the preparation chunked as head.forward does it
            from vip.model.heads.base import chunked
            t = chunked(h.prepare_text, (sentence, words, wm), 4 * chunk)
            vv = chunked(h.prepare_video, (frames, fm), 4 * chunk)
            t_prep = time.perf_counter() - t0
            blocks_all = -(-n // chunk)
            blocks_done = min(rows or blocks_all, blocks_all)
            t1 = time.perf_counter()
            sim = h.score(t, vv, chunk, max_row_blocks=blocks_done)
            t_rows = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    if h is not None and blocks_done < blocks_all:
        seconds = t_prep + t_rows * blocks_all / blocks_done
        sim = torch.zeros(n, n)                                            # the full output (pages touched)
    extra = peak.stop()
    assert sim.shape[1] == n
    return {"head": head, "n": n, "seconds": seconds, "peak_mib": extra, "estimated": blocks_done < blocks_all}


def measure_train(head: str, batch: int, D: int = 512, L: int = 32, T: int = 12) -> dict:
    """In this process: the head's training loss on a gathered global batch (token features of
    `batch` pairs, with gradient) forward + backward; seconds and peak RSS added (MiB)."""
    from vip.model.heads import DRLHead, MeanPHead, SeqTransfHead, XCLIPHead
    from vip.train.objectives import head_retrieval_loss
    torch.manual_seed(0)
    leaf = [torch.randn(batch, D, requires_grad=True), torch.randn(batch, L, D, requires_grad=True),
            torch.randn(batch, T, D, requires_grad=True)]
    wm = torch.ones(batch, L, dtype=torch.bool)
    wm[:, L // 2:] = False
    fm = torch.ones(batch, T, dtype=torch.bool)
    scale = torch.tensor(4.6)
    make = {"meanp": lambda: MeanPHead(), "seqtransf": lambda: SeqTransfHead(D, 4, 8),
            "xclip": lambda: XCLIPHead(D, L, T, heads=8), "drl": lambda: DRLHead(D, heads=8)}
    h = make[head]() if head != "dot" else None
    peak = PeakRSS()
    t0 = time.perf_counter()
    if h is None:
        from vip.losses import clip_loss
        v = torch.nn.functional.normalize(leaf[2].mean(1), dim=-1)
        loss = clip_loss(v, torch.nn.functional.normalize(leaf[0], dim=-1), scale.exp())
    else:
        sim, reg = h(leaf[0], leaf[1], wm, leaf[2], fm, chunk_size=batch, regularise=True)
        loss, _ = head_retrieval_loss(sim, scale, reg, 1e-3 if head == "drl" else 0.0)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"head": head, "n": batch, "seconds": seconds, "peak_mib": peak.stop(), "estimated": False,
            "train": True}


class PeakRSS:
    """Peak resident memory above the level at construction (MiB), sampled every 2 ms from /proc."""

    def __init__(self):
        import threading
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        return (self.peak - self.base) / 2 ** 20


def cost(sizes, heads, full: bool, chunk: int, train_batch: int) -> list:
    rows = []
    for n in [-train_batch] + list(sizes):                                 # negative: a training step
        for head in ("dot", *[h for h in heads if h != "none"]):
            slow = head in ("xclip", "drl") and n > 2000 and not full
            cmd = [sys.executable, __file__, "--_measure", head, str(n), str(chunk), str(1 if slow else 0)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(
                __file__).resolve().parents[1])})
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  cost {head:9s} {n} {rows[-1]['seconds']:.2f} s {rows[-1]['peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- report
def table(res: dict) -> str:
    q = res["quality"]
    out = [f"Quality: vip-tiny from one random init, {res['steps']} steps × 16 clips, T={res['frames']}, "
           f"lr {res['lr']} (head {res['head_lr']}); held-out clips", "",
           "| task | backbone | head | R@1 | R@5 | pair R@1 (chance 50) | train loss | time (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in q:
        out.append(f"| {r['task']} | {r['backbone']} | {r['head']} | {r['R@1']:.1f} | {r['R@5']:.1f} | "
                   f"{r['pair_R@1']:.1f} | {r['loss']:.3f} | {r['seconds']:.0f} |")
    if res["cost"]:
        out += ["", "Scoring cost: D=512, L=32 (half padding), T=12, blocks 256×256, CPU fp32; ratio to dot product "
                "(est. = time scaled from the first block-row)", "",
                "| texts × videos | head | time (s) | × dot | peak extra memory (MiB) | × dot |", "|---|---|---|---|---|---|"]
        dots = {(r["n"], r.get("train", False)): r for r in res["cost"] if r["head"] == "dot"}
        for r in res["cost"]:
            d = dots[(r["n"], r.get("train", False))]
            what = f"train step, batch {r['n']}" if r.get("train") else f"{r['n']}×{r['n']}"
            out.append(f"| {what} | {r['head']} | {r['seconds']:.2f}{' (est.)' if r['estimated'] else ''} | "
                       f"{r['seconds'] / max(d['seconds'], 1e-9):.0f} | {r['peak_mib']:.0f} | "
                       f"{r['peak_mib'] / max(d['peak_mib'], 1e-9):.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: few steps, small cost sizes")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 60; quick 4)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--heads", nargs="*", choices=HEADS, default=list(HEADS))
    ap.add_argument("--backbones", nargs="*", choices=list(BACKBONES), default=list(BACKBONES))
    ap.add_argument("--tasks", nargs="*", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--sizes", nargs="*", type=int, default=None, help="cost: N for N×N (default 1000; the 10k run: --no-quality --sizes 10000)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="cost: time every block of X-CLIP / DRL at 10k")
    ap.add_argument("--train-batch", type=int, default=128, help="cost: a training step's loss at this global batch")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_measure", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        head, n, chunk, rows = args._measure
        res = measure_train(head, -int(n)) if int(n) < 0 else measure(head, int(n), int(chunk), int(rows) or None)
        print(json.dumps(res))
        return 0
    steps = args.steps if args.steps is not None else (4 if args.quick else 60)
    sizes = args.sizes if args.sizes is not None else ([300] if args.quick else [1000])
    res = {"steps": steps, "frames": args.frames, "lr": args.lr, "head_lr": args.head_lr, "quality": [], "cost": []}
    if not args.no_quality:
        res["quality"] = quality(args.quick, steps, args.frames, args.seed, args.lr, args.head_lr, args.heads,
                                 args.backbones, args.tasks)
    res["cost"] = cost(sizes, args.heads, args.full, args.chunk, 16 if args.quick else args.train_batch)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
