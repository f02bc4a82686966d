import json
import os
import tarfile

import pytest

from shards.keys import BadKeyError, clip_key, is_safe_key, shard_index, shard_name
from shards.writer import ShardWriter


@pytest.mark.parametrize("clip_id,key", [
    ("QMi8x8o55Ns.1.mp4", "QMi8x8o55Ns_1"),
    ("QMi8x8o55Ns.12.MKV", "QMi8x8o55Ns_12"),
    ("a-b_c.3", "a-b_c_3"),
    ("../../etc/passwd", "etc_passwd"),
    ("/abs/path.mp4", "abs_path"),
    ("..", None),
    ("...mp4", None),
    ("", None),
    ("vidé o.1.mp4", "vid__o_1"),
    ("a\\b\x00c.mp4", "a_b_c"),
])
def test_clip_key(clip_id, key):
    if key is None:
        with pytest.raises(BadKeyError):
            clip_key(clip_id)
    else:
        k = clip_key(clip_id)
        assert k == key and is_safe_key(k) and "." not in k and "/" not in k


def test_long_ids_stay_unique_and_short():
    a, b = "x" * 300 + ".1.mp4", "x" * 300 + ".2.mp4"
    ka, kb = clip_key(a), clip_key(b)
    assert ka != kb and len(ka) <= 96 and is_safe_key(ka)


def test_shard_names():
    assert shard_name(12) == "shard-000012.tar" and shard_index("x/shard-000012.tar") == 12
    with pytest.raises(ValueError):
        shard_index("shard-12.tar")


def test_writer_refuses_unsafe_keys_and_members(tmp_path):
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / "shard-000000.tar") as w:
            w.add("../evil", {"json": {}})
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / "shard-000001.tar") as w:
            w.add("ok", {"pickle": b"x"})
    # a failed shard leaves neither the final name nor a temp file behind
    assert sorted(os.listdir(tmp_path)) == []


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "shard-000000.tar"
    with ShardWriter(target) as w:
        w.add("k1", {"json": {"a": 1}, "txt": "hello"})
        assert not target.exists()  # partial shard invisible under its final name
    with tarfile.open(target) as tf:
        names = tf.getnames()
        assert names == ["k1.json", "k1.txt"]
        assert json.loads(tf.extractfile("k1.json").read()) == {"a": 1}


def test_build_with_hostile_clip_ids_writes_only_inside_out(corpus, small_build, tmp_path):
    """Clip ids with dots, slashes and '..' become safe keys; nothing escapes the output folder."""
    from shards.build import build_shards
    meta_in = [json.loads(x) for x in open(corpus / "metadata.jsonl")]
    subs_in = {json.loads(x)["clip_id"]: json.loads(x)["text"] for x in open(corpus / "subtitles.jsonl")}
    v = meta_in[0]
    hostile = ["../../escape.0.mp4", "/tmp/abs.1.mp4", "a/../../b.2.mp4"]
    clips = [{"clip_id": h, "span": c["span"]} for h, c in zip(hostile, v["clip"])]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "metadata.jsonl").write_text(json.dumps({**v, "clip": clips}) + "\n")
    (tmp_path / "in" / "subtitles.jsonl").write_text(
        "".join(json.dumps({"clip_id": h, "text": subs_in[c["clip_id"]]}) + "\n" for h, c in zip(hostile, v["clip"])))
    cfg = small_build(corpus, tmp_path / "out", metadata=str(tmp_path / "in/metadata.jsonl"),
                      subtitles=str(tmp_path / "in/subtitles.jsonl"), clips_per_shard=10, workers=1)
    s = build_shards(cfg)
    assert s.clips_written == 3
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        names = tf.getnames()
    assert all("/" not in n and ".." not in n for n in names)
    assert {n.split(".")[0] for n in names} == {"escape_0", "tmp_abs_1", "a_______b_2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
