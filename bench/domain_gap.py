"""The language domain gap in miniature (CLIP-ViP's Table 1 / Figure 2) through `vip analyze domain-gap`.

Writes three text corpora of the synthetic world as jsonl and runs the real command on them:

* subtitles: the speech register of the post-pretraining corpus (`shards.texts.speech_subtitle`);
* captions: the small trained captioner's captions of middle frames (rendered and prepared as the
  caption job prepares them; `captioning.trainer`), i.e. what the caption sidecars hold;
* descriptions: the evaluation register (`shards.texts.description`), for other clips.

NMI of 2-means clusters vs the corpus label (n texts each, repeats with fresh samples and seeds):
high = the two corpora are easy to tell apart = a large gap. The paper embeds with CLIP's text
encoder; offline there is none, so the model-free word statistics (`analyze.features=words`, TF-IDF)
come first, then each text tower given: vip-tiny random inits (several seeds: how much the
instrument itself varies) and any exported models (e.g. the demo's `runs/demo_vs/final` and
`runs/demo/final`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/domain_gap.py --captioner data/captioner \\
        --models runs/demo_vs/final runs/demo/final
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_corpora(out: Path, captioner: str, n: int, seed: int = 0) -> dict[str, str]:
    """subtitles / captions / descriptions jsonl ({"text"}) of n clips each (descriptions: other clips)."""
    from bench.ocl import caption_frames, clip_attrs
    from captioning.trainer import RENDER_H, RENDER_W
    from shards.synth import ClipPlan, render_frame
    from shards.texts import description, speech_subtitle
    rng = np.random.default_rng(seed + 5)
    train, held = clip_attrs(n, seed), clip_attrs(n, seed + 1)
    mids = np.stack([render_frame(ClipPlan(f"c{i}", 0.0, 1.0, a["colour"], a["shape"], a["direction"],
                                           a["background"], 0), 0.5, RENDER_W, RENDER_H) for i, a in enumerate(train)])
    texts = {"subtitles": [speech_subtitle(a["colour"], a["shape"], a["direction"], rng) for a in train],
             "captions": caption_frames(captioner, mids),
             "descriptions": [description(a["colour"], a["shape"], a["direction"], rng) for a in held]}
    paths = {}
    for name, lines in texts.items():
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return paths


def random_exports(out: Path, seeds: list[int]) -> dict[str, str]:
    """vip-tiny random inits exported as vip.load-able folders."""
    import torch

    from vip.config import ModelConfig
    from vip.model import build_model
    from vip.model.convert import export
    cfg = ModelConfig(arch="vip-tiny", init_logit_scale=2.66)
    dirs = {}
    for s in seeds:
        torch.manual_seed(s)
        dirs[f"vip-tiny random init, seed {s}"] = str(export(build_model(cfg), cfg, out / f"init{s}"))
    return dirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captioner", default="data/captioner")
    ap.add_argument("--models", nargs="*", default=[], help="exported vip models whose text tower to use too")
    ap.add_argument("--init-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=500, help="texts per corpus per repeat (and clips per corpus)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from vip.cli import main as vip_main
    work = Path(tempfile.mkdtemp(prefix="domain_gap_"))
    corpora = write_corpora(work, args.captioner, args.n)
    encoders = {"word TF-IDF (no model: analyze.features=words)": None,
                **random_exports(work, args.init_seeds), **{m: m for m in args.models}}
    rows = []
    for name, model in encoders.items():
        out = work / f"gap{len(rows)}.json"
        how = ["analyze.features=words"] if model is None else [f"analyze.model={model}", "analyze.device=cpu"]
        rc = vip_main(["analyze", "domain-gap", *how,
                       f"analyze.corpora=[{','.join(f'{k}={v}' for k, v in corpora.items())}]",
                       "analyze.pairs=[subtitles:descriptions,captions:descriptions]", f"analyze.n={args.n}",
                       f"analyze.repeats={args.repeats}", f"analyze.out={out}"])
        if rc != 0:
            return rc
        for r in json.loads(out.read_text()):
            rows.append({"encoder": name, **r})
    lines = [f"NMI of 2-means clusters vs corpus (n = {args.n} per corpus, {args.repeats} repeats; mean ± std)", "",
             "| text tower | subtitles vs descriptions | captions vs descriptions |", "|---|---|---|"]
    for name in encoders:
        cell = {r["a"]: f"{r['nmi_mean']:.3f} ± {r['nmi_std']:.3f}" for r in rows if r["encoder"] == name}
        lines.append(f"| {name} | {cell['subtitles']} | {cell['captions']} |")
    print("\n".join(lines))
    examples = {k: Path(v).read_text().splitlines()[:3] for k, v in corpora.items()}
    print(json.dumps(examples, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "examples": examples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
