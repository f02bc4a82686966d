"""`vip finetune finetune.method=eao` end to end on a synthetic audio task (1 and 2 CPU ranks), the
fusion objective's gradient across ranks, `vip eval` and `vip.load` of the fused model.

The task: clips of a coloured square with a soundtrack (shards.synth_audio tones); each text
names the colour and the sound. Four clips share each colour, so from the frames alone a text
can find its clip among four look-alikes at best; with the audio it can find it exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.fusion import COLOURS, write_clip   # the bench's audio task: one clip writer

FUSION = ["model.fusion.dim=64", "model.fusion.num_heads=4", "model.fusion.projection_dim=64",
          "model.fusion.audio_width=32", "model.fusion.audio_layers=1", "model.fusion.audio_heads=2",
          "model.fusion.audio_patch_frames=10", "data.audio_seconds=1.0"]


def _clip(path, colour, sound, variant, seconds=1.2):
    """A square of `colour` at a variant-dependent place, and the tone of `sound` plus noise."""
    write_clip(path, colour, sound, (8 + 6 * (variant % 5), 8 + 5 * (variant % 7)), variant, seconds)


@pytest.fixture(scope="module")
def audio_task(tmp_path_factory):
    from shards.synth_audio import PHRASES, SOUNDS
    d = tmp_path_factory.mktemp("eao_task")
    (d / "videos").mkdir()
    train, val, v = [], [], 0
    for colour in COLOURS:
        for sound in SOUNDS:
            text = f"a {colour} square {PHRASES[sound]}"
            for k in range(3):
                cid = f"{colour}_{sound}_{k}"
                _clip(d / "videos" / f"{cid}.mp4", colour, sound, v)
                v += 1
                (val if k == 2 else train).append({"clip_id": cid, "text": text})
    for name, rows in (("train", train), ("val", val)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from vip.config import ModelConfig
    from vip.model import build_model
    from vip.model.convert import export
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4)
    export(build_model(cfg), cfg, d / "init")
    return d


def _finetune(task, out, port, nproc=1, epochs=15, extra=()):
    """`vip finetune finetune.method=eao` (nproc > 1: torchrun). The loss weights are the original's
    equal-weight ablation (disentangled_equal_weights.yaml): with the default 1/0.1 weights the
    audio terms learn ~10x slower, more steps than a test should take (bench/fusion.py runs both)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    args = ["finetune.method=eao", f"finetune.annotations={task}/train.jsonl", f"finetune.videos={task}/videos",
            f"finetune.val_annotations={task}/val.jsonl", f"train.init_from={task}/init", f"train.out={out}",
            f"finetune.epochs={epochs}", "optim.lr=1e-3", "optim.weight_decay=0.0", "optim.warmup_ratio=0.0",
            "train.global_batch=8", f"data.batch_size={8 // nproc}", "finetune.num_frames=4",
            "loss.fusion_weights=[1,1,1,1,1,1]",
            "finetune.num_workers=0", "finetune.context_length=32", *FUSION, *extra]
    if nproc == 1:
        cmd = [str(Path(sys.executable).parent / "vip"), "finetune", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={port}", "-m", "vip.train.finetune", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eao_finetune_one_rank_fusion_beats_video(audio_task, tmp_path, free_port):
    recs = _finetune(audio_task, tmp_path / "ft", free_port())
    last = recs[-1]
    assert last["val_t2va_R@1"] >= last["val_t2v_R@1"] + 30, last         # the sound tells look-alikes apart
    assert last["val_t2v_R@1"] <= 50                                      # frames alone cannot
    sel = json.loads((tmp_path / "ft/best/selection.json").read_text())
    assert sel["criterion"].startswith("val t2va")
    # the exported best model: vip.load → encode_audio and fused embeddings; vip eval reports all three
    import vip
    m = vip.load(tmp_path / "ft/best")
    assert hasattr(m, "encode_audio") and hasattr(m, "encode_fused")
    out = tmp_path / "eval.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(Path(sys.executable).parent / "vip"), "eval", f"eval.model={tmp_path}/ft/best",
                        f"eval.annotations={audio_task}/val.jsonl", f"eval.videos={audio_task}/videos",
                        "eval.num_frames=4", f"eval.out={out}", "data.audio_seconds=1.0"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "text → video+audio" in p.stdout
    res = json.loads(out.read_text())
    assert res["metrics"]["t2va_R@1"] == pytest.approx(sel["val_metrics"]["t2va_R@1"])
    assert {"t2v_MdR", "t2a_MnR", "t2va_R@10"} <= set(res["metrics"])


@pytest.mark.slow
def test_eao_finetune_two_ranks(audio_task, tmp_path, free_port):
    """The same run on 2 ranks (gloo, torchrun): embeddings gathered with gradient, same global batch."""
    recs = _finetune(audio_task, tmp_path / "ft2", free_port(), nproc=2)
    last = recs[-1]
    assert len(recs) == 15 and last["step"] == 15 * 4                      # 32 clips / global batch 8
    assert last["val_t2va_R@1"] >= last["val_t2v_R@1"] + 30, last


def test_fusion_objective_two_ranks_equals_one_process(tmp_path, free_port):
    """FusionObjective on 2 gloo ranks (half the batch each) gives the 1-process loss and gradient."""
    import torch.multiprocessing as mp
    port = free_port()
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    _rank_main(0, 1, port, str(tmp_path))
    one = torch.load(tmp_path / "w1_r0.pt", weights_only=True)
    assert len(one["grad"]) >= 4 and all(g.abs().sum() > 0 for g in one["grad"].values())
    for r in range(2):
        two = torch.load(tmp_path / f"w2_r{r}.pt", weights_only=True)
        assert abs(two["loss"] - one["loss"]) < 1e-5                       # every rank: the global loss
    # each rank holds world · (its half's share of ∂L/∂θ); DeepSpeed averages over ranks → ∂L/∂θ
    g2 = {k: sum(torch.load(tmp_path / f"w2_r{r}.pt", weights_only=True)["grad"][k] for r in range(2)) / 2
          for k in one["grad"]}
    for k, g in one["grad"].items():
        torch.testing.assert_close(g2[k], g, rtol=1e-4, atol=1e-6)


def _rank_main(rank, world, port, out):
    import dataclasses

    import torch.distributed as dist

    from vip.config import FusionConfig, LossConfig, ModelConfig
    from vip.model import build_model
    from vip.train.fusion_objective import FusionObjective
    from vip.train.runtime import Runtime
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    fc = FusionConfig(dim=32, num_heads=4, projection_dim=16, audio_n_mels=8, audio_width=16, audio_layers=1,
                      audio_heads=2, audio_patch_frames=4)
    model = build_model(dataclasses.replace(ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4), fusion=fc))
    g = torch.Generator().manual_seed(1)
    B = 4
    batch = {"video": torch.randn(B, 2, 3, 64, 64, generator=g), "text": torch.randint(1, 400, (B, 8), generator=g),
             "audio": torch.randn(B, 8, 12, generator=g), "audio_mask": torch.ones(B, 12, dtype=torch.bool)}
    batch["audio_mask"][1] = False                                        # one clip without audio
    if world > 1:
        half = B // world
        batch = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
    obj = FusionObjective(LossConfig(), Runtime(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"),
                                                precision="fp32"))
    loss, _ = obj(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and n.startswith(
        ("fusion_head.fusion.blocks.0.attn", "audio.patch_embed", "visual.proxies", "text_projection"))}
    torch.save({"loss": float(loss.detach()), "grad": grads}, f"{out}/w{world}_r{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_eao_pretrain_on_shards_with_audio(tmp_path, small_synth, small_build, free_port):
    """`vip pretrain` with model.fusion on shards built from sources with sound: the reader's audio
    batches through FusionObjective and the one engine; the export loads as a fusion model."""
    import dataclasses

    from shards.build import build_shards
    from shards.synth import make_corpus
    syn = dataclasses.replace(small_synth(tmp_path / "synth"), audio=True)
    make_corpus(syn)
    summary = build_shards(small_build(tmp_path / "synth", tmp_path / "shards"))
    assert summary.audio["with_audio"] == 12
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    args = ["--config", "tiny", f"data.shards={tmp_path}/shards", "data.batch_size=4", "data.num_workers=1",
            "data.num_frames=4", "data.image_size=32", "data.context_length=32", "data.audio=true",
            f"train.out={tmp_path}/run", "train.steps=3", "train.global_batch=4", "train.save_every=0",
            "train.log_every=1", "train.tensorboard=false", "optim.lr=1e-3", "model.arch=vip-tiny",
            "model.num_proxies=2", "model.max_frames=4", *FUSION]
    vip_bin = str(Path(sys.executable).parent / "vip")
    p = subprocess.run([vip_bin, "pretrain", *[a for a in args if a != "data.audio=true"]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "data.audio=true" in p.stderr                  # refused before any engine
    p = subprocess.run([vip_bin, "pretrain", *args], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    recs = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "t_va" in r or "loss" in r]
    assert steps and all(np.isfinite(r["loss"]) for r in steps if "loss" in r)
    import vip
    m = vip.load(tmp_path / "run/final")
    assert type(m.model).__name__ == "EAOModel"
