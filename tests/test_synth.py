import dataclasses
import json

import av
import numpy as np

from shards.synth import COLOURS, make_corpus, render_frame, truth_plan


def _lines(p):
    return [json.loads(x) for x in open(p)]


def _decode_at(path, t):
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            if f.time >= t:
                return f.to_ndarray(format="rgb24")
    raise AssertionError("time past end")


def test_deterministic_from_seed(small_synth, tmp_path):
    a = make_corpus(small_synth(tmp_path / "a"))
    b = make_corpus(small_synth(tmp_path / "b"))
    assert a["clips"] == b["clips"] == 12
    for name in ("metadata.jsonl", "subtitles.jsonl", "truth.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for v in (tmp_path / "a" / "videos").iterdir():
        assert v.read_bytes() == (tmp_path / "b" / "videos" / v.name).read_bytes()
    make_corpus(dataclasses.replace(small_synth(tmp_path / "c"), seed=2))
    assert (tmp_path / "c" / "subtitles.jsonl").read_text() != (tmp_path / "a" / "subtitles.jsonl").read_text()


def test_hdvila_format(corpus):
    meta = _lines(corpus / "metadata.jsonl")
    subs = {s["clip_id"]: s["text"] for s in _lines(corpus / "subtitles.jsonl")}
    assert len(meta) == 4
    for v in meta:
        assert set(v) == {"video_id", "url", "clip"} and len(v["video_id"]) == 11
        assert (corpus / "videos" / f"{v['video_id']}.mp4").exists()
        for k, c in enumerate(v["clip"]):
            assert c["clip_id"] == f"{v['video_id']}.{k}.mp4"
            assert len(c["span"]) == 2 and c["span"][0].count(":") == 2 and c["clip_id"] in subs


def test_video_content_matches_text(corpus):
    """The colour named in the subtitle is on screen and moves in the named direction."""
    truth = _lines(corpus / "truth.jsonl")
    subs = {s["clip_id"]: s["text"] for s in _lines(corpus / "subtitles.jsonl")}
    for t in truth:
        assert t["colour"] in subs[t["clip_id"]] and t["shape"] in subs[t["clip_id"]]
        vid = t["clip_id"].split(".")[0]
        s, e = t["span_s"]
        centroids = []
        for when in (s + 0.15 * (e - s), e - 0.15 * (e - s)):
            frame = _decode_at(corpus / "videos" / f"{vid}.mp4", when).astype(int)
            mask = (np.abs(frame - np.array(COLOURS[t["colour"]])).sum(-1) < 60)
            assert mask.sum() > 20, f"{t['colour']} not visible in {t['clip_id']}"
            ys, xs = np.nonzero(mask)
            centroids.append((xs.mean(), ys.mean()))
        dx, dy = centroids[1][0] - centroids[0][0], centroids[1][1] - centroids[0][1]
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[t["direction"]]
        assert moved > 20 and moved > 3 * min(abs(dx), abs(dy)), (t, dx, dy)


def test_renderer_matches_encoded_video(corpus):
    t = _lines(corpus / "truth.jsonl")[1]
    plan = truth_plan(t)
    when = (plan.start + plan.end) / 2
    vid = t["clip_id"].split(".")[0]
    decoded = _decode_at(corpus / "videos" / f"{vid}.mp4", when).astype(float)
    rendered = render_frame(plan, round(when * 30) / 30, 192, 108).astype(float)
    assert np.abs(decoded - rendered).mean() < 6


def test_natural_texture_is_textured_panning_and_harder_to_compress(corpus, small_synth, tmp_path):
    """synth.texture=natural: a textured background that pans with the camera (the codec must work
    like on camera footage: many more bits than the flat background), still re-renderable from truth."""
    import pytest

    from shards.synth import PAN_PIXELS_PER_SECOND, _natural_background
    nat = tmp_path / "nat"
    make_corpus(dataclasses.replace(small_synth(nat), texture="natural", num_videos=2))
    truth = _lines(nat / "truth.jsonl")
    assert all(t["texture"] >= 0 for t in truth)
    assert all(t["texture"] == -1 for t in _lines(corpus / "truth.jsonl"))
    plan = truth_plan(truth[0])
    W, H = 192, 108
    a = _natural_background(plan, plan.start + 0.5, W, H).astype(float)
    b = _natural_background(plan, plan.start + 1.0, W, H).astype(float)
    assert a.std() > 15                                                  # textured, not flat
    d = int(PAN_PIXELS_PER_SECOND * 1.0) - int(PAN_PIXELS_PER_SECOND * 0.5)
    shifted = np.corrcoef(a[d:, d:].ravel(), b[:-d, :-d].ravel())[0, 1]   # the camera moved by d pixels
    assert shifted > 0.9 > np.corrcoef(a.ravel(), b.ravel())[0, 1] + 0.2
    # encoded video ≈ renderer (the codec drops some grain), and the shape is still drawn
    vid = truth[0]["clip_id"].split(".")[0]
    when = (plan.start + plan.end) / 2
    decoded = _decode_at(nat / "videos" / f"{vid}.mp4", when).astype(float)
    rendered = render_frame(plan, round(when * 30) / 30, W, H).astype(float)
    assert np.abs(decoded - rendered).mean() < 12
    assert (np.abs(rendered - np.array(COLOURS[plan.colour])).sum(-1) < 1).sum() > 20
    bits = lambda root: sum(v.stat().st_size for v in (root / "videos").iterdir()) / len(list((root / "videos").iterdir()))
    assert bits(nat) > 2.5 * bits(corpus)                              # ~3.4× at this tiny size
    with pytest.raises(ValueError, match="texture"):
        make_corpus(dataclasses.replace(small_synth(tmp_path / "bad"), texture="wood"))


def test_text_registers_deterministic_and_gapped(small_synth, tmp_path):
    """synth.text=speech: ASR-like subtitles, deterministic from the seed, loosely related (fillers,
    off-topic lines, slang for the shape, motion in other words); description: short texts naming
    colour, shape and motion. The video plan and the h264 bytes do not depend on the text style."""
    import pytest

    from shards.texts import FILLERS, OFF_TOPIC
    runs = {}
    for name, style in (("s1", "speech"), ("s2", "speech"), ("d", "description"), ("t", "template")):
        make_corpus(dataclasses.replace(small_synth(tmp_path / name), text=style, num_videos=3))
        runs[name] = tmp_path / name
    assert (runs["s1"] / "subtitles.jsonl").read_text() == (runs["s2"] / "subtitles.jsonl").read_text()
    assert (runs["s1"] / "truth.jsonl").read_text() == (runs["s2"] / "truth.jsonl").read_text()
    for v in (runs["t"] / "videos").iterdir():        # same videos whatever the text register
        assert v.read_bytes() == (runs["s1"] / "videos" / v.name).read_bytes()
    other = tmp_path / "s3"
    make_corpus(dataclasses.replace(small_synth(other), text="speech", num_videos=3, seed=5))
    assert (other / "subtitles.jsonl").read_text() != (runs["s1"] / "subtitles.jsonl").read_text()

    truth = {t["clip_id"]: t for t in _lines(runs["s1"] / "truth.jsonl")}
    speech = {s["clip_id"]: s["text"] for s in _lines(runs["s1"] / "subtitles.jsonl")}
    desc = {s["clip_id"]: s["text"] for s in _lines(runs["d"] / "subtitles.jsonl")}
    for cid, t in truth.items():
        words = desc[cid].split()
        assert t["colour"] in words and t["shape"] in words and len(words) <= 10, desc[cid]
        assert any(w in desc[cid] for w in ("left", "right", "up", "top", "down", "bottom")), desc[cid]
        assert t["colour"] in t["description"].split()
    # speech is a different register: longer, fillers or off-topic, and often silent on some content
    s_len = np.mean([len(x.split()) for x in speech.values()])
    d_len = np.mean([len(x.split()) for x in desc.values()])
    assert s_len > d_len + 2
    texts = list(speech.values())
    assert any(any(f" {f} " in f" {x} " for f in FILLERS) or any(o in x for o in OFF_TOPIC) for x in texts)
    from shards.texts import speech_subtitle
    rng = np.random.default_rng(0)
    many = [speech_subtitle("red", "circle", "left", rng) for _ in range(400)]
    named_colour = np.mean(["red" in m.split() for m in many])          # said and heard right
    named_shape = np.mean(["circle" in m.split() for m in many])        # said with its proper name
    off = np.mean([any(o in m for o in OFF_TOPIC) and "red" not in m.split() and "read" not in m.split()
                   for m in many])
    assert 0.25 < named_colour < 0.7 and named_shape < 0.4 and 0.1 < off < 0.45, (named_colour, named_shape, off)
    with pytest.raises(ValueError, match="synth.text"):
        make_corpus(dataclasses.replace(small_synth(tmp_path / "bad"), text="poetry"))
