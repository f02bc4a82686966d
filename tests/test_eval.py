"""`vip eval` end to end on a tiny random model and a handful of short PyAV-written videos."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from vip.config import EvalConfig, ModelConfig

TINY = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}


def write_video(path, colour, n=10, w=80, h=48, fps=10, fmt="mp4"):
    """A square of `colour` moving right on a dark background (libx264)."""
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 20, np.uint8)
            x = 4 + i * 5
            img[16:32, x:x + 16] = COLOURS[colour]
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalvideos")
    vids = d / "videos"
    vids.mkdir()
    write_video(vids / "v0.mp4", "red", n=10)
    write_video(vids / "v1.mp4", "green", n=7)
    write_video(vids / "v2", "blue", n=13)                 # no extension
    write_video(vids / "v3.mkv", "yellow", n=9, fmt="matroska")
    (vids / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 4)
    ann = d / "ann.jsonl"
    rows = [{"clip_id": "v0", "text": "a red square moves right"},
            {"clip_id": "v1", "text": ["a green square", "green box moving"]},   # two captions
            {"clip_id": "v2", "text": "a blue square"},
            {"clip_id": "bad", "text": ["corrupt", "still corrupt"]},
            {"clip_id": "v3", "text": "yellow square"},
            {"clip_id": "v0", "text": "red thing"},                                 # repeated id: merged
            {"clip_id": "gone", "text": "missing file"}]
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from vip.model import build_model
    from vip.model.convert import export
    torch.manual_seed(0)
    return export(build_model(TINY), TINY, tmp_path_factory.mktemp("export") / "tiny")


def hand_ranks(sim, t2v):
    """1-based ranks with ties in the query's favour, by Python loops."""
    nt, nv = sim.shape
    t_ranks = [1 + sum(sim[i, j] > sim[i, t2v[i]] for j in range(nv)) for i in range(nt)]
    v_ranks = []
    for v in range(nv):
        best = min(1 + sum(sim[k, v] > sim[i, v] for k in range(nt)) for i in range(nt) if t2v[i] == v)
        v_ranks.append(best)
    return np.array(t_ranks), np.array(v_ranks)


def test_eval_end_to_end(video_set, tiny_export, tmp_path):
    from vip.eval.retrieval_eval import image_size, run_eval, tokenizer_for
    from vip.eval.videos import index_folder, load_video
    from vip.model.convert import load
    from shards.reader import normalise
    out = tmp_path / "res.json"
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"),
                     model=str(tiny_export), num_frames=4, batch_size=2, text_batch_size=3, out=str(out))
    res = run_eval(cfg, progress=False)
    saved = json.loads(out.read_text())
    assert saved["videos"] == 4 and saved["texts"] == 6 and saved["skipped"] == 2
    assert saved["skipped_reasons"] == {"decode_error": 1, "missing": 1}
    assert saved["skipped_ids"] == ["bad", "gone"] and saved["dropped_texts"] == 3
    keys = {f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")}
    assert set(saved["metrics"]) == keys and set(saved["dsl_metrics"]) == keys

    # the model's own similarity matrix, computed directly
    model = load(tiny_export)
    files = index_folder(video_set / "videos")
    size = image_size(model)
    assert size == 64
    with torch.no_grad():
        vids = torch.stack([normalise(load_video(files[c], 4, size)) for c in ["v0", "v1", "v2", "v3"]])
        v = model.encode_video(vids)
        texts = ["a red square moves right", "red thing", "a green square", "green box moving", "a blue square",
                 "yellow square"]
        t = model.encode_text(tokenizer_for("vip-tiny", model.context_length)(texts))
    t2v = [0, 0, 1, 1, 2, 3]
    sim = (t @ v.T).numpy()
    tr, vr = hand_ranks(sim, t2v)
    m = res["metrics"]
    assert m["t2v_MnR"] == pytest.approx(tr.mean()) and m["t2v_MdR"] == pytest.approx(np.median(tr))
    assert m["v2t_MnR"] == pytest.approx(vr.mean()) and m["v2t_R@1"] == pytest.approx((vr <= 1).mean() * 100)
    assert m["t2v_R@1"] == pytest.approx((tr <= 1).mean() * 100)


def test_paragraph_and_meanpool_baseline(video_set, tmp_path):
    """--paragraph joins the caption list; an open_clip checkpoint file runs as MeanPool."""
    import open_clip
    from vip.eval.retrieval_eval import run_eval
    from vip.model.archs import clip_config
    torch.manual_seed(1)
    clip = open_clip.CLIP(**clip_config("vip-tiny"))
    ckpt = tmp_path / "openclip.pt"
    torch.save(clip.state_dict(), ckpt)
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"),
                     open_clip=str(ckpt), arch="vip-tiny", paragraph=True, num_frames=3, out=str(tmp_path / "r.json"))
    res = run_eval(cfg, progress=False)
    assert res["model"].startswith("meanpool:") and res["videos"] == 4
    assert res["texts"] == 4       # one paragraph per clip (v0's two lines joined)
    assert res["metrics"]["t2v_MnR"] >= 1


def test_read_annotations_paragraph(tmp_path):
    from vip.eval.videos import read_annotations
    p = tmp_path / "a.jsonl"
    p.write_text('{"clip_id": "a", "text": ["one.", "two."]}\n\n{"clip_id": "b", "text": "three"}\n')
    assert [it.texts for it in read_annotations(p)] == [("one.", "two."), ("three",)]
    assert [it.texts for it in read_annotations(p, paragraph=True)] == [("one. two.",), ("three",)]


def test_cli_eval(video_set, tiny_export, tmp_path, capsys):
    from vip.cli import main
    out = tmp_path / "cli.json"
    rc = main(["eval", "--model", str(tiny_export), "--annotations", str(video_set / "ann.jsonl"),
               "--videos", str(video_set / "videos"), "--out", str(out), "eval.num_frames=2"])
    assert rc == 0 and json.loads(out.read_text())["num_frames"] == 2
    assert "| t2v_R@1" in capsys.readouterr().out
