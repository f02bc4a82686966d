"""Trainer pieces that need no process group: ds_config, param groups, schedule, checkpoints, plots."""
import json
import math

import pytest
import torch

from vip.config import OptimConfig, TrainConfig
from vip.train.checkpoint import MARKER, CheckpointManager
from vip.train.ds_config import grad_accumulation, make_ds_config
from vip.train.optim import lr_lambda, param_groups


def test_ds_config_is_derived_from_one_place():
    tc, oc = TrainConfig(global_batch=64, zero_stage=2, precision="fp32"), OptimConfig()
    ds = make_ds_config(tc, oc, micro_batch=8, world=2, precision="fp32", device_type="cpu")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 5.0
    p = ds["optimizer"]["params"]
    assert p["lr"] == 5e-6 and p["betas"] == [0.9, 0.98] and p["eps"] == 1e-6 and p["torch_adam"] is True
    assert "bf16" not in ds and "fp16" not in ds
    assert make_ds_config(TrainConfig(global_batch=16), oc, 8, 2, "bf16", "cpu")["bf16"]["enabled"]
    adam = {(impl, dev): make_ds_config(tc, OptimConfig(adam=impl), 8, 2, "fp32", dev)["optimizer"]["params"]["torch_adam"]
            for impl in ("auto", "fused", "torch") for dev in ("cpu", "cuda")}
    assert adam == {("auto", "cpu"): True, ("auto", "cuda"): False, ("fused", "cpu"): False,
                    ("fused", "cuda"): False, ("torch", "cpu"): True, ("torch", "cuda"): True}
    with pytest.raises(ValueError, match="multiple"):
        grad_accumulation(20, 8, world=2)


def test_param_groups_no_decay_where_reference_has_none():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.ln = torch.nn.LayerNorm(4)
            self.positional_embedding = torch.nn.Parameter(torch.zeros(5, 4))
            self.temporal_embedding = torch.nn.Parameter(torch.zeros(12, 4))
            self.proxies = torch.nn.Parameter(torch.zeros(3, 4))
            self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
            self.token_embedding = torch.nn.Embedding(10, 4)
    m = M()
    decay, no_decay = param_groups(m, OptimConfig(weight_decay=0.05))
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p for p in decay["params"]] == [m.proj.weight]
    assert len(no_decay["params"]) == len(list(m.parameters())) - 1


def test_lr_schedule_warmup_then_cosine():
    oc = OptimConfig(warmup_ratio=0.1, min_lr_ratio=0.0)
    f = [lr_lambda(s, 100, oc) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)          # linear warmup over 10 steps
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_lambda(100, 100, oc) == pytest.approx(0.0)


def test_only_complete_checkpoints_count(tmp_path):
    cm = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1)
    d = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, True), (40, False)):
        (d / f"step{step:08d}").mkdir(parents=True)
        if complete:
            (d / f"step{step:08d}" / MARKER).write_text(json.dumps({"step": step}))
    assert cm.latest() == "step00000030"      # the interrupted save of step 40 is never taken
    cm._prune()
    assert sorted(p.name for p in d.iterdir()) == ["step00000020", "step00000030", "step00000040"]
    (d / "step00000050").mkdir()
    (d / "step00000050" / MARKER).write_text("{}")
    cm._prune()                                # now step 40 is an old leftover: removed
    assert sorted(p.name for p in d.iterdir()) == ["step00000030", "step00000050"]


def test_prune_keeps_the_checkpoint_just_saved(tmp_path):
    """After a resume fell back from a damaged step 90, saving step 40 with keep_last=1 must keep
    step 40 (not count the newer damaged tag as one of the kept), and leave step 90 alone."""
    cm = CheckpointManager(tmp_path, keep_last=1, rank=0, world=1)
    d = tmp_path / "checkpoints"
    for step in (20, 30, 40, 90):
        (d / f"step{step:08d}").mkdir(parents=True)
        (d / f"step{step:08d}" / MARKER).write_text(json.dumps({"step": step}))
    (d / "step00000035").mkdir()               # an interrupted save older than the one just saved
    (d / "step00000095").mkdir()               # … and one newer: not ours to judge
    cm._prune("step00000040")
    assert sorted(p.name for p in d.iterdir()) == ["step00000040", "step00000090", "step00000095"]


def test_rng_state_holds_every_cuda_device_and_old_states_load(monkeypatch):
    from vip.train.checkpoint import rng_state, set_rng_state
    cuda = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    state = rng_state()
    assert state["cuda"] is cuda and {"torch", "numpy", "python"} <= set(state)
    cpu_before = torch.get_rng_state()
    torch.rand(3)
    set_rng_state(state)
    assert restored == [cuda] and torch.equal(torch.get_rng_state(), cpu_before)
    old = {k: v for k, v in state.items() if k != "cuda"}          # a checkpoint from before CUDA states
    set_rng_state(old)
    assert restored == [cuda]


def test_plot_writes_png(tmp_path):
    from vip.train.logs import MetricsLog
    from vip.plot import plot_metrics
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    for s in range(1, 6):
        log.write(s, "train", {"loss": 5.0 / s, "loss_vs": 2.0 / s, "lr": 1e-5, "logit_scale": 100.0,
                               "samples_per_s": 10.0, "data_wait_share": 0.1})
    log.write(5, "eval", {"t2v_R@1": 10.0, "v2t_R@1": 12.0})
    png = plot_metrics(tmp_path / "metrics.jsonl")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
