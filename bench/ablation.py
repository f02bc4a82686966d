"""Temporal-order ablation in miniature: can a video encoder tell a clip from its reverse?

The paper's video-proxy ablation on synthetic clips whose captions differ only in the direction
of motion. A *group* is one colour + shape on one background moving along one axis, rendered
twice: left vs right (or up vs down). With frames sampled at symmetric times the two clips of a
group are exact time reversals of each other, so only temporal order tells them apart.

All encoders (MeanPool, SeqTransformer, FullAttention, ViP) wrap copies of one random-weight
``vip-tiny`` CLIP (one ``torch.manual_seed``), so their shared towers start identical; each is
trained with a plain AdamW loop on symmetric InfoNCE (`vip.losses.clip_loss`). Every batch holds
whole groups, so the other direction is always an in-batch hard negative.

Evaluation is on held-out colour × shape combinations (and backgrounds): R@1 *within each group*
(2 candidates, chance 50 %), text→video and video→text. Scores within `TIE_TOL` of the
ground truth count as ties, split evenly (expected R@1 under random tie-breaking): a mean over
frames gives a clip and its reverse the same embedding, so MeanPool scores chance exactly.

Run (repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/ablation.py            # default run, < 5 min on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/ablation.py --quick    # CI smoke, < 60 s
    .venv/bin/python bench/ablation.py --json ablation.json
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.reader import _Tokenizer, normalise  # noqa: E402
from shards.synth import COLOURS, SHAPES, TEMPLATES, ClipPlan, describe, render_frame  # noqa: E402
from vip.config import ModelConfig  # noqa: E402
from vip.losses import clip_loss  # noqa: E402

ENCODERS = {"MeanPool": "meanpool", "SeqTransformer": "seqtransf", "FullAttention": "full", "ViP": "vip"}
AXES = (("left", "right"), ("up", "down"))     # a group's two directions: time reversals of each other
TIE_TOL = 1e-5
SIZE = 64
LOGIT_SCALE = float(np.log(10.0))              # initial temperature 1/10: the tiny random CLIP collapses at 100
CONTEXT = 16                                    # text tokens (the captions are short)


# --------------------------------------------------------------------------- data
def frame_times(T: int) -> np.ndarray:
    """Symmetric sample times u_i = (i + 0.5) / T in a unit-length clip, so u_i = 1 - u_{T-1-i}."""
    return (np.arange(T) + 0.5) / T


def render_clip(colour: str, shape: str, direction: str, background: tuple, T: int) -> np.ndarray:
    """uint8 [T, H, W, 3] of one clip (start 0, end 1)."""
    plan = ClipPlan("x", 0.0, 1.0, colour, shape, direction, background, 0)
    return np.stack([render_frame(plan, float(t), SIZE, SIZE) for t in frame_times(T)])


def make_groups(combos: list[tuple[str, str]], backgrounds: int, rng: np.random.Generator) -> list[dict]:
    """One group per (combo, axis, background): {"colour", "shape", "axis", "background"}."""
    out = []
    for (c, s), axis in itertools.product(combos, AXES):
        for _ in range(backgrounds):
            out.append({"colour": c, "shape": s, "axis": axis,
                        "background": tuple(int(v) for v in rng.integers(0, 90, size=3))})
    return out


def group_tensors(groups: list[dict], T: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """Videos [G, 2, T, 3, H, W] (CLIP-normalised) and the (colour, shape, direction) of each clip."""
    clips, labels = [], []
    for g in groups:
        for d in g["axis"]:
            clips.append(render_clip(g["colour"], g["shape"], d, g["background"], T))
            labels.append((g["colour"], g["shape"], d))
    video = normalise(np.stack(clips))                                     # [2G, T, 3, H, W]
    return video.view(len(groups), 2, *video.shape[1:]), labels


def split_combos(rng: np.random.Generator, held_out: int) -> tuple[list, list]:
    """Colour × shape combinations, `held_out` of them reserved for evaluation."""
    combos = list(itertools.product(COLOURS, SHAPES))
    order = rng.permutation(len(combos))
    test = [combos[i] for i in order[:held_out]]
    train = [combos[i] for i in order[held_out:]]
    return train, test


# --------------------------------------------------------------------------- models
def build_encoders(T: int, seed: int, init_logit_scale: float = LOGIT_SCALE) -> dict[str, torch.nn.Module]:
    """Each video encoder around a copy of the same random vip-tiny CLIP."""
    from vip.model import CLIPViP, build_clip
    torch.manual_seed(seed)
    clip = build_clip("vip-tiny")
    out = {}
    for name, kind in ENCODERS.items():
        cfg = ModelConfig(arch="vip-tiny", video_encoder=kind, max_frames=T, seq_layers=2, num_proxies=4,
                          init_logit_scale=init_logit_scale)
        out[name] = CLIPViP(copy.deepcopy(clip), cfg)
    return out


def within_group_r1(sim: torch.Tensor) -> tuple[float, float]:
    """sim [G, 2 texts, 2 videos] (text i ↔ video i). Expected R@1 (%) under random tie-breaking,
    (text→video, video→text); ties = scores within TIE_TOL of the ground truth."""
    def r1(s: torch.Tensor) -> float:                                      # s [G, queries, candidates]
        gt = s.diagonal(dim1=1, dim2=2).unsqueeze(-1)                      # [G, 2, 1]
        higher = (s > gt + TIE_TOL).sum(-1)
        ties = ((s - gt).abs() <= TIE_TOL).sum(-1)                          # includes the ground truth
        return float(torch.where(higher == 0, 1.0 / ties, 0.0).mean() * 100)
    return r1(sim), r1(sim.transpose(1, 2))


@torch.no_grad()
def evaluate(model, video: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """video [G, 2, T, 3, H, W], tokens [G, 2, L] → within-group R@1 (t2v, v2t)."""
    model.eval()
    G = video.shape[0]
    v = model.encode_video(video.flatten(0, 1)).view(G, 2, -1)             # [G, 2, D]
    t = model.encode_text(tokens.flatten(0, 1)).view(G, 2, -1)             # [G, 2, D]
    return within_group_r1(t @ v.transpose(1, 2))                          # [G, 2, 2]


def train(model, video: torch.Tensor, labels: list, tok, steps: int, groups_per_batch: int, lr: float,
          seed: int) -> float:
    """AdamW on symmetric InfoNCE; random caption template per clip. Returns the last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    G = video.shape[0]
    loss = torch.zeros(())
    for _ in range(steps):
        idx = rng.choice(G, size=groups_per_batch, replace=False)
        v = video[idx].flatten(0, 1)                                       # [2g, T, 3, H, W]
        texts = [describe(*labels[2 * g + k], template=int(rng.integers(len(TEMPLATES))))
                 for g in idx for k in range(2)]
        out = model(video=v, caption=tok(texts))
        loss = clip_loss(out["video"], out["caption"], out["logit_scale"].exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- run
def run(quick: bool = False, steps: int | None = None, frames: int = 4, seed: int = 0,
        encoders: list[str] | None = None, lr: float = 3e-4) -> dict:
    steps = steps if steps is not None else (40 if quick else 800)
    rng = np.random.default_rng(seed)
    train_combos, test_combos = split_combos(rng, held_out=6)
    train_v, train_l = group_tensors(make_groups(train_combos, 1 if quick else 3, rng), frames)
    test_v, test_l = group_tensors(make_groups(test_combos, 2, rng), frames)
    tok = _Tokenizer("ViT-B-32", CONTEXT)
    test_tok = tok([describe(*lab) for lab in test_l]).view(test_v.shape[0], 2, -1)
    models = build_encoders(frames, seed)
    rows = []
    for name in encoders or list(ENCODERS):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        loss = train(models[name], train_v, train_l, tok, steps, 8, lr, seed)
        t2v, v2t = evaluate(models[name], test_v, test_tok)
        rows.append({"encoder": name, "t2v_R@1": t2v, "v2t_R@1": v2t, "chance": 50.0,
                     "final_loss": loss, "seconds": time.perf_counter() - t0})
    return {"frames": frames, "steps": steps, "train_groups": int(train_v.shape[0]),
            "test_groups": int(test_v.shape[0]), "seed": seed, "rows": rows}


def table(res: dict) -> str:
    lines = [f"Direction retrieval within reversal pairs ({res['test_groups']} held-out groups, "
             f"T={res['frames']}, {res['steps']} steps, vip-tiny from one random init)", "",
             "| encoder | t2v R@1 | v2t R@1 | chance | train loss | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['encoder']} | {r['t2v_R@1']:.1f} | {r['v2t_R@1']:.1f} | {r['chance']:.1f} | "
                     f"{r['final_loss']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: few steps, one background per group")
    ap.add_argument("--steps", type=int, default=None, help="training steps per encoder (default 800; quick 40)")
    ap.add_argument("--frames", type=int, default=4, help="frames per clip (4-8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--encoders", nargs="*", choices=list(ENCODERS), default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    res = run(args.quick, args.steps, args.frames, args.seed, args.encoders, args.lr)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
