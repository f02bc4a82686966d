"""Checkpoint import (released CLIP-ViP, HuggingFace CLIP names) and export/load round trips.

The CLIP-ViP side is a random state dict under the real key names and shapes (tiny widths)
and a minimal HF-CLIP-style forward written here from the reference's structure: separate
q/k/v projections, pre_layrnorm, quick_gelu, per-frame + proxy ("cls divided") attention."""
import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from vip.config import ModelConfig
from vip.model import build_model
from vip.model.convert import (clipvip_to_vip_state_dict, export, import_clipvip, infer_clipvip_config, load,
                               load_weights_into, read_model_config, read_state_dict, vip_to_clipvip_state_dict)

C, HEADS, LAYERS, PATCH, IMAGE, TW, TL, VOCAB, CTX, D, ADDED, TMAX = 64, 4, 2, 16, 64, 64, 2, 49408, 77, 64, 3, 12


def _hf_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.05: torch.randn(*s, generator=g) * std  # noqa: E731
    ln = lambda n: (1 + r(n, std=0.1), r(n, std=0.05))  # noqa: E731
    sd = {}
    e = "vision_model.embeddings."
    sd[e + "class_embedding"] = r(C, std=0.5)
    sd[e + "added_cls"] = r(ADDED, C, std=0.5)
    sd[e + "temporal_embedding"] = r(1, TMAX, C, std=0.3)
    sd[e + "patch_embedding.weight"] = r(C, 3, PATCH, PATCH, std=0.05)
    sd[e + "position_embedding.weight"] = r((IMAGE // PATCH) ** 2 + 1, C, std=0.3)
    sd[e + "position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
    sd["vision_model.pre_layrnorm.weight"], sd["vision_model.pre_layrnorm.bias"] = ln(C)
    sd["vision_model.post_layernorm.weight"], sd["vision_model.post_layernorm.bias"] = ln(C)
    sd["text_model.embeddings.token_embedding.weight"] = r(VOCAB, TW, std=0.3)
    sd["text_model.embeddings.position_embedding.weight"] = r(CTX, TW, std=0.3)
    sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"] = ln(TW)
    for tower, W, n in (("vision_model", C, LAYERS), ("text_model", TW, TL)):
        for i in range(n):
            p = f"{tower}.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd[p + f"self_attn.{proj}.weight"] = r(W, W, std=W ** -0.5)
                sd[p + f"self_attn.{proj}.bias"] = r(W, std=0.05)
            sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"] = ln(W)
            sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"] = ln(W)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * W, W, std=W ** -0.5), r(4 * W, std=0.05)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(W, 4 * W, std=(4 * W) ** -0.5), r(W, std=0.05)
    sd["visual_projection.weight"] = r(D, C, std=C ** -0.5)
    sd["text_projection.weight"] = r(D, TW, std=TW ** -0.5)
    sd["logit_scale"] = torch.tensor(4.1)
    return {"clipmodel." + k: v for k, v in sd.items()}


# ------------------------------------------------------------------ reference HF-CLIP-style forward
def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)


def _lin(x, sd, name, bias=True):
    return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)


def _heads(x):  # [B, L, W] → [B, H, L, d]
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def _softmax_attn(q, k, v, mask=None):
    w = q @ k.transpose(-1, -2)
    if mask is not None:
        w = w + mask
    return w.softmax(-1) @ v


def _hf_layer(x, sd, p, attention):
    h = _ln(x, sd, p + "layer_norm1")
    d = h.shape[-1] // HEADS
    q = _heads(_lin(h, sd, p + "self_attn.q_proj") * d ** -0.5)
    k, v = _heads(_lin(h, sd, p + "self_attn.k_proj")), _heads(_lin(h, sd, p + "self_attn.v_proj"))
    o = attention(q, k, v).transpose(1, 2).reshape(x.shape)
    x = x + _lin(o, sd, p + "self_attn.out_proj")
    h = _lin(_ln(x, sd, p + "layer_norm2"), sd, p + "mlp.fc1")
    return x + _lin(h * torch.sigmoid(1.702 * h), sd, p + "mlp.fc2")    # quick_gelu


def _hf_video(sd, video):
    sd = {k[len("clipmodel."):]: v for k, v in sd.items()}
    e = "vision_model.embeddings."
    B, T = video.shape[:2]
    x = F.conv2d(video.flatten(0, 1), sd[e + "patch_embedding.weight"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2).reshape(B, T, -1, C)                   # [B, T, N, C]
    N = x.shape[2]
    te = F.interpolate(sd[e + "temporal_embedding"].transpose(1, 2), size=T, mode="linear").transpose(1, 2)
    pos = sd[e + "position_embedding.weight"]
    x = x + te[:, :, None] + pos[1:]
    M = 1 + sd[e + "added_cls"].shape[0]
    cls = torch.cat([sd[e + "class_embedding"][None], sd[e + "added_cls"]]) + pos[0]
    x = torch.cat([cls.expand(B, -1, -1), x.reshape(B, T * N, C)], 1)
    x = _ln(x, sd, "vision_model.pre_layrnorm")

    def vip_attention(q, k, v):  # the reference's forward2: in-frame attention, then "cls divided" attention
        frames = []
        for t in range(T):
            sl = slice(M + t * N, M + (t + 1) * N)
            frames.append(_softmax_attn(q[:, :, sl], torch.cat([k[:, :, :M], k[:, :, sl]], 2),
                                        torch.cat([v[:, :, :M], v[:, :, sl]], 2)))
        return torch.cat([_softmax_attn(q[:, :, :M], k, v)] + frames, 2)

    for i in range(LAYERS):
        x = _hf_layer(x, sd, f"vision_model.encoder.layers.{i}.", vip_attention)
    pooled = _ln(x[:, 0], sd, "vision_model.post_layernorm")
    return pooled @ sd["visual_projection.weight"].T


def _hf_text(sd, ids):
    sd = {k[len("clipmodel."):]: v for k, v in sd.items()}
    L = ids.shape[1]
    e = "text_model.embeddings."
    x = sd[e + "token_embedding.weight"][ids] + sd[e + "position_embedding.weight"][:L]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(TL):
        x = _hf_layer(x, sd, f"text_model.encoder.layers.{i}.", lambda q, k, v: _softmax_attn(q, k, v, causal))
    x = _ln(x, sd, "text_model.final_layer_norm")
    pooled = x[torch.arange(x.shape[0]), ids.argmax(-1)]                  # eos (highest id)
    return pooled @ sd["text_projection.weight"].T


def _tokens(B=3, L=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate([4, 17, 60][:B]):
        ids[i, 0], ids[i, n] = 49406, 49407
        ids[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
    return ids


# ------------------------------------------------------------------ tests
def test_imported_clipvip_computes_the_reference_function():
    hf = _hf_state_dict()
    cfg = infer_clipvip_config(hf)
    assert (cfg.arch, cfg.num_proxies, cfg.max_frames, cfg.quick_gelu) == ("vip-tiny-quickgelu", 4, 12, True)
    model, cfg2 = import_clipvip(hf)
    model.eval()
    assert cfg2.pretrained is None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for T in (1, 3, 12):
            video = torch.randn(2, T, 3, IMAGE, IMAGE, generator=g)
            ref = _hf_video(hf, video)
            torch.testing.assert_close(model.encode_video(video, normalize=False), ref, rtol=1e-4, atol=1e-5)
        ids = _tokens()
        torch.testing.assert_close(model.encode_text(ids, normalize=False), _hf_text(hf, ids), rtol=1e-4, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(4.1)


def test_import_mapping_round_trips():
    hf = _hf_state_dict(2)
    ours = clipvip_to_vip_state_dict(hf)
    back = vip_to_clipvip_state_dict(ours)
    expected = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    # and ours → HF → ours for a freshly built model
    torch.manual_seed(0)
    sd = build_model(ModelConfig(arch="vip-tiny-quickgelu")).state_dict()
    again = clipvip_to_vip_state_dict(vip_to_clipvip_state_dict(sd))
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    with pytest.raises(KeyError):
        clipvip_to_vip_state_dict({**hf, "clipmodel.vision_model.something_new": torch.zeros(1)})


def test_export_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vip-tiny", num_proxies=3, max_frames=6)
    model = build_model(cfg)
    with torch.no_grad():
        model.visual.temporal_embedding.normal_()
    export(model, cfg, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "final" / "config.json").exists()
    assert read_model_config(tmp_path / "final") == cfg
    import vip
    for path in (tmp_path / "final", tmp_path / "final" / "model.safetensors"):
        loaded = vip.load(path) if path.is_dir() else load(path)
        assert not loaded.training
        sd, sd2 = model.state_dict(), loaded.state_dict()
        assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    video, ids = torch.randn(1, 6, 3, 64, 64), _tokens(2, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_video(video), loaded.encode_video(video))
        assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
    # exported weights into a model being trained (train.init_from)
    fresh = build_model(cfg)
    assert load_weights_into(fresh, tmp_path / "final")["source"] == "vip"
    assert torch.equal(fresh.visual.temporal_embedding, model.visual.temporal_embedding)
    with pytest.raises(ValueError):
        load_weights_into(build_model(dataclasses.replace(cfg, num_proxies=2)), tmp_path / "final")
    # a bf16 model still exports the canonical fp32 format (the [1]-shaped logit_scale DeepSpeed
    # holds is squeezed back by the training engine's state_dict: tests/test_engine.py)
    export(model.bfloat16(), cfg, tmp_path / "bf16")
    raw = read_state_dict(tmp_path / "bf16" / "model.safetensors")
    assert raw["logit_scale"].shape == () and raw["visual.proj"].dtype == torch.float32
    assert load(tmp_path / "bf16").logit_scale.shape == ()


def test_load_weights_from_clipvip_and_open_clip_files(tmp_path):
    hf = _hf_state_dict(3)
    torch.save({"model": {"module." + k: v for k, v in hf.items()}}, tmp_path / "clipvip.pt")
    model = build_model(infer_clipvip_config(hf))
    assert load_weights_into(model, tmp_path / "clipvip.pt")["source"] == "clipvip"
    assert torch.equal(model.visual.proxies, hf["clipmodel.vision_model.embeddings.added_cls"])
    from vip.model import build_clip
    torch.manual_seed(1)
    clip = build_clip("vip-tiny")
    torch.save(clip.state_dict(), tmp_path / "open_clip.pt")
    model = build_model(ModelConfig(arch="vip-tiny"))
    info = load_weights_into(model, tmp_path / "open_clip.pt")
    assert info["source"] == "open_clip" and info["missing"] == ["visual.proxies", "visual.temporal_embedding"]
    assert torch.equal(model.visual.conv1.weight, clip.visual.conv1.weight)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_reading_never_unpickles_objects(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"x": torch.zeros(1), "y": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(path)


def test_export_json_is_plain(tmp_path):
    import json
    cfg = ModelConfig(arch="vip-tiny", pretrained="/some/clip.pt")
    export(build_model(dataclasses.replace(cfg, pretrained=None)), cfg, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "vip.clipvip" and meta["model"]["arch"] == "vip-tiny" and meta["embed_dim"] == 64
    assert not math.isnan(load(tmp_path).logit_scale.item())       # pretrained path is never touched by load
