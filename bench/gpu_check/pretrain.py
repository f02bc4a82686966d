"""Part 6, pretrain: short real `python -m vip.train` runs, one resumed; losses, samples and weights compared."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.gpu_check.device import ensure_optimizer
from bench.gpu_check.report import ROOT, release_memory

if TYPE_CHECKING:
    from bench.gpu_check.__main__ import Check


# --------------------------------------------------------------------------- 6. pretrain
TRAIN_WRAPPER = """\
import os, runpy, torch
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
runpy.run_module("vip.train", run_name="__main__", alter_sys=True)
"""


def tiny_shards(out: Path) -> Path:
    """12 tiny clips (192×108 sources) in 6 shards at 64 px: as tests/conftest.py's shard_dir."""
    from shards.build import build_shards
    from shards.config import ShardBuildConfig, SynthConfig
    from shards.synth import make_corpus
    synth = out / "synth"
    make_corpus(SynthConfig(out=str(synth), num_videos=4, clips_per_video=3, clip_seconds=2.0, gap_seconds=0.5,
                            width=192, height=108, fps=30, seed=1))
    cfg = ShardBuildConfig(metadata=f"{synth}/metadata.jsonl", subtitles=f"{synth}/subtitles.jsonl",
                           videos=f"{synth}/videos", out=str(out / "shards"), clips_per_shard=2, fps=8.0,
                           short_side=64, keyframe_interval=4, frame_short_side=64, workers=2)
    summary = build_shards(cfg)
    if summary.shards_failed or summary.clips_written != 12:
        raise RuntimeError(f"tiny shard build failed:\n{summary.table()}")
    return out / "shards"


def pretrain_args(shards: Path, out: Path, steps: int, save_every: int) -> list[str]:
    return ["--config", "tiny", f"data.shards={shards}", "data.batch_size=2", "data.num_workers=1",
            "data.num_frames=4", "data.image_size=32", "data.context_length=32", f"train.out={out}",
            f"train.steps={steps}", "train.global_batch=4", f"train.save_every={save_every}", "train.log_every=1",
            "train.log_keys=true", "train.tensorboard=false", "train.precision=auto",
            # a constant learning rate: a run of N/2 steps resumed to N follows the same schedule as N
            "optim.lr=1e-3", "optim.warmup_ratio=0", "optim.min_lr_ratio=1.0",
            "model.arch=vip-tiny", "model.num_proxies=2", "model.max_frames=4", "model.dropout=0.1"]


def run_trainer(ck: Check, args: list[str], log: Path) -> dict:
    """`python -m vip.train` as a world of one (its own port), deterministic kernels asked for."""
    from vip.train.runtime import free_port
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not ck.cuda:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", TRAIN_WRAPPER, *args], cwd=ROOT, env=env, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(5.0, ck.left() - 2))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = log.read_text(errors="replace")
    if rc is None:
        raise RuntimeError(f"vip.train did not finish in the time left; log tail:\n{text[-3000:]}")
    return {"rc": rc, "seconds": time.monotonic() - t0, "log_tail": text[-1500:] if rc else None,
            "resumed": "resumed from" in text}


def read_run(out: Path) -> dict:
    from vip.train.logs import read_metrics
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
    keys = [json.loads(line)["keys"] for line in (out / "keys" / "rank0.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in recs], "steps": [r["step"] for r in recs], "keys": keys,
            "nonfinite_skipped": recs[-1].get("nonfinite_skipped") if recs else None,
            "samples_per_s": [r.get("samples_per_s") for r in recs]}


def compare_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file
    sa, sb = load_file(str(a)), load_file(str(b))
    if sorted(sa) != sorted(sb):
        return {"same_keys": False, "bit_identical": False}
    import torch

    def raw(t):
        return t.reshape(-1).view(torch.uint8)            # the bytes, whatever the dtype (bf16 included)

    differing, worst = 0, 0.0
    for k in sa:
        x, y = sa[k], sb[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(raw(x), raw(y)):
            differing += 1
            if x.shape == y.shape and x.is_floating_point():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
    return {"same_keys": True, "tensors": len(sa), "tensors_differing": differing, "bit_identical": differing == 0,
            "max_abs_diff": worst}


def part_pretrain(ck: Check, res: dict) -> None:
    import torch
    N = 4 if ck.quick else (8 if not ck.cuda else 20)
    half = N // 2
    work = ck.tmp / "pretrain"
    shards = tiny_shards(work)
    res.update(steps=N, resume_at=half, world=1, backend="nccl" if ck.cuda else "gloo",
               precision="bf16" if ck.cuda and torch.cuda.is_bf16_supported() else "fp32",
               pin_memory=ck.cuda, deterministic_env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                                                      "cudnn.deterministic": True, "cudnn.benchmark": False},
               lr_schedule="constant (warmup_ratio=0, min_lr_ratio=1): the N/2 run follows the N run's schedule",
               runs={})
    if ck.cuda:
        ensure_optimizer(ck, res)
    release_memory()
    plan = [("A", work / "a", N, half), ("B1", work / "b", half, half), ("B2", work / "b", N, half)]
    for name, out, steps, save_every in plan:
        r = run_trainer(ck, pretrain_args(shards, out, steps, save_every) + [f"optim.adam={ck.adam()}"],
                        work / f"{name}.log")
        res["runs"][name] = r
        ck.save()
        if r["rc"] != 0:
            raise RuntimeError(f"run {name} ({steps} steps in {out.name}) exited {r['rc']}:\n{r['log_tail']}")
    a, b = read_run(work / "a"), read_run(work / "b")
    losses = a["losses"] + b["losses"]
    res.update(final_loss_a=a["losses"][-1] if a["losses"] else None,
               final_loss_b=b["losses"][-1] if b["losses"] else None,
               losses_a=a["losses"], losses_b=b["losses"],
               losses_finite=bool(losses) and all(math.isfinite(x) for x in losses),
               nonfinite_skipped=[a["nonfinite_skipped"], b["nonfinite_skipped"]],
               resumed=res["runs"]["B2"]["resumed"], same_samples=a["keys"] == b["keys"],
               steps_a=len(a["losses"]), steps_b=len(b["losses"]))
    res["weights"] = compare_weights(work / "a" / "final" / "model.safetensors",
                                     work / "b" / "final" / "model.safetensors")
    res["bit_identical"] = res["weights"]["bit_identical"]
    res["bit_identical_required"] = not ck.cuda        # bf16 GPU kernels may legitimately differ
    problems = []
    if not res["losses_finite"] or any(res["nonfinite_skipped"]):
        problems.append(f"non-finite losses: {losses}")
    if not res["resumed"]:
        problems.append("run B2 did not resume from B1's checkpoint")
    if not res["same_samples"]:
        problems.append("the resumed run consumed different samples than the uninterrupted one")
    if res["steps_a"] != N or res["steps_b"] != N:
        problems.append(f"steps logged: A {res['steps_a']}, B {res['steps_b']} (expected {N})")
    if res["bit_identical_required"] and not res["bit_identical"]:
        problems.append(f"final weights differ after the resume: {res['weights']}")
    if problems:
        res["error"] = "; ".join(problems)

