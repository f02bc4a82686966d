"""CLIPViP against simple references: open_clip's own towers, dense-mask runs of open_clip's
resblocks, temporal interpolation, baselines, switches (checkpointing, bf16, pretrained files)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from vip.config import ModelConfig
from vip.model import build_clip, build_model
from vip.model.attention import proxy_attention_mask
from vip.model.vip_vit import VideoViT, interpolate_temporal


def _clip(seed=0, arch="vip-tiny"):
    torch.manual_seed(seed)
    return build_clip(arch).eval()


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- temporal embedding
def test_temporal_interpolation_rule():
    table = torch.randn(12, 5)
    _close(interpolate_temporal(table, 12), table, 0)
    _close(interpolate_temporal(table, 1)[0], (table[5] + table[6]) / 2)
    _close(interpolate_temporal(table, 6), (table[0::2] + table[1::2]) / 2)
    _close(interpolate_temporal(table[:4], 2), (table[:4][0::2] + table[:4][1::2]) / 2)


def test_image_uses_middle_temporal_embedding():
    """A 1-frame input sees only the interpolated middle row: rows 5 and 6 matter (through their
    mean), the others do not."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="vip-tiny", max_frames=12)).eval()
    te = m.visual.temporal_embedding
    with torch.no_grad():
        te.normal_(std=0.5)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m.encode_image(img)
        mid = (te[5] + te[6]) / 2
        te[:5] = torch.randn_like(te[:5])
        te[7:] = torch.randn_like(te[7:])
        _close(m.encode_image(img), ref)
        te[5], te[6] = mid, mid                            # same mean → same output
        _close(m.encode_image(img), ref)
        te[5] += torch.randn_like(te[5])                   # mean moves → output moves
        assert (m.encode_image(img) - ref).abs().max() > 1e-4
        # and a video of that one frame is the same thing
        _close(m.encode_video(img[:, None]), m.encode_image(img), 0)


# --------------------------------------------------------------------------- against open_clip
def test_m1_zero_temporal_one_frame_equals_open_clip_image_tower():
    clip = _clip()
    img = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = clip.visual(img)                             # open_clip's own forward (before wrapping)
    enc = VideoViT(clip.visual, num_proxies=1, max_frames=12, attention="proxy").eval()
    assert not enc.temporal_embedding.any()
    with torch.no_grad():
        out = enc(img[:, None])
    _close(out, ref)


def test_other_image_sizes_resize_position_embedding_like_open_clip():
    """48² input to a 64² model (3×3 grid, odd): same as an open_clip 48² model whose position
    table went through open_clip's own resize_pos_embed."""
    import open_clip
    from open_clip.model import resize_pos_embed
    from vip.model.archs import clip_config
    clip = _clip(4)
    cfg = clip_config("vip-tiny")
    cfg["vision_cfg"]["image_size"] = 48
    small = open_clip.CLIP(**cfg).eval()
    sd = clip.state_dict()
    resize_pos_embed(sd, small)
    small.load_state_dict(sd)
    img = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = small.visual(img)
        enc = VideoViT(clip.visual, num_proxies=1).eval()
        _close(enc(img[:, None]), ref)


def test_text_tower_equals_open_clip_and_handles_shorter_context():
    clip = _clip(1)
    ref_model = copy.deepcopy(clip)
    m = build_model(ModelConfig(arch="vip-tiny"))
    m.load_state_dict({**m.state_dict(), **{k: v for k, v in clip.state_dict().items() if not k.startswith("visual")}})
    m.eval()
    tok = torch.zeros(3, 77, dtype=torch.long)
    for i, n in enumerate([5, 20, 60]):
        tok[i, 0] = 49406
        tok[i, 1:n] = torch.randint(1, 49000, (n - 1,))
        tok[i, n] = 49407
    with torch.no_grad():
        ref = F.normalize(ref_model.encode_text(tok), dim=-1)
        _close(m.encode_text(tok), ref)
        _close(m.encode_text(tok[:, :70]), ref)            # context 70 (the reference's): same function
    with pytest.raises(ValueError):
        m.encode_text(torch.zeros(1, 78, dtype=torch.long))


def _ref_tokens(enc, video, temporal=True):
    """Independent token construction: [M proxies, T·N patches] as one sequence before ln_pre."""
    B, T = video.shape[:2]
    x = enc.conv1(video.flatten(0, 1)).flatten(2).transpose(1, 2)          # [B·T, N, C]
    N, C = x.shape[1:]
    pos = enc.positional_embedding
    x = x.reshape(B, T, N, C) + pos[1:]
    if temporal:
        x = x + interpolate_temporal(enc.temporal_embedding, T)[None, :, None]
    toks = torch.cat([enc.class_embedding[None], enc.proxies]) if enc.proxies is not None else enc.class_embedding[None]
    prox = (toks + pos[0]).expand(B, -1, -1)
    return torch.cat([prox, x.reshape(B, T * N, C)], 1), N


def _ref_forward(enc, video, mask):
    """open_clip's resblocks (nn.MultiheadAttention) on the flat sequence with an additive mask."""
    x, N = _ref_tokens(enc, video)
    M = enc.num_proxies
    T = video.shape[1]
    add = None
    if mask:
        add = torch.zeros(M + T * N, M + T * N).masked_fill(~proxy_attention_mask(M, T, N), float("-inf"))
    x = enc.transformer(enc.ln_pre(x), attn_mask=add)
    return enc.ln_post(x[:, 0]) @ enc.proj


@pytest.mark.parametrize("T", [1, 3])
def test_vip_equals_open_clip_resblocks_with_dense_mask(T):
    torch.manual_seed(0)
    enc = VideoViT(build_clip("vip-tiny").visual, num_proxies=4, max_frames=4).eval()
    with torch.no_grad():
        enc.temporal_embedding.normal_(std=0.3)
        video = torch.randn(2, T, 3, 64, 64)               # 16 patches per frame
        _close(enc(video), _ref_forward(enc, video, mask=True))
        if T > 1:  # the mask matters
            assert (enc(video) - _ref_forward(enc, video, mask=False)).abs().max() > 1e-4


def test_last_block_skipping_patches_changes_nothing():
    torch.manual_seed(0)
    enc = VideoViT(build_clip("vip-tiny").visual, num_proxies=3, max_frames=4).eval()
    video = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        p_all, f_all = enc.encode_tokens(video, patches=True)
        p_skip, f_skip = enc.encode_tokens(video, patches=False)
    assert f_all.shape == (2, 4, 16, 64) and f_skip is None
    _close(p_skip, p_all)


def test_full_attention_baseline_equals_unmasked_open_clip_resblocks():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="vip-tiny", video_encoder="full", max_frames=4)).eval()
    enc = m.visual
    assert enc.num_proxies == 1 and enc.proxies is None
    with torch.no_grad():
        enc.temporal_embedding.normal_(std=0.3)
        video = torch.randn(2, 3, 3, 64, 64)
        _close(m.encode_video(video, normalize=False), _ref_forward(enc, video, mask=False))


def test_meanpool_is_mean_of_normalised_open_clip_frames():
    clip = _clip(2)
    ref_visual = copy.deepcopy(clip.visual)
    m = build_model(ModelConfig(arch="vip-tiny", video_encoder="meanpool"))
    m.load_state_dict(clip.state_dict() | {"logit_scale": m.logit_scale.detach()}, strict=True)
    m.eval()
    video = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        frames = F.normalize(ref_visual(video.flatten(0, 1)), dim=-1).view(2, 3, -1)
        _close(m.encode_video(video), F.normalize(frames.mean(1), dim=-1))


def test_seqtransf_residual_and_init_from_text_tower():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="vip-tiny", video_encoder="seqtransf", max_frames=4, seq_layers=2)).eval()
    v = m.visual
    _close(v.frame_position, m.positional_embedding[:4], 0)             # CLIP4Clip init from the text tower
    _close(v.seq_transformer.resblocks[1].mlp.c_fc.weight, m.transformer.resblocks[1].mlp.c_fc.weight, 0)
    video = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        frames = v.frame_features(video)                                 # [B, T, D]
        y = frames + v.frame_position[:3]
        for blk in v.seq_transformer.resblocks:                          # plain open_clip blocks, no mask
            y = blk(y)
        ref = F.normalize(F.normalize(y + frames, dim=-1).mean(1), dim=-1)
        _close(m.encode_video(video), ref)
        assert (m.encode_video(video.flip(1)) - ref).abs().max() > 1e-5  # order-aware
    with pytest.raises(ValueError):
        m.encode_video(torch.randn(1, 5, 3, 64, 64))


# --------------------------------------------------------------------------- model API
@pytest.mark.parametrize("encoder", ["vip", "meanpool", "seqtransf", "full"])
def test_forward_contract(encoder):
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="vip-tiny", video_encoder=encoder, num_proxies=2, max_frames=4))
    out = m(video=torch.randn(2, 4, 3, 32, 32), frame=torch.randn(2, 3, 32, 32),
            subtitle=torch.randint(0, 49408, (2, 32)), caption=torch.randint(0, 49408, (2, 32)))
    for k in ("video", "frame", "subtitle", "caption"):
        assert out[k].shape == (2, 64)
        _close(out[k].norm(dim=-1), torch.ones(2))
    assert abs(out["logit_scale"].item() - 4.60) < 1e-6
    sum(out[k].sum() for k in ("video", "frame", "subtitle", "caption")).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None and n != "logit_scale"]
    assert no_grad == []
    # single inputs work and match the joint call
    with torch.no_grad():
        m.eval()
        t = torch.randint(0, 49408, (2, 32))
        _close(m(subtitle=t)["subtitle"], m.encode_text(t))
        assert m(subtitle=t)["video"] is None


def test_logit_scale_is_the_parameter_as_is():
    """The forward returns the log-space logit scale unclamped (as CLIP and open_clip do); the
    trainer clamps the parameter itself to [0, ln 200] after each step (tests/test_engine.py)."""
    m = build_model(ModelConfig(arch="vip-tiny", init_logit_scale=2.5))
    assert m.logit_scale.shape == () and m.scale().item() == pytest.approx(2.5)
    for raw in (9.0, -1.0):
        with torch.no_grad():
            m.logit_scale.fill_(raw)
        assert m(subtitle=torch.zeros(1, 8, dtype=torch.long))["logit_scale"].item() == raw
        assert m.scale() is m.logit_scale


def test_gradient_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    a = build_model(ModelConfig(arch="vip-tiny", max_frames=4))
    b = build_model(ModelConfig(arch="vip-tiny", max_frames=4, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    assert b.visual.grad_checkpointing and b.transformer.grad_checkpointing
    inputs = dict(video=torch.randn(2, 4, 3, 32, 32), subtitle=torch.randint(0, 49408, (2, 16)))
    for m in (a, b):
        out = m(**inputs)
        (out["video"] @ out["subtitle"].T).sum().backward()
    _close(a(**inputs)["video"], b(**inputs)["video"])
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            _close(pa.grad, pb.grad, 1e-5)


def test_bf16_forward_backward():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="vip-tiny", max_frames=4))
    video = torch.randn(2, 4, 3, 32, 32)
    ref = m.encode_video(video).detach()
    m16 = copy.deepcopy(m).bfloat16()
    out = m16(video=video.bfloat16(), subtitle=torch.randint(0, 49408, (2, 16)))
    assert out["video"].dtype == torch.bfloat16 and torch.isfinite(out["video"]).all()
    assert (out["video"].float() - ref).norm() / ref.norm() < 5e-2
    (out["video"].float() @ out["subtitle"].float().T).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters() if p.grad is not None)


def test_build_from_local_open_clip_file_and_param_names(tmp_path):
    clip = _clip(3)
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    m = build_model(ModelConfig(arch="vip-tiny", pretrained=str(path)))
    own = m.state_dict()
    for k, v in clip.state_dict().items():                 # open_clip names kept, weights loaded
        if k != "logit_scale":
            assert torch.equal(own[k], v), k
    new = sorted(set(own) - set(clip.state_dict()))
    assert new == ["visual.proxies", "visual.temporal_embedding"]
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(arch="vip-tiny", pretrained="no-such-tag"))


def test_unknown_settings_raise():
    with pytest.raises(ValueError):
        build_model(ModelConfig(arch="vip-tiny", video_encoder="lstm"))
    with pytest.raises(ValueError):
        build_model(ModelConfig(arch="no-such-arch"))
    with pytest.raises(ValueError):
        build_model(ModelConfig(arch="vip-tiny", attention="sparse"))


@pytest.mark.slow
def test_bench_model_quick_smoke(capsys):
    """bench/model.py --quick runs and prints its table (CI smoke; in-process)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).parents[1] / "bench" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| vip-tiny | ViP-fast |" in out and "| vip-tiny | floor |" in out
