import io
import json
import os
import tarfile

import av
import pyarrow.parquet as pq
import pytest

from shards.build import build_shards, is_done

REQUIRED = {"clip_id", "video_id", "span", "subtitle", "fps", "num_frames", "width", "height", "duration"}


def _members(tar):
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_build_outputs(shard_dir, corpus):
    tars = sorted(shard_dir.glob("shard-*.tar"))
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(6)]
    manifest = pq.read_table(shard_dir / "manifest.parquet").to_pylist()
    assert len(manifest) == 12 and len({r["key"] for r in manifest}) == 12
    assert {"shard", "key", "clip_id", "duration", "num_frames", "bytes"} <= set(manifest[0])
    index = json.loads((shard_dir / "shards.json").read_text())
    assert index["num_samples"] == 12 and sum(s["num_samples"] for s in index["shards"]) == 12
    subs = {json.loads(x)["clip_id"]: json.loads(x)["text"] for x in open(corpus / "subtitles.jsonl")}
    for tar in tars:
        members = _members(tar)
        assert set(n.split(".", 1)[1] for n in members) == {"mp4", "jpg", "json"}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.loads(data)
            assert REQUIRED <= set(meta)
            assert meta["key"] == name[:-5] and "." not in meta["key"]
            assert meta["subtitle"] == subs[meta["clip_id"]]
            assert meta["fps"] == 8.0 and min(meta["width"], meta["height"]) == 64
            assert meta["num_frames"] == 16 and abs(meta["duration"] - 2.0) < 1e-6
            # the stored clip really has that format: frame count, size, keyframes every 4 frames
            with av.open(io.BytesIO(members[name[:-5] + ".mp4"])) as c:
                frames = list(c.decode(video=0))
            assert len(frames) == meta["num_frames"]
            assert (frames[0].width, frames[0].height) == (meta["width"], meta["height"])
            assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 4, 8, 12]
            from PIL import Image
            img = Image.open(io.BytesIO(members[name[:-5] + ".jpg"]))
            assert min(img.size) == 64


def test_rerun_skips_done_and_rebuilds_missing(shard_dir, corpus, small_build, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    cfg = small_build(corpus, out)
    s = build_shards(cfg)
    assert (s.shards_already_done, s.shards_built, s.clips_written) == (6, 0, 0)
    before = (out / "shard-000003.tar").read_bytes()
    (out / "shard-000003.tar").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    s = build_shards(cfg)
    assert (s.shards_already_done, s.shards_built, s.clips_written) == (5, 1, 2)
    assert (out / "shard-000003.tar").read_bytes() == before   # deterministic output
    for name, m in mtimes.items():
        assert (out / name).stat().st_mtime_ns == m            # the others were not touched
    assert len(pq.read_table(out / "manifest.parquet")) == 12


def test_interrupted_shard_is_never_visible(corpus, small_build, tmp_path, monkeypatch):
    """A worker killed mid-shard leaves no shard under its final name; the re-run completes it."""
    import shards.build as build

    calls = {"n": 0}
    real = build.cut_clip

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like a kill: not a per-clip error
        return real(*a, **k)

    monkeypatch.setattr(build, "cut_clip", dying)
    cfg = small_build(corpus, tmp_path / "out", clips_per_shard=4, limit_shards=1)
    with pytest.raises(KeyboardInterrupt):
        build.build_one_shard(next(build.plan_tasks(cfg, build.SkipLog())))
    assert not (tmp_path / "out" / "shard-000000.tar").exists() and not is_done(tmp_path / "out", 0)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.is_file()] == []  # no temp leftovers
    monkeypatch.setattr(build, "cut_clip", real)
    s = build_shards(cfg)
    assert s.shards_built == 1 and s.clips_written == 4


@pytest.mark.slow
def test_build_over_local_ray(corpus, small_build, tmp_path, shard_dir):
    """The same build over Ray tasks (a private Ray on 127.0.0.1) gives byte-identical shards."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        s = build_shards(small_build(corpus, tmp_path / "ray", ray_address="local", workers=2))
    finally:
        ray.shutdown()
    assert s.shards_built == 6 and s.clips_written == 12 and s.shards_failed == 0
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        assert (tmp_path / "ray" / tar.name).read_bytes() == tar.read_bytes()


def test_source_keyframes_do_not_leak_into_stored_gop(tmp_path):
    """A source with frequent keyframes still gives stored clips a keyframe exactly every interval."""
    from shards.encode import StoredFormat, cut_clip, open_source
    from shards.synth import ClipPlan, render_frame
    plan = ClipPlan("v.0.mp4", 0.0, 4.0, "red", "circle", "left", (10, 20, 30), 0)
    src = tmp_path / "v.mp4"
    with av.open(str(src), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 128, 72, "yuv420p"
        s.options = {"x264-params": "keyint=7:min-keyint=7:scenecut=0"}
        for i in range(120):
            f = av.VideoFrame.from_ndarray(render_frame(plan, i / 30, 128, 72), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    video = open_source(str(src))
    clip = cut_clip(video, 0.3, 3.9, StoredFormat(fps=10, short_side=64, keyframe_interval=8, frame_short_side=64))
    video.close()
    with av.open(io.BytesIO(clip.mp4)) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    assert clip.num_frames == 36 and keys == [0, 8, 16, 24, 32]


def test_square_and_keep_storage_give_the_same_training_pixels(corpus, shard_dir, small_build, small_data,
                                                                  tmp_path):
    """build.aspect=square (the default) stores the reader's squash resize: clips are short_side² (fewer
    pixels to decode), the middle JPEG keeps its aspect, a squash read matches keep-aspect shards' up
    to codec noise, and opening them for a crop read fails with a clear error rather than cropping
    distorted frames; keep-aspect shards read with crop."""
    import dataclasses

    import torch

    from shards.reader import StreamLoader
    out, keep_dir = shard_dir, tmp_path / "keep"                                  # shard_dir: the default
    summary = build_shards(small_build(corpus, keep_dir, aspect="keep"))
    assert summary.clips_written == 12
    kmeta = next(json.loads(v) for k, v in _members(keep_dir / "shard-000000.tar").items() if k.endswith(".json"))
    assert (kmeta["width"], kmeta["height"], kmeta["aspect"]) == (114, 64, "keep")
    members = _members(out / "shard-000000.tar")
    meta = next(json.loads(v) for k, v in members.items() if k.endswith(".json"))
    assert (meta["width"], meta["height"], meta["aspect"]) == (64, 64, "square")
    with av.open(io.BytesIO(members[meta["key"] + ".mp4"])) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (64, 64)
    from PIL import Image
    assert Image.open(io.BytesIO(members[meta["key"] + ".jpg"])).size[0] > 64     # JPEG keeps the aspect
    cfg = small_data(out, train=False, batch_size=12, image_size=32)
    sq = next(iter(StreamLoader(cfg)))
    keep = next(iter(StreamLoader(dataclasses.replace(cfg, shards=str(keep_dir)))))
    assert sq["key"] == keep["key"] and sq["video"].shape == keep["video"].shape
    diff = (sq["video"] - keep["video"]).abs().mean().item()                      # normalised units
    assert diff < 0.03, diff                                                      # measured 0.011 (~1 of 255 levels)
    assert not torch.equal(sq["video"], keep["video"])                            # really another decode
    with pytest.raises(ValueError, match="resize=crop"):                          # refused at open
        StreamLoader(dataclasses.replace(cfg, resize="crop"))
    crop = next(iter(StreamLoader(dataclasses.replace(cfg, shards=str(keep_dir), resize="crop"))))
    assert crop["video"].shape == keep["video"].shape
    with pytest.raises(ValueError, match="aspect"):
        build_shards(small_build(corpus, tmp_path / "bad", aspect="wide"))
