"""vip.train.engine in-process (a real DeepSpeed engine, world of one, gloo): the one train_step
every trainer uses, the logit-scale clamp, scalar-parameter exports, the runtime."""
from __future__ import annotations

import math

import pytest
import torch

from vip.config import ModelConfig, OptimConfig, TrainConfig

LN200 = math.log(200.0)


@pytest.fixture
def rt(train_rt):
    return train_rt


def _params(engine):
    return {k: v.detach().clone() for k, v in engine.module.named_parameters()}


def test_step_updates_and_matches_plain_adamw_loss(rt, tiny_model_cfg, tiny_engine, model_batch):
    from vip.train.engine import train_step
    from vip.train.objectives import PretrainObjective
    engine = tiny_engine()
    before = _params(engine)
    res = train_step(engine, model_batch(), PretrainObjective("d", rt))
    assert res.status == "ok" and res.boundary and engine.global_steps == 1
    assert torch.isfinite(res.loss) and set(res.terms) == {"vsc", "fc"}
    changed = [k for k, v in _params(engine).items() if not torch.equal(v, before[k])]
    assert "visual.proxies" in changed and "text_projection" in changed

    # the same step written in plain PyTorch: loss, backward, clip to 5.0, AdamW with the groups
    from vip.config import OptimConfig
    from vip.model import build_model
    from vip.train.engine import promote_scalar_params
    from vip.train.optim import param_groups
    torch.manual_seed(0)
    ref = build_model(tiny_model_cfg)
    promote_scalar_params(ref)
    oc = OptimConfig(lr=1e-3, warmup_ratio=0.0)
    opt = torch.optim.AdamW(param_groups(ref, oc), lr=oc.lr, betas=oc.betas, eps=oc.eps)
    loss, _ = PretrainObjective("d", rt)(ref, model_batch())
    assert loss.item() == pytest.approx(res.loss.item(), rel=1e-6)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), oc.grad_clip)
    opt.step()
    got = _params(engine)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(got[k], v.detach(), rtol=1e-5, atol=1e-6, msg=k)


def test_nonfinite_loss_is_skipped_then_stops(rt, tiny_model_cfg, tiny_engine, model_batch):
    from vip.train.engine import train_step
    engine = tiny_engine(max_nonfinite=3)
    before = _params(engine)

    def nan_objective(module, batch):
        out = module(video=batch["video"], subtitle=batch["subtitle"])
        return (out["video"] * float("nan")).sum(), {}

    for i in (1, 2):
        res = train_step(engine, model_batch(), nan_objective)
        assert res.status == "nonfinite" and res.skipped and not res.boundary
        assert engine.counters["nonfinite_skipped"] == i and engine.nonfinite_run == i
    assert engine.global_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in _params(engine).items())   # no update from a NaN
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        train_step(engine, model_batch(), nan_objective)

    stop = tiny_engine(on_nonfinite="stop")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        train_step(stop, model_batch(), nan_objective)


def test_short_batch_is_skipped_everywhere(rt, tiny_model_cfg, tiny_engine, model_batch, monkeypatch):
    """When the ranks disagree on the batch size (bad samples dropped on one of them), the step is
    skipped and counted, and the objective never runs (a gather of unequal shapes would hang)."""
    import vip.train.engine as eng
    engine = tiny_engine()
    seen = []
    monkeypatch.setattr(eng, "same_batch_size", lambda n, device: seen.append(n) or False)

    def never(module, batch):
        raise AssertionError("objective ran on a short batch")

    res = eng.train_step(engine, model_batch(B=2), never)
    assert res.status == "short_batch" and seen == [2]
    assert engine.counters["short_batch_skipped"] == 1 and engine.global_steps == 0


def test_gradient_accumulation_boundary(rt, tiny_model_cfg, tiny_engine, model_batch):
    from vip.model import build_model
    from vip.train.engine import build_engine, train_step
    from vip.train.objectives import PretrainObjective
    engine = build_engine(build_model(tiny_model_cfg), rt, TrainConfig(global_batch=4, precision="fp32"),
                          OptimConfig(), micro_batch=2, total_steps=10)
    obj = PretrainObjective("vs", rt)
    assert [train_step(engine, model_batch(), obj).boundary for _ in range(4)] == [False, True, False, True]
    assert engine.global_steps == 2


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_logit_scale_parameter_is_clamped_after_the_step(rt, tiny_model_cfg, tiny_engine, model_batch, zero_stage):
    """open_clip clamps the parameter itself to [0, ln 200] after each optimiser step; under ZeRO the
    fp32 master copy too, or the next step would write the unclamped value back."""
    from deepspeed.utils import safe_get_full_fp32_param

    from vip.train.engine import train_step
    from vip.train.objectives import PretrainObjective
    engine = tiny_engine(zero_stage=zero_stage)
    p = engine.module.logit_scale
    with torch.no_grad():
        p.fill_(6.0)
        master = safe_get_full_fp32_param(p)
        if master is not None:
            from deepspeed.utils import safe_set_full_fp32_param
            safe_set_full_fp32_param(p, torch.full_like(master, 6.0))
    obj = PretrainObjective("vs", rt)
    for _ in range(2):
        assert train_step(engine, model_batch(), obj).boundary
        assert float(p) <= LN200 + 1e-6
        master = safe_get_full_fp32_param(p)
        if master is not None:
            assert float(master) <= LN200 + 1e-6
    assert engine.logit_scale() == pytest.approx(math.exp(float(p)), rel=1e-5)


def test_scale_gradient_flows_at_and_above_the_clamp(tiny_model_cfg, model_batch):
    """Why the parameter is clamped rather than the forward: with a forward clamp a value stored
    just above ln 200 (float32(ln 200) already is; a bf16 copy by up to 0.03) gets no gradient and
    never comes back. The forward uses the parameter as it is, so it always learns."""
    from vip.losses import clip_loss
    from vip.model import build_model
    model = build_model(tiny_model_cfg)
    b = model_batch()
    assert torch.float32 == model.logit_scale.dtype and float(torch.tensor(LN200)) > LN200
    for raw in (LN200, 6.0):
        with torch.no_grad():
            model.logit_scale.fill_(raw)
        model.zero_grad()
        out = model(video=b["video"], subtitle=b["subtitle"])
        assert out["logit_scale"].item() == pytest.approx(raw)
        clip_loss(out["video"], out["subtitle"], out["logit_scale"].exp()).backward()
        assert model.logit_scale.grad.abs().item() > 0


def test_export_squeezes_promoted_scalars(rt, tiny_model_cfg, tiny_engine, model_batch, tmp_path):
    from safetensors.torch import load_file
    engine = tiny_engine()
    assert engine.promoted == ["logit_scale"] and engine.module.logit_scale.shape == (1,)
    out = engine.export(tiny_model_cfg, tmp_path / "e")
    sd = load_file(str(out / "model.safetensors"))
    assert sd["logit_scale"].shape == () and float(sd["logit_scale"]) == pytest.approx(float(engine.module.logit_scale))


def test_proxy_init_normal_is_the_originals_n01():
    from vip.model import build_model
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vip-tiny", num_proxies=8, max_frames=4)
    near = build_model(cfg).visual
    far = build_model(ModelConfig(arch="vip-tiny", num_proxies=8, max_frames=4, proxy_init="normal")).visual
    assert far.proxies.shape == near.proxies.shape == (7, 64)
    assert 0.8 < far.proxies.std().item() < 1.2 and abs(far.proxies.mean().item()) < 0.2
    # class_token: every proxy starts next to CLIP's class embedding
    d_near = (near.proxies - near.class_embedding).norm(dim=1).max().item()
    assert d_near < 0.1 * near.class_embedding.norm().item()


def test_runtime_resolves_once():
    from vip.train.runtime import resolve_precision
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_pretrain_refuses_a_caption_loss_without_sidecars(shard_dir, tmp_path, capsys):
    """Before any engine or process group: variant d needs caption sidecars; vs does not."""
    from vip.train.pretrain import main, preflight
    from vip.config import load_config
    args = ["--config", "tiny", f"data.shards={shard_dir}", f"data.captions={tmp_path / 'none'}",
            f"train.out={tmp_path / 'run'}"]
    assert main(args + ["loss.variant=d"]) == 2
    err = capsys.readouterr().err
    assert "loss.variant=d trains on captions" in err and "vip caption" in err
    assert not (tmp_path / "run").exists()
    preflight(load_config("tiny", args[2:] + ["loss.variant=vs"]))        # no error
