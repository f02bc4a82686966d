"""vip.eval end to end on a tiny random model: `vip eval` on a handful of short PyAV-written videos,
zero-shot evaluation on shards, and the one encode loop both go through."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vip.config import EvalConfig


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
    from shards.reader import normalise
    from vip.eval.retrieval import run_eval
    from vip.eval.videos import index_folder, load_video
    from vip.model.archs import image_size, tokenizer_for
    from vip.model.convert import load
    out = tmp_path / "res.json"
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"),
                     model=str(tiny_export), num_frames=4, batch_size=2, text_batch_size=3, out=str(out),
                     device="cpu")
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
    """eval.paragraph joins the caption list; an open_clip checkpoint file runs as MeanPool."""
    import open_clip
    from vip.eval.retrieval import run_eval
    from vip.model.archs import clip_config
    torch.manual_seed(1)
    clip = open_clip.CLIP(**clip_config("vip-tiny"))
    ckpt = tmp_path / "openclip.pt"
    torch.save(clip.state_dict(), ckpt)
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"),
                     open_clip=str(ckpt), arch="vip-tiny", paragraph=True, num_frames=3, out=str(tmp_path / "r.json"),
                     device="cpu")
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


def test_missing_options_name_the_override(video_set, tmp_path):
    from vip.config import ConfigError
    from vip.eval.retrieval import run_eval
    ann, vids = str(video_set / "ann.jsonl"), str(video_set / "videos")
    for cfg, needle in ((EvalConfig(videos=vids, model="m"), "eval.annotations="),
                        (EvalConfig(annotations=ann, model="m"), "eval.videos="),
                        (EvalConfig(annotations=ann, videos=vids), "eval.model="),
                        (EvalConfig(annotations=ann, videos=vids, model=str(tmp_path / "none")), "no such file")):
        with pytest.raises(ConfigError, match=needle):
            run_eval(cfg, progress=False)


# --------------------------------------------------------------------------- shards, and the one encode loop
@pytest.fixture(scope="module")
def tiny_model(tiny_model_cfg):
    from vip.model import build_model
    torch.manual_seed(0)
    return build_model(tiny_model_cfg).eval()


def _cpu():
    from vip.train.runtime import Runtime
    return Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"), precision="fp32")


def test_evaluate_shards_matches_a_hand_loop(tiny_model, shard_dir, small_data):
    """evaluate_shards = retrieval_metrics of subtitle × video features over the eval-order reader."""
    from shards.reader import StreamLoader
    from vip.eval.metrics import dsl, retrieval_metrics
    from vip.eval.retrieval import evaluate_shards
    data = small_data(shard_dir, image_size=64)
    res = evaluate_shards(tiny_model, data, _cpu(), max_clips=1000)
    v, t = [], []
    with torch.no_grad():
        for b in StreamLoader(dataclasses.replace(data, train=False)):
            v.append(tiny_model.encode_video(b["video"]))
            t.append(tiny_model.encode_text(b["subtitle"]))
    sim = torch.cat(t) @ torch.cat(v).T
    gt = np.arange(len(sim))
    want = {"clips": 12, **retrieval_metrics(sim, gt)}
    want.update({f"dsl_{k}": x for k, x in retrieval_metrics(dsl(sim), gt).items()})
    assert set(res) == set(want)
    for k, x in want.items():
        assert res[k] == pytest.approx(x, abs=1e-6), k
    assert evaluate_shards(tiny_model, data, _cpu(), max_clips=5)["clips"] == 5
    assert not tiny_model.training


def test_shard_and_folder_eval_share_one_encode_loop(tiny_model, shard_dir, small_data, video_set, monkeypatch):
    import vip.eval.encode as encode
    import vip.eval.retrieval as retrieval
    from vip.model.archs import tokenizer_for
    calls = []

    def spy(model, batches, rt, **kw):
        calls.append(kw)
        return encode.encode_batches(model, batches, rt, **kw)

    assert retrieval.encode_batches is encode.encode_batches
    monkeypatch.setattr(retrieval, "encode_batches", spy)
    tiny_model.train()
    shard = retrieval.evaluate_shards(tiny_model, small_data(shard_dir, image_size=64), _cpu(), max_clips=6)
    assert tiny_model.training            # mode restored (training calls this between steps)
    tiny_model.eval()
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"), num_frames=4)
    folder = retrieval.evaluate(tiny_model, cfg, tokenizer_for("vip-tiny", tiny_model.context_length), _cpu(),
                                progress=False)
    assert len(calls) == 2 and shard["clips"] == 6 and folder["videos"] == 4


def test_encode_batches_sorts_keys_and_keeps_failures(tiny_model):
    from vip.eval.encode import encode_batches
    g = torch.Generator().manual_seed(0)
    vids = torch.randn(3, 2, 3, 64, 64, generator=g)
    batches = [{"key": ["c", "a"], "video": vids[:2], "failed": [("x", "missing")]},
               {"key": [], "video": None, "failed": [("y", "decode_error")]},
               {"key": ["b"], "video": vids[2:]}]
    enc = encode_batches(tiny_model, batches, _cpu())
    assert enc.keys == ["a", "b", "c"] and enc.text is None
    assert enc.failed == {"x": "missing", "y": "decode_error"}
    with torch.no_grad():
        ref = tiny_model.encode_video(vids)
    torch.testing.assert_close(enc.video, ref[[1, 2, 0]], atol=1e-5, rtol=1e-5)
    assert encode_batches(tiny_model, batches, _cpu(), limit=1).keys == ["c"]       # the first clip read


def test_format_table_both_result_shapes():
    from vip.eval.metrics import COLUMNS, format_table
    m = {k: 1.0 for k in COLUMNS}
    shard = {"clips": 7, **m, **{f"dsl_{k}": 2.0 for k in COLUMNS}}
    folder = {"videos": 4, "texts": 6, "metrics": m, "dsl_metrics": {k: 3.0 for k in COLUMNS}}
    lines = format_table({"untrained": shard, "tiny": folder, "nodsl": {"clips": 1, **m}}).splitlines()
    assert lines[0].startswith("| model | videos | texts | t2v_R@1") and len(lines) == 2 + 5
    assert lines[2].startswith("| untrained | 7 | 7 | 1.0") and lines[3].startswith("| untrained +DSL | 7 | 7 | 2.0")
    assert lines[5].startswith("| tiny +DSL | 4 | 6 | 3.0") and lines[6].startswith("| nodsl | 1 | 1 |")
