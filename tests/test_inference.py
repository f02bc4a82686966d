"""vip.inference: VideoTextModel on an exported tiny model equals direct CLIPViP calls; vip embed."""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_cfg):
    from vip.model import build_model
    from vip.model.convert import export
    torch.manual_seed(3)
    return export(build_model(tiny_model_cfg), tiny_model_cfg, tmp_path_factory.mktemp("inf") / "m")


@pytest.fixture(scope="module")
def vdir(tmp_path_factory, write_video):
    d = tmp_path_factory.mktemp("infvids")
    write_video(d / "a.mp4", "red", n=9)
    write_video(d / "b.mp4", "blue", n=6)
    (d / "broken.mp4").write_bytes(b"nope")
    return d


def test_wrapper_matches_direct_calls(exported, vdir):
    from shards.reader import normalise
    from vip.eval.videos import load_video
    from vip.inference import load
    from vip.model.archs import tokenizer_for
    from vip.model.convert import load as load_model
    m = load(exported, num_frames=4)
    raw = load_model(exported)
    texts = ["a red square", "a blue square", "nothing"]
    with torch.no_grad():
        vids = torch.stack([normalise(load_video(vdir / n, 4, 64)) for n in ("a.mp4", "b.mp4")])
        v_ref = raw.encode_video(vids)
        t_ref = raw.encode_text(tokenizer_for("vip-tiny", raw.context_length)(texts))
    v = m.encode_video([vdir / "a.mp4", str(vdir / "b.mp4")])
    t = m.encode_text(texts)
    assert v.shape == (2, 64) and t.shape == (3, 64)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, t_ref, atol=1e-5, rtol=1e-5)
    s = m.similarity([vdir / "a.mp4", vdir / "b.mp4"], texts)
    assert s.shape == (3, 2)
    torch.testing.assert_close(s, t_ref @ v_ref.T, atol=1e-5, rtol=1e-5)
    # tensors: [T, 3, H, W] and [B, T, 3, H, W] pass straight through
    torch.testing.assert_close(m.encode_video(vids[0]), v_ref[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.encode_video(vids), v_ref, atol=1e-5, rtol=1e-5)


def test_uint8_array_input(exported):
    from shards.reader import normalise
    from vip.inference import encode_video, load
    m = load(exported, num_frames=4)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)     # already model size: no resize
    ref = m.model.encode_video(normalise(arr[[0, 2, 4, 6]])[None])
    torch.testing.assert_close(m.encode_video(arr), ref, atol=1e-5, rtol=1e-5)
    big = rng.integers(0, 255, (5, 96, 80, 3), dtype=np.uint8)     # resized to 64²
    assert m.encode_video(big).shape == (1, 64)
    assert encode_video(m, arr, num_frames=4).shape == (1, 64)
    with pytest.raises(ValueError):
        m.encode_video(arr.astype(np.float32))


def test_embed_folder_and_shards(exported, vdir, shard_dir, tmp_path):
    import pyarrow.parquet as pq
    from vip.cli import main
    out = tmp_path / "emb.parquet"
    assert main(["embed", f"eval.model={exported}", f"eval.videos={vdir}", f"eval.out={out}",
                 "eval.num_frames=2", "eval.device=cpu"]) == 0
    tab = pq.read_table(out)
    assert tab.column("key").to_pylist() == ["a.mp4", "b.mp4"]           # broken.mp4 skipped
    emb = np.array(tab.column("embedding").to_pylist(), np.float32)
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    out2 = tmp_path / "shards.parquet"
    assert main(["embed", f"eval.model={exported}", f"eval.shards={shard_dir}", f"eval.out={out2}",
                 "eval.num_frames=2", "eval.batch_size=5", "eval.device=cpu"]) == 0
    tab2 = pq.read_table(out2)
    assert tab2.num_rows == 12 and len(set(tab2.column("key").to_pylist())) == 12
    # a missing input names the override to set; an old flag is refused
    assert main(["embed", f"eval.model={exported}", f"eval.out={out2}"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["embed", "--model", str(exported), f"eval.videos={vdir}"])
    assert e.value.code == 2


def test_embed_folder_matches_wrapper(exported, vdir):
    """embed_folder goes through the eval encode loop: same features as the wrapper, failures by name."""
    from vip.inference import embed_folder, load
    m = load(exported, num_frames=4)
    keys, emb, failed = embed_folder(m, vdir, batch_size=1, progress=False)
    assert keys == ["a.mp4", "b.mp4"] and failed == {"broken.mp4": "decode_error"}
    ref = m.encode_video([vdir / "a.mp4", vdir / "b.mp4"]).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=1e-5)


def test_wrapper_is_drop_in_for_clipvip(exported):
    """What tests/test_convert.py asks of vip.load(): holds if vip.load returns the wrapper."""
    from vip.inference import load
    from vip.model.convert import load as load_model
    raw, m = load_model(exported), load(exported)
    m2 = load(exported / "model.safetensors")
    assert not m.training and not m2.training
    sd, sd2 = raw.state_dict(), m.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    video, ids = torch.randn(1, 6, 3, 64, 64), torch.randint(1, 1000, (2, 32))
    with torch.no_grad():
        assert torch.equal(raw.encode_video(video), m.encode_video(video))
        assert torch.equal(raw.encode_text(ids), m.encode_text(ids))
    assert m.embed_dim == 64 and m.visual is m.model.visual


def test_decode_errors_name_the_file(exported, vdir, tmp_path):
    """encode_video on files: every error names the path it is about (not PyAV's '<none>')."""
    from vip.inference import load
    m = load(exported, num_frames=4)
    with pytest.raises(ValueError, match="decode_error") as e:
        m.encode_video([vdir / "a.mp4", vdir / "broken.mp4"])
    assert str(vdir / "broken.mp4") in str(e.value)
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        m.encode_video([tmp_path / "nothere.mp4"])


def test_empty_inputs_and_missing_paths(exported, vdir, tmp_path, monkeypatch):
    """vip.load of a missing path names that path; no videos → [0, D]; an empty path is named as such."""
    import vip
    missing = tmp_path / "missing_dir"
    with pytest.raises(FileNotFoundError) as e:
        vip.load(missing)
    assert str(missing) in str(e.value) and str(tmp_path / "config.json") not in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'missing_dir'"):
        vip.load("missing_dir")
    m = vip.load(exported, num_frames=4)
    for empty in ([], ()):
        v = m.encode_video(empty)
        assert v.shape == (0, 64) and v.dtype == torch.float32
    assert m.encode_text([]).shape == (0, 64)
    assert m.similarity([], ["a red square", "a dog"]).shape == (2, 0)
    with pytest.raises(ValueError, match="video 0 of 1 is an empty path"):
        m.encode_video([""])
    with pytest.raises(ValueError, match="video 1 of 2 is an empty path"):
        m.encode_video([vdir / "a.mp4", ""])
    with pytest.raises(ValueError, match="empty path"):
        m.encode_video("")
