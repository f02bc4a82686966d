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
    return build_shards(cfg), good, root, cfg


def test_each_bad_input_is_counted(bad_build):
    summary, good, _, _ = bad_build
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
    summary, good, root, _ = bad_build
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


def test_rerun_reports_the_same_skips(bad_build):
    """A re-run (resume) counts the skips recorded by the shards an earlier run finished
    (missing_video, no_video_stream, … live in _parts/): its summary equals the first run's."""
    first, _, _, cfg = bad_build
    again = build_shards(cfg)
    assert (again.shards_already_done, again.shards_built, again.clips_written) == (first.shards_total, 0, 0)
    assert again.skips.counts == first.skips.counts
    assert again.shards_empty == first.shards_empty == 1

    def skip_lines(table):
        return [line for line in table.splitlines() if "skipped" in line or "empty shards" in line]
    assert skip_lines(again.table()) == skip_lines(first.table())


def test_a_shard_whose_every_clip_was_skipped_never_crashes_training(bad_build, small_data):
    """shard-000003 holds only unusable clips: listed with 0 samples, dropped by the reader. One rank
    more than non-empty shards is refused when the loader is made (naming the counts); with as many
    ranks as non-empty shards (or fewer) every rank reads every epoch."""
    _, good, root, _ = bad_build
    shards = root / "shards"
    listed = json.loads((shards / "shards.json").read_text())["shards"]
    assert [s["num_samples"] for s in listed].count(0) == 1
    n = len(listed) - 1                                                # non-empty shards
    with pytest.raises(ValueError, match=f"{n} shards for {n + 1} ranks .*1 empty shards, dropped"):
        StreamLoader(small_data(shards, train=True), rank=0, world=n + 1)
    for world in (n, 2):
        seen = []
        for rank in range(world):
            loader = StreamLoader(small_data(shards, train=True, batch_size=2), rank=rank, world=world)
            for i, _ in enumerate(loader):                             # into the 3rd epoch of this rank
                if loader.epoch >= 2 or i > 40:
                    break
            assert loader.epoch >= 2
            seen += [k for b in StreamLoader(small_data(shards, train=False), rank=rank, world=world) for k in b["key"]]
        assert len(seen) == good + 1 and len(set(seen)) == len(seen)   # eval: every clip once


def test_embed_shards_counts_failed_clips_not_reasons(bad_build, tiny_export, tmp_path, capsys):
    """`vip embed eval.shards=…`: 3 clips with a garbled mp4 are 3 failures; the short clip (frames
    repeated) is embedded and is no failure."""
    import tarfile

    import pyarrow.parquet as pq

    from vip.cli import main
    _, good, root, _ = bad_build
    out = tmp_path / "shards"
    shutil.copytree(root / "shards", out)
    tar = out / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:
        garbled = [m for m in tf.getmembers() if m.name.endswith(".mp4")][:3]
    for m in garbled:
        data[m.offset_data:m.offset_data + m.size] = bytes(m.size)
    tar.write_bytes(bytes(data))
    emb = tmp_path / "emb.parquet"
    assert main(["embed", f"eval.model={tiny_export}", f"eval.shards={out}", f"eval.out={emb}",
                 "eval.num_frames=4", "eval.device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"{good + 1 - 3} embeddings" in printed and "; 3 failed {'corrupt_member': 3}" in printed, printed
    assert "short_clip_padded" not in printed
    short = next(r["key"] for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["clip_id"].endswith(".97.mp4"))
    keys = pq.read_table(emb).column("key").to_pylist()
    assert short in keys and not {m.name[:-4] for m in garbled} & set(keys)


def test_audio_only_file_is_no_video_stream_everywhere(tiny_export, write_video, tmp_path):
    """The builder's reason for an audio-only file (no_video_stream) is also vip eval's, vip embed's and
    encode_video's — not an IndexError."""
    from vip.config import EvalConfig
    from vip.eval.retrieval import run_eval
    from vip.inference import embed_folder, load
    vids = tmp_path / "videos"
    vids.mkdir()
    write_video(vids / "v0.mp4", "red")
    write_video(vids / "v1.mp4", "blue")
    _audio_only_mp4(vids / "talk.mp4")
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps({"clip_id": c, "text": t}) + "\n"
                           for c, t in [("v0", "a red square"), ("talk", "someone talks"), ("v1", "a blue square")]))
    res = tmp_path / "res.json"
    run_eval(EvalConfig(annotations=str(ann), videos=str(vids), model=str(tiny_export), num_frames=4, batch_size=2,
                        out=str(res), device="cpu"), progress=False)
    saved = json.loads(res.read_text())
    assert saved["skipped_reasons"] == {"no_video_stream": 1} and saved["skipped_ids"] == ["talk"]
    m = load(tiny_export, num_frames=4)
    keys, _, failed = embed_folder(m, vids, progress=False)
    assert keys == ["v0.mp4", "v1.mp4"] and failed == {"talk.mp4": "no_video_stream"}
    with pytest.raises(ValueError, match="no_video_stream") as e:
        m.encode_video([vids / "v0.mp4", vids / "talk.mp4"])
    assert str(vids / "talk.mp4") in str(e.value)
