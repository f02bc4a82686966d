"""Everything at Once: combinatorial loss, fusion head and audio tower against direct formulas of the
original (ninatu/everything_at_once), on small tensors, including clips missing a modality."""
import math

import pytest
import torch
import torch.nn.functional as F

from vip.losses import EAO_TERMS, EAO_WEIGHTS, combinatorial_loss, norm_softmax_nce
from vip.model.audio import AudioTower
from vip.model.fusion import FusionHead


# --------------------------------------------------------------------------- loss
def _nce_ref(X, Y, tau):
    """Symmetric NCE by loops over python floats (cosine similarities)."""
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    n = len(X)
    if n == 0:
        return 0.0
    S = [[cos(X[i], Y[j]) / tau for j in range(n)] for i in range(n)]
    row = sum(-(S[i][i] - math.log(sum(math.exp(v) for v in S[i]))) for i in range(n)) / n
    col = sum(-(S[j][j] - math.log(sum(math.exp(S[i][j]) for i in range(n)))) for j in range(n)) / n
    return row + col


def _loss_ref(emb, present, weights, tau):
    """L = Σ λ_k NCE_k / Σ λ_k, each term on the clips having every modality it uses."""
    num = den = 0.0
    for name, w in zip(EAO_TERMS, weights):
        x, y = name.split("_")
        if w == 0:
            continue
        keep = [i for i in range(len(present["t"])) if all(bool(present[m][i]) for m in x + y)]
        X = [list(map(float, emb[x][i])) for i in keep]
        Y = [list(map(float, emb[y][i])) for i in keep]
        num += w * _nce_ref(X, Y, tau)
        den += w
    return num / den


def _emb(B, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, D, generator=g) for k in ("t", "v", "a", "tv", "va", "ta")}


@pytest.mark.parametrize("has_audio", [[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
def test_combinatorial_loss_matches_direct_formula(has_audio):
    emb = _emb(5)
    present = {"t": torch.ones(5, dtype=torch.bool), "v": torch.ones(5, dtype=torch.bool),
               "a": torch.tensor(has_audio, dtype=torch.bool)}
    total, terms = combinatorial_loss(emb, present, weights=EAO_WEIGHTS, temperature=0.05)
    ref = _loss_ref(emb, present, EAO_WEIGHTS, 0.05)
    assert total.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert set(terms) == set(EAO_TERMS)
    if not any(has_audio):                  # every audio term is empty: only t_v is non-zero
        assert all(terms[k].item() == 0 for k in EAO_TERMS if k != "t_v")
        assert total.item() == pytest.approx(terms["t_v"].item() / sum(EAO_WEIGHTS), rel=1e-6)


def test_missing_modality_rows_and_columns_are_removed():
    """A clip without audio is no negative in any audio term: its audio-side values don't matter."""
    emb = _emb(6, seed=1)
    present = {"t": torch.ones(6, dtype=torch.bool), "v": torch.ones(6, dtype=torch.bool),
               "a": torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)}
    base, _ = combinatorial_loss(emb, present)
    other = {k: v.clone() for k, v in emb.items()}
    for k in ("a", "tv", "va", "ta"):
        other[k][~present["a"]] = torch.randn(2, 6) * 10
    changed, _ = combinatorial_loss(other, present)
    assert changed.item() == pytest.approx(base.item(), rel=1e-6)
    # zero-filling instead of removing gives a different value: the test can tell them apart
    zero = {k: v.clone() for k, v in emb.items()}
    for k in ("a", "va", "ta"):
        zero[k][~present["a"]] = 1e-3
    filled, _ = combinatorial_loss(zero, {**present, "a": torch.ones(6, dtype=torch.bool)})
    assert abs(filled.item() - base.item()) > 1e-3


def test_norm_softmax_equals_original_formulation():
    """The original NormSoftmaxLoss: −mean diag log_softmax(S/τ) − mean diag log_softmax(Sᵀ/τ)."""
    x, y = torch.randn(7, 5), torch.randn(7, 5)
    S = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    orig = -torch.diag(F.log_softmax(S / 0.05, 1)).mean() - torch.diag(F.log_softmax(S.T / 0.05, 1)).mean()
    assert norm_softmax_nce(x, y, 0.05).item() == pytest.approx(orig.item(), rel=1e-5)


def test_weights_are_divided_by_their_sum_and_zero_weights_drop():
    emb = _emb(4, seed=2)
    present = {m: torch.ones(4, dtype=torch.bool) for m in "tva"}
    w = (1.0, 0.0, 0.5, 0.0, 0.2, 0.0)
    total, terms = combinatorial_loss(emb, present, weights=w, temperature=0.1)
    assert set(terms) == {"t_v", "v_a", "v_ta"}
    assert total.item() == pytest.approx(_loss_ref(emb, present, w, 0.1), rel=1e-5)
    with pytest.raises(ValueError):
        combinatorial_loss(emb, present, weights=(1.0,))


def test_loss_gradient_flows_only_through_present_clips():
    emb = {k: v.requires_grad_() for k, v in _emb(4, seed=3).items()}
    present = {"t": torch.ones(4, dtype=torch.bool), "v": torch.ones(4, dtype=torch.bool),
               "a": torch.tensor([1, 0, 1, 1], dtype=torch.bool)}
    combinatorial_loss(emb, present)[0].backward()
    assert emb["a"].grad[1].abs().sum() == 0 and emb["a"].grad[0].abs().sum() > 0
    assert emb["t"].grad[1].abs().sum() > 0          # t_v still sees clip 1


# --------------------------------------------------------------------------- fusion head
def _gated_ref(unit, x):
    """The original GatedEmbeddingUnit: fc, then GLU over cat([x, cg.fc(x)])."""
    x = F.linear(x, unit.fc.weight, unit.fc.bias)
    x1 = F.linear(x, unit.cg.fc.weight, unit.cg.fc.bias)
    return F.glu(torch.cat([x, x1], dim=-1), dim=-1)


def _block_ref(blk, x, mask, heads):
    """timm Block with the original FusionAttention (masked_fill −inf), head by head."""
    def ln(m, t):
        return F.layer_norm(t, m.normalized_shape, m.weight, m.bias, m.eps)
    B, N, C = x.shape
    h = ln(blk.norm1, x)
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
    d = C // heads
    outs = []
    for hd in range(heads):
        q = qkv[..., hd * d:(hd + 1) * d]
        k = qkv[..., C + hd * d:C + (hd + 1) * d]
        v = qkv[..., 2 * C + hd * d:2 * C + (hd + 1) * d]
        a = q @ k.transpose(1, 2) * d ** -0.5
        a = a.masked_fill(~mask[:, None, :], -float("inf")).softmax(-1)
        outs.append(a @ v)
    x = x + F.linear(torch.cat(outs, -1), blk.attn.proj.weight, blk.attn.proj.bias)
    h = ln(blk.norm2, x)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h


def _head_ref(head, tokens, heads):
    """The original forward (fusion_model.py), written out: tokens → gated proj → norm → masking
    token for empty inputs → fusion of each single modality and pair → mean → gated proj."""
    names = {"t": "text", "v": "video", "a": "audio"}
    toks, present = {}, {}
    for m, (x, mask) in tokens.items():
        nm = names[m]
        x = _gated_ref(getattr(head, f"{nm}_token_proj"), x)
        norm = getattr(head, f"{nm}_norm_layer")
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps).clone()
        mask = mask.clone()
        nonempty = mask.sum(-1) != 0
        x[~nonempty, :1] = head.fusion.masking_token
        mask[~nonempty, :1] = True
        toks[m], present[m] = (x, mask), nonempty

    def fuse(ms):
        x = torch.cat([toks[m][0] for m in ms], 1)
        mask = torch.cat([toks[m][1] for m in ms], 1)
        for blk in head.fusion.blocks:
            x = _block_ref(blk, x, mask, heads)
        out, off = [], 0
        for m in ms:
            n, mk = toks[m][0].shape[1], toks[m][1].float()[..., None]
            out.append((x[:, off:off + n] * mk).sum(1) / mk.sum(1))
            off += n
        return [_gated_ref(getattr(head, f"{names[m]}_proj"), e) for m, e in zip(ms, out)]

    def nrm(a):
        return a / a.norm(dim=1, keepdim=True).clamp_min(1e-8)
    out = {m: nrm(fuse([m])[0]) for m in toks}
    for p in ("tv", "va", "ta"):
        a, b = fuse(list(p))
        out[p] = nrm((nrm(a) + nrm(b)) / 2)
    return out, present


def test_fusion_head_matches_original_formulas():
    torch.manual_seed(0)
    heads = 4
    head = FusionHead({"t": 10, "v": 12, "a": 9}, dim=16, depth=2, num_heads=heads, mlp_ratio=1.0,
                      projection_dim=20).eval()
    B = 4
    tokens = {"t": (torch.randn(B, 5, 10), torch.tensor([[1, 1, 1, 0, 0]] * B, dtype=torch.bool)),
              "v": (torch.randn(B, 3, 12), torch.ones(B, 3, dtype=torch.bool)),
              "a": (torch.randn(B, 6, 9), torch.tensor([[1] * 6, [0] * 6, [1, 1, 1, 1, 0, 0], [0] * 6],
                                                      dtype=torch.bool))}
    out = head(tokens)
    ref, present = _head_ref(head, tokens, heads)
    for k in ("t", "v", "a", "tv", "va", "ta"):
        assert out[k].shape == (B, 20)
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    assert out["present_a"].tolist() == [True, False, True, False] == present["a"].tolist()
    # padded tokens do not matter: change their values, same embeddings
    t2 = {**tokens, "a": (tokens["a"][0].clone(), tokens["a"][1])}
    t2["a"][0][2, 4:] = 100.0
    t2["a"][0][1] = -7.0                                         # clip 1 has no audio at all
    out2 = head(t2)
    for k in ("a", "va", "ta"):
        torch.testing.assert_close(out2[k], out[k], rtol=1e-5, atol=1e-5)


def test_fusion_head_has_no_positions_and_is_order_free():
    """No positional embedding: permuting a modality's real tokens leaves every embedding unchanged."""
    torch.manual_seed(1)
    head = FusionHead({"t": 8, "v": 8, "a": 8}, dim=16, depth=1, num_heads=2, projection_dim=12).eval()
    tok = {m: (torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)) for m in "tva"}
    perm = torch.tensor([4, 2, 0, 1, 3])
    out = head(tok)
    out2 = head({**tok, "v": (tok["v"][0][:, perm], tok["v"][1])})
    for k in out:
        if not k.startswith("present"):
            torch.testing.assert_close(out[k], out2[k], rtol=1e-5, atol=1e-5)
    names = [n for n, _ in head.named_parameters()]
    assert not any("pos" in n or "cls" in n for n in names)
    assert "fusion.masking_token" in names and "video_token_proj.cg.fc.weight" in names


# --------------------------------------------------------------------------- audio tower
def test_audio_tower_masks_padding():
    torch.manual_seed(0)
    tower = AudioTower(n_mels=8, width=16, layers=2, heads=2, patch_frames=4, max_tokens=8).eval()
    mel = torch.randn(2, 8, 30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 17:] = False                              # clip 1: 17 real frames → 5 real tokens of 8
    x, tmask = tower(mel, mask)
    assert x.shape == (2, 8, 16) and tmask.tolist()[1] == [True] * 5 + [False] * 3
    mel2 = mel.clone()
    mel2[1, :, 20:] = 50.0                            # values in padded frames (whole padded tokens)
    x2, _ = tower(mel2, mask)
    torch.testing.assert_close(x2[1, :4], x[1, :4])   # real tokens unchanged by padding
    torch.testing.assert_close(x2[0], x[0])


def test_audio_tower_loads_local_weights(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    a = AudioTower(n_mels=8, width=16, layers=1, heads=2, patch_frames=4)
    save_file({f"audio.{k}": v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "a.safetensors"))
    torch.manual_seed(1)
    b = AudioTower(n_mels=8, width=16, layers=1, heads=2, patch_frames=4)
    AudioTower.load(b, tmp_path / "a.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


# --------------------------------------------------------------------------- the model
def _eao_cfg(tiny_model_cfg, **kw):
    import dataclasses
    from vip.config import FusionConfig
    fc = FusionConfig(dim=32, num_heads=4, projection_dim=24, audio_n_mels=8, audio_width=16, audio_layers=1,
                      audio_heads=2, audio_patch_frames=4, audio_max_tokens=8)
    return dataclasses.replace(tiny_model_cfg, fusion=dataclasses.replace(fc, **kw))


@pytest.mark.parametrize("encoder", ["vip", "meanpool"])
def test_eao_model_forward_export_and_load(tmp_path, tiny_model_cfg, tiny_export, encoder):
    import dataclasses
    from vip.model import build_model
    from vip.model.convert import export, load, load_weights_into
    cfg = dataclasses.replace(_eao_cfg(tiny_model_cfg), video_encoder=encoder)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if encoder == "vip":
        info = load_weights_into(model, tiny_export)         # a CLIP-ViP export: the fusion parts stay new
        assert info["missing"] and all(k.startswith(("audio.", "fusion_head.")) for k in info["missing"])
    video, text = torch.randn(3, 4, 3, 64, 64), torch.randint(1, 400, (3, 10))
    text[:, 6:] = 0
    mel, mask = torch.randn(3, 8, 20), torch.ones(3, 20, dtype=torch.bool)
    mask[2] = False                                           # clip 2 has no audio
    out = model(video=video, text=text, audio=mel, audio_mask=mask)
    for k in ("t", "v", "a", "tv", "va", "ta"):
        assert out[k].shape == (3, 24)
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(3))
    assert out["present_a"].tolist() == [True, True, False]
    torch.testing.assert_close(model.encode_audio(mel, mask), out["a"], rtol=1e-5, atol=1e-5)
    export(model, cfg, tmp_path / "m")
    again = load(tmp_path / "m")
    assert type(again).__name__ == "EAOModel" and again.fused_dim == 24
    out2 = again(video=video, text=text, audio=mel, audio_mask=mask)
    for k in ("t", "v", "a", "tv", "va", "ta"):
        torch.testing.assert_close(out2[k], out[k], rtol=1e-5, atol=1e-5)


def test_fusion_config_checks():
    from vip.config import ConfigError, load_config
    cfg = load_config(None, ["model.fusion.dim=64", "model.fusion.num_heads=4"])
    assert cfg.model.fusion.dim == 64 and cfg.model.fusion.projection_dim == 6144   # the original's default
    assert load_config(None, []).model.fusion is None                              # off by default
    with pytest.raises(ConfigError, match="audio_n_mels"):
        load_config(None, ["model.fusion.audio_n_mels=64"])
    with pytest.raises(ConfigError, match="fusion_weights"):
        load_config(None, ["model.fusion.dim=64", "loss.fusion_weights=[1,1]"])
    with pytest.raises(ConfigError):
        load_config(None, ["model.fusion.token_projection=linear"])


def test_inference_api_embeds_sound(tmp_path, tiny_model_cfg):
    """vip.load of a fusion export: encode_audio / encode_fused / fused on files with soundtracks equal
    the model's own forward on the same log-mels; a file without sound is an audio-absent clip."""
    import av
    import numpy as np

    from shards.audio import clip_log_mel
    from shards.config import DataConfig
    from vip.inference import load
    from vip.model import build_model
    from vip.model.convert import export
    cfg = _eao_cfg(tiny_model_cfg)
    torch.manual_seed(0)
    export(build_model(cfg), cfg, tmp_path / "m")
    paths = []
    for i, hz in enumerate((300, 1200)):
        p = tmp_path / f"c{i}.mp4"
        with av.open(str(p), "w") as c:
            vs, au = c.add_stream("libx264", rate=8), c.add_stream("aac", rate=16000)
            vs.width, vs.height, vs.pix_fmt, au.layout = 64, 64, "yuv420p", "mono"
            for k in range(8):
                for pk in vs.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 30 * k, np.uint8), format="rgb24")):
                    c.mux(pk)
            for pk in vs.encode():
                c.mux(pk)
            t = np.arange(16000) / 16000
            f = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None], format="fltp",
                                           layout="mono")
            f.sample_rate, f.pts = 16000, 0
            for pk in [*au.encode(f), *au.encode()]:
                c.mux(pk)
        paths.append(p)
    data = DataConfig(audio_seconds=0.5, audio_n_mels=8)
    m = load(tmp_path / "m", num_frames=4, audio=data)
    a = m.encode_audio(paths)
    assert a.shape == (2, 24) and not torch.allclose(a[0], a[1])
    mels = [clip_log_mel(p.read_bytes(), data, False) for p in paths]
    mel = torch.from_numpy(np.stack([x for x, _ in mels]))
    mask = torch.from_numpy(np.stack([k for _, k in mels]))
    torch.testing.assert_close(a, m.model.encode_audio(mel, mask), rtol=1e-5, atol=1e-5)
    va = m.encode_fused(paths)
    e = m.fused(videos=paths, texts=["a tone", "another tone"])
    torch.testing.assert_close(va, e["va"], rtol=1e-5, atol=1e-5)
    assert set(e) == {"t", "v", "a", "tv", "va", "ta"}
