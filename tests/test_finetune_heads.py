"""`vip finetune finetune.head=…` then `vip eval eval.head=…` / `vip.load` end to end on a tiny
synthetic set: each head in one process (a real gloo group of one), and the token heads on 2
DeepSpeed ranks (gloo), whose losses must equal the one-process run on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ft_set(tmp_path_factory, palette, write_video):
    """8 training videos (4 colours × 2 lengths), 4 validation videos, annotations, a tiny ViP export."""
    from vip.config import ModelConfig
    from vip.model import build_model
    from vip.model.convert import export
    d = tmp_path_factory.mktemp("ftheads")
    vids = d / "videos"
    vids.mkdir()
    train, val = [], []
    for c in palette:
        for k in range(3):
            cid = f"{c}{k}"
            write_video(vids / f"{cid}.mp4", c, n=7 + k)
            (val if k == 2 else train).append({"clip_id": cid, "text": [f"a {c} square moves right", f"{c} box"]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4, init_logit_scale=2.66)
    export(build_model(cfg), cfg, d / "init")
    return d


def _overrides(d, out, head, micro):
    return [f"finetune.annotations={d}/train.jsonl", f"finetune.videos={d}/videos",
            f"finetune.val_annotations={d}/val.jsonl", f"train.init_from={d}/init", f"train.out={out}",
            "finetune.epochs=2", "optim.lr=1e-3", "finetune.head_lr=1e-2", "train.global_batch=4",
            f"data.batch_size={micro}", "finetune.num_frames=4", "finetune.num_workers=0",
            "finetune.context_length=16", f"finetune.head={head}", "finetune.head_layers=1",
            "finetune.cdcr_lambda=0.5"]


def _run_in_process(d, out, head, rt):
    from vip.config import load_config
    from vip.train.finetune import _finetune
    cfg = load_config("finetune", _overrides(d, out, head, micro=4))
    assert _finetune(cfg, rt, {"rank": 0, "step": 0}) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["meanp", "seqtransf", "xclip", "drl"])
def test_finetune_with_head_then_eval(ft_set, train_rt, tmp_path, head):
    import vip
    from vip.cli import main as cli
    from vip.model.convert import load, read_head_spec
    from vip.model.heads import make_head
    recs = _run_in_process(ft_set, tmp_path / "ft", head, train_rt)
    assert [r["epoch"] for r in recs] == [1, 2] and all(r["loss"] == r["loss"] for r in recs)
    best = tmp_path / "ft" / "best"
    spec = read_head_spec(best)
    assert spec["name"] == head and spec["context_length"] == 16
    model = load(best)
    # the head was trained (and exported): its weights moved away from the originals' initialisation
    torch.manual_seed(0)
    init = make_head(head, load(ft_set / "init"), context_length=16, num_frames=4, layers=1)
    moved = [not torch.equal(a, b) for a, b in zip(model.head.state_dict().values(), init.state_dict().values())]
    assert (any(moved) if head != "meanp" else not moved)
    # vip eval with the head: the metrics match scoring the same features with the loaded head directly
    out = tmp_path / "eval.json"
    rc = cli(["eval", f"eval.model={best}", f"eval.annotations={ft_set}/val.jsonl", f"eval.videos={ft_set}/videos",
              "eval.num_frames=4", f"eval.head={head}", f"eval.out={out}", "eval.device=cpu", "eval.head_chunk=3"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["head"] == head and res["videos"] == 4 and res["texts"] == 8
    m = vip.load(best, num_frames=4)
    rows = [json.loads(x) for x in (ft_set / "val.jsonl").read_text().splitlines()]
    texts = [t for r in rows for t in r["text"]]
    sim = m.similarity([ft_set / "videos" / f"{r['clip_id']}.mp4" for r in rows], texts)
    t2v = torch.tensor([i for i, r in enumerate(rows) for _ in r["text"]])
    ranks = (sim > sim[torch.arange(len(texts)), t2v][:, None]).sum(1)
    assert res["metrics"]["t2v_R@1"] == pytest.approx(100.0 * float((ranks == 0).float().mean()))
    if head != "meanp":                               # eval.head=none scores the pooled features instead
        assert not torch.allclose(sim, m.similarity([ft_set / "videos" / f"{r['clip_id']}.mp4" for r in rows],
                                                    texts, head=False))
    # a head the export does not carry is a config error (exit 2)
    other = "drl" if head != "drl" else "xclip"
    assert cli(["eval", f"eval.model={best}", f"eval.annotations={ft_set}/val.jsonl",
                f"eval.videos={ft_set}/videos", f"eval.head={other}", f"eval.out={out}"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("head", ["xclip", "drl"])
def test_two_ranks_equal_one(ft_set, train_rt, tmp_path, free_port, head):
    """2 DeepSpeed ranks (micro-batch 2) train on the same global batches as 1 process (micro-batch 4):
    token features gathered with gradient give the same losses and validation metrics."""
    one = _run_in_process(ft_set, tmp_path / "one", head, train_rt)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "vip.train.finetune",
           *_overrides(ft_set, tmp_path / "two", head, micro=2)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["val_t2v_R@1"] == a["val_t2v_R@1"] and b["val_v2t_R@1"] == a["val_v2t_R@1"]
    assert json.loads((tmp_path / "two/best/config.json").read_text())["head"]["name"] == head
