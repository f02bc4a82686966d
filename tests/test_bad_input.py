"""Every kind of bad input is logged, counted by reason, and costs nothing else."""
import io
import json
import shutil

import av
import numpy as np
import pytest

from shards.build import build_shards
from shards.reader import StreamLoader


def _audio_only_mp4(path):
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def bad_build(corpus, small_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    vids = root / "videos"
    shutil.copytree(corpus / "videos", vids)
    meta = [json.loads(x) for x in open(corpus / "metadata.jsonl")]
    subs = [json.loads(x) for x in open(corpus / "subtitles.jsonl")]
    good = sum(len(v["clip"]) for v in meta)
    v0 = meta[0]["video_id"]
    real = next(vids.iterdir()).read_bytes()
    (vids / "notavideo.mp4").write_text("this is not a video\n" * 100)
    (vids / "truncated.mp4").write_bytes(real[: len(real) // 3])
    _audio_only_mp4(vids / "audioonly.mp4")

    def clip(cid, a, b):
        return {"clip_id": cid, "span": [a, b]}
    extra = [
        {"video_id": "missingvid1", "url": "", "clip": [clip("missingvid1.0.mp4", "00:00:00.000", "00:00:01.000")]},
        {"video_id": "notavideo", "url": "", "clip": [clip("notavideo.0.mp4", "00:00:00.000", "00:00:01.000")]},
        {"video_id": "truncated", "url": "", "clip": [clip("truncated.0.mp4", "00:00:00.000", "00:00:01.000")]},
        {"video_id": "audioonly", "url": "", "clip": [clip("audioonly.0.mp4", "00:00:00.000", "00:00:01.000")]},
        {"video_id": v0, "url": "", "clip": [
            clip(f"{v0}.90.mp4", "00:10:00.000", "00:10:02.000"),     # span outside the video
            clip(f"{v0}.91.mp4", "00:00:02.000", "00:00:01.000"),     # end < start
            clip(f"{v0}.92.mp4", "00:00:01.000", "00:00:01.000"),     # zero length
            clip(f"{v0}.93.mp4", "00:00:xx", "00:00:01.000"),         # unparsable span
            clip(f"{v0}.94.mp4", "00:00:00.600", "00:00:01.500"),     # no subtitle line
            clip(f"{v0}.95.mp4", "00:00:00.600", "00:00:01.500"),     # empty subtitle
            clip(f"{v0}.96.mp4", "00:00:00.600", "00:00:01.500"),     # non-UTF-8 subtitle
            clip(meta[1]["clip"][0]["clip_id"], "00:00:00.600", "00:00:01.500"),  # duplicate clip id
            clip(f"{v0}.97.mp4", "00:00:00.600", "00:00:00.800"),     # 0.2 s: shorter than T frames
        ]},
    ]
    lines = [json.dumps(v) for v in meta] + ["{this is not json", "[1, 2]"] + [json.dumps(v) for v in extra]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    sub_lines = [json.dumps(s).encode() for s in subs]
    for cid in ["missingvid1.0.mp4", "notavideo.0.mp4", "truncated.0.mp4", "audioonly.0.mp4",
                f"{v0}.90.mp4", f"{v0}.91.mp4", f"{v0}.92.mp4", f"{v0}.93.mp4", f"{v0}.97.mp4"]:
        sub_lines.append(json.dumps({"clip_id": cid, "text": "a red circle moves to the left"}).encode())
    sub_lines.append(json.dumps({"clip_id": f"{v0}.95.mp4", "text": "   "}).encode())
    sub_lines.append(b'{"clip_id": "' + f"{v0}.96.mp4".encode() + b'", "text": "caf\xe9 latin-1"}')
    (root / "subtitles.jsonl").write_bytes(b"\n".join(sub_lines) + b"\n")
    cfg = small_build(corpus, root / "shards", metadata=str(root / "metadata.jsonl"),
                      subtitles=str(root / "subtitles.jsonl"), videos=str(vids), clips_per_shard=4)
    return build_shards(cfg), good, root


def test_each_bad_input_is_counted(bad_build):
    summary, good, _ = bad_build
    assert summary.skips.counts == {
        "malformed_metadata": 2, "missing_video": 1, "unreadable_video": 2, "no_video_stream": 1,
        "span_outside_video": 1, "empty_span": 2, "bad_span": 1, "missing_subtitle": 2,
        "empty_subtitle": 1, "subtitle_not_utf8": 1, "duplicate_clip_id": 1,
    }, summary.table()
    # the good clips and the short clip are all written; no shard failed
    assert summary.clips_written == good + 1 and summary.shards_failed == 0
    table = summary.table()
    assert "skipped: missing_video | 1" in table and "clips/s" in table


def test_short_clip_is_padded_and_counted(bad_build, small_data):
    summary, good, root = bad_build
    loader = StreamLoader(small_data(root / "shards", num_frames=6, train=False, batch_size=4))
    keys = []
    for batch in loader:
        keys += batch["key"]
        assert batch["video"].shape[1] == 6
    assert len(keys) == good + 1 and len(set(keys)) == len(keys)
    assert loader.events == {"short_clip_padded": 1}


def test_corrupt_members_at_read_time(shard_dir, small_data, tmp_path):
    """A garbled mp4 member and a truncated tar cost only their own samples."""
    import tarfile
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    with tarfile.open(out / "shard-000001.tar") as tf:
        m = next(x for x in tf.getmembers() if x.name.endswith(".mp4"))
        bad_key = m.name[:-4]
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[m.offset_data:m.offset_data + m.size] = bytes(m.size)      # zero the whole mp4
    (out / "shard-000001.tar").write_bytes(bytes(data))
    t4 = (out / "shard-000004.tar").read_bytes()
    (out / "shard-000004.tar").write_bytes(t4[: len(t4) // 2])      # cut mid-way
    loader = StreamLoader(small_data(out, train=False, batch_size=4))
    keys = [k for b in loader for k in b["key"]]
    assert bad_key not in keys
    assert loader.events["corrupt_member"] >= 1
    lost = loader.events["corrupt_member"] + loader.events["missing_sample"]
    assert 2 <= lost <= 3 and len(keys) == 12 - lost and len(set(keys)) == len(keys)


def test_shards_are_never_unpickled(shard_dir, small_data, tmp_path):
    """Unknown members (a pickle that would run code) are never read, let alone unpickled."""
    import pickle
    import tarfile
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    tar = out / "shard-000000.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
        payload = pickle.dumps(Evil())
        for ext in ("pickle", "pth", "pyd"):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    loader = StreamLoader(small_data(out, train=False, batch_size=4))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 12
    assert set(batches[0]) == {"video", "frame", "subtitle", "caption", "has_caption", "key"}
    assert not marker.exists()
