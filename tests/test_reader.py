import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from shards.captions import read_sidecar, sidecar_path, write_sidecar
from shards.plan import Position, RankPlan
from shards.reader import CLIP_MEAN, CLIP_STD, StreamLoader, load_shardset
from shards.synth import render_frame, truth_plan
from shards.tarindex import TarReader
from shards.video import decode_all_reference, decode_frames, sample_indices


def _keys(loader, n=None):
    out = []
    if n == 0:
        return out
    for b in loader:
        out.append(list(b["key"]))
        if n is not None and len(out) == n:
            break
    return out


def _flat(batches):
    return [k for b in batches for k in b]


def test_eval_epoch_reads_every_clip_once(shard_dir, small_data):
    loader = StreamLoader(small_data(shard_dir, train=False))
    keys = _flat(_keys(loader))
    manifest = {r["key"] for r in __import__("pyarrow.parquet").parquet.read_table(shard_dir / "manifest.parquet").to_pylist()}
    assert len(keys) == 12 and set(keys) == manifest
    # evaluation order is the shard order, deterministic
    assert keys == _flat(_keys(StreamLoader(small_data(shard_dir, train=False))))


def test_train_epochs_are_permutations(shard_dir, small_data):
    loader = StreamLoader(small_data(shard_dir, train=True, batch_size=3))
    keys = _flat(_keys(loader, n=8))   # 24 samples = 2 epochs
    e0, e1 = keys[:12], keys[12:]
    assert sorted(e0) == sorted(e1) and len(set(e0)) == 12
    assert e0 != e1                    # reshuffled each epoch
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["offset"] == 0


def _unnormalise(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).clamp(0, 255).movedim(-3, -1).numpy()


def test_frames_match_the_source(shard_dir, small_data, corpus):
    """Decoded, sampled, resized frames equal the synthetic renderer's frames at the right times."""
    from PIL import Image
    truth = {t["clip_id"]: t for t in map(json.loads, open(corpus / "truth.jsonl"))}
    cfg = small_data(shard_dir, train=False, num_frames=4, image_size=64)
    loader = StreamLoader(cfg)
    reader = {}
    checked = 0
    for batch in loader:
        for b, key in enumerate(batch["key"]):
            sid = next(n for n in loader.shards.names if key in reader.setdefault(n, TarReader(str(shard_dir / n))).index.members)
            meta = json.loads(reader[sid].read(key, "json"))
            plan = truth_plan(truth[meta["clip_id"]])
            idx = sample_indices(meta["num_frames"], 4, train=False)
            got = _unnormalise(batch["video"][b])
            def render(i):
                t = plan.start + i / meta["fps"]
                t = np.floor(t * 30 + 1e-6) / 30          # the source frame shown at that time
                img = Image.fromarray(render_frame(plan, t, 192, 108)).resize((64, 64), Image.BILINEAR)
                return np.asarray(img).astype(float)
            # root-mean-square error: codec noise is small everywhere, a misplaced shape is large locally
            right = np.mean([np.sqrt(((got[j] - render(i)) ** 2).mean()) for j, i in enumerate(idx)])
            wrong = np.mean([np.sqrt(((got[j] - render(i)) ** 2).mean()) for j, i in enumerate(idx[::-1])])
            assert right < 8, (key, right)
            assert wrong > 2 * right, (key, right, wrong)       # the comparison can tell order apart
            mid = _unnormalise(batch["frame"][b])
            assert np.abs(mid - render(meta["num_frames"] // 2)).mean() < 10
            checked += 1
    assert checked == 12


def test_decode_frames_equals_full_decode(shard_dir):
    r = TarReader(str(shard_dir / "shard-000002.tar"))
    key = r.index.keys[0]
    mp4 = r.read(key, "mp4")
    full = decode_all_reference(mp4)          # [H, W, 3] at stored size (114 x 64)
    h, w = full[0].shape[:2]
    rng = np.random.default_rng(0)
    for trial in range(12):
        idx = rng.integers(0, len(full), size=rng.integers(1, 7))
        for gop in (None, 4):
            got = decode_frames(mp4, idx, size=64, resize="crop", fps=8.0, keyframe_interval=gop)
            left = (w - 64) // 2
            ref = np.stack([full[i][:, left:left + 64] for i in idx])
            assert np.array_equal(got, ref), (idx, gop)


def test_sample_indices():
    rng = np.random.default_rng(0)
    for n in (12, 13, 50, 97):
        edges = np.linspace(0, n, 13).astype(int)
        firsts, lasts = set(), set()
        for _ in range(200):
            idx = sample_indices(n, 12, True, rng)
            assert len(idx) == 12 and np.all(np.diff(idx) >= 0) and idx.max() < n
            assert edges[0] <= idx[0] < edges[1] and edges[11] <= idx[-1] < n
            gaps = np.diff(idx)
            assert gaps.max() - gaps.min() <= 1                       # evenly spread
            firsts.add(int(idx[0]))
            lasts.add(int(idx[-1]))
        assert firsts == set(range(edges[0], edges[1]))                # every start in the first interval
        assert lasts == set(range(edges[11], n))                       # every end in the last interval
        ev = sample_indices(n, 12, False)
        assert np.all((ev >= edges[:-1]) & (ev < edges[1:]))          # one per interval
        assert list(ev) == [(a + b - 1) // 2 for a, b in zip(edges[:-1], edges[1:])]
    assert list(sample_indices(3, 6, False)) == [0, 0, 1, 1, 2, 2]     # short clips repeat frames


def test_rank_split_uneven(shard_dir, small_data):
    """4 ranks over 6 shards of unequal assignment: union = all clips, pairwise disjoint."""
    shards = load_shardset(shard_dir)
    for train in (False, True):
        per_rank = []
        for rank in range(4):
            plan = RankPlan(shards, rank, 4, seed=5, shuffle=train, shuffle_shards=2)
            per_rank.append({(s, i) for _, s, i in plan.take(Position(0, 0), 100, single_epoch=True)})
        assert sum(len(p) for p in per_rank) == 12
        assert set().union(*per_rank) == {(s, i) for s in range(6) for i in range(2)}
    # and through the real loader with 2 workers per rank
    seen = []
    for rank in range(4):
        seen += _flat(_keys(StreamLoader(small_data(shard_dir, train=False, num_workers=2), rank=rank, world=4)))
    assert len(seen) == 12 and len(set(seen)) == 12


def test_too_few_shards_for_ranks(shard_dir, small_data):
    with pytest.raises(ValueError, match="shards for 7 ranks"):
        StreamLoader(small_data(shard_dir), rank=0, world=7).dataset()


@pytest.mark.slow
def test_resume_is_exact_2_ranks_2_workers(shard_dir, small_data):
    """Interrupt at several points; the concatenated key sequence equals the uninterrupted one."""
    cfg = small_data(shard_dir, train=True, batch_size=2, num_workers=2)
    total = 9   # 18 samples per rank = 3 epochs of that rank's 6 clips
    for rank in range(2):
        full = StreamLoader(cfg, rank=rank, world=2)
        ref_batches = []
        for i, b in enumerate(full):
            ref_batches.append(b)
            if i + 1 == total:
                break
        ref = [list(b["key"]) for b in ref_batches]
        for cut in (1, 4, 7):
            first = StreamLoader(cfg, rank=rank, world=2)
            got = _keys(first, n=cut)
            state = json.loads(json.dumps(first.state_dict()))       # survives a checkpoint round trip
            second = StreamLoader(cfg, rank=rank, world=2)
            second.load_state_dict(state)
            rest = []
            for i, b in enumerate(second):
                if i == 0:   # frame jitter and decoding are reproduced exactly too
                    assert torch.equal(b["video"], ref_batches[cut]["video"])
                rest.append(list(b["key"]))
                if cut + i + 1 == total:
                    break
            assert got + rest == ref, (rank, cut)


def test_resume_independent_of_worker_count(shard_dir, small_data):
    base = small_data(shard_dir, train=True, batch_size=2)
    ref = _keys(StreamLoader(dataclasses.replace(base, num_workers=0)), n=7)
    assert _keys(StreamLoader(dataclasses.replace(base, num_workers=2)), n=7) == ref
    first = StreamLoader(dataclasses.replace(base, num_workers=2))
    head = _keys(first, n=3)
    second = StreamLoader(dataclasses.replace(base, num_workers=0))
    second.load_state_dict(first.state_dict())
    assert head + _keys(second, n=4) == ref


def test_resume_does_not_reread_consumed_samples(shard_dir, small_data, monkeypatch):
    """Resuming deep into the stream reads only the samples it then yields."""
    cfg = small_data(shard_dir, train=True, batch_size=2, num_workers=0)
    ref = _flat(_keys(StreamLoader(cfg), n=20))           # 40 samples: into the 4th epoch
    reads = []
    real = TarReader.read

    def counting(self, key, ext):
        reads.append(key)
        return real(self, key, ext)
    monkeypatch.setattr(TarReader, "read", counting)
    loader = StreamLoader(cfg)
    loader.load_state_dict({"epoch": 3, "offset": 2, "seed": cfg.seed, "world": 1, "rank": 0, "batches": 19})
    got = _flat(_keys(loader, n=1))
    assert got == ref[38:40]
    assert set(reads) == set(got) and len(reads) == 3 * len(got)  # json + mp4 + jpg of those two only


def test_state_mismatch_is_refused(shard_dir, small_data):
    loader = StreamLoader(small_data(shard_dir), rank=0, world=2)
    state = loader.state_dict()
    other = StreamLoader(small_data(shard_dir), rank=0, world=3)
    with pytest.raises(ValueError, match="world"):
        other.load_state_dict(state)


def test_caption_sidecar_join(shard_dir, small_data, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    r = TarReader(str(out / "shard-000000.tar"))
    k0, k1 = r.index.keys
    write_sidecar(sidecar_path(out / "captions", "shard-000000.tar"),
                  [{"key": k0, "caption": "a photo of a red circle"}, {"key": k1, "caption": None, "error": "boom"}],
                  model="coca_ViT-B-32", model_tag="test", generation={"seq_len": 8})
    assert read_sidecar(out / "captions" / "shard-000000.parquet") == {k0: "a photo of a red circle"}
    cfg = small_data(out, train=False, batch_size=12)
    batch = next(iter(StreamLoader(cfg)))
    import open_clip
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    for i, key in enumerate(batch["key"]):
        if key == k0:
            assert batch["has_caption"][i]
            assert torch.equal(batch["caption"][i], tok(["a photo of a red circle"])[0])
        else:
            assert not batch["has_caption"][i] and batch["caption"][i].abs().sum() == 0
    assert int(batch["has_caption"].sum()) == 1
    assert batch["subtitle"].shape == (12, 32) and batch["video"].shape == (12, 4, 3, 32, 32)
    assert batch["frame"].shape == (12, 3, 32, 32) and batch["video"].dtype == torch.float32


def test_shards_are_plain_webdataset(shard_dir):
    """Any webdataset user can read the shards (keys and members as docs/data_format.md describes)."""
    import webdataset as wds
    ds = wds.WebDataset(str(shard_dir / "shard-000000.tar"), shardshuffle=False)
    samples = list(ds)
    assert len(samples) == 2
    for s in samples:
        assert {"__key__", "mp4", "jpg", "json"} <= set(s)
        assert json.loads(s["json"])["key"] == s["__key__"]


def test_normalise_matches_formula_and_workers_give_identical_batches(shard_dir, small_data):
    from shards.reader import normalise
    x = np.random.default_rng(0).integers(0, 256, size=(2, 3, 5, 7, 3), dtype=np.uint8)
    ref = (torch.from_numpy(x).float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    got = normalise(x)
    assert got.shape == (2, 3, 3, 5, 7) and got.is_contiguous()
    assert torch.allclose(got, ref.movedim(-1, -3), atol=1e-6)
    cfg = small_data(shard_dir, train=True, batch_size=3)
    it0 = iter(StreamLoader(dataclasses.replace(cfg, num_workers=0)))
    it2 = iter(StreamLoader(dataclasses.replace(cfg, num_workers=2)))
    for _ in range(4):   # shared-memory batches from workers equal in-process ones, bit for bit
        b0, b2 = next(it0), next(it2)
        assert b0["key"] == b2["key"]
        for k in ("video", "frame", "subtitle", "caption", "has_caption"):
            assert torch.equal(b0[k], b2[k]), k


def test_workers_send_uint8_pixels_and_the_loader_normalises_them_exactly(shard_dir, small_data):
    """The worker stream carries raw uint8 channels-last pixels; the loader's batches are those
    pixels CLIP-normalised (bit-identical to the per-sample `normalise`), in any requested dtype."""
    from shards.reader import normalise, normalise_pixels
    cfg = small_data(shard_dir, train=True, batch_size=3)
    loader = StreamLoader(cfg)
    raw = next(iter(loader.dataset()))                               # what a DataLoader worker yields
    assert raw["video"].dtype == torch.uint8 and raw["video"].shape == (3, 4, 32, 32, 3)
    assert raw["frame"].dtype == torch.uint8 and raw["frame"].shape == (3, 32, 32, 3)
    got = next(iter(loader))
    assert got["key"] == raw["key"]
    assert torch.equal(got["video"], normalise(raw["video"].numpy()))
    assert torch.equal(got["frame"], normalise(raw["frame"].numpy()))
    assert got["video"].is_contiguous() and got["video"].shape == (3, 4, 3, 32, 32)
    # another dtype: the float32 values, rounded once
    bf = next(iter(StreamLoader(cfg, dtype=torch.bfloat16)))
    assert bf["video"].dtype == torch.bfloat16 and torch.equal(bf["video"], got["video"].bfloat16())
    assert torch.equal(bf["subtitle"], got["subtitle"])                 # token ids are untouched
    # a channels-last source stays correct whatever its strides (e.g. a sliced batch)
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8))
    assert torch.equal(normalise_pixels(x[::2]), normalise(x[::2].numpy()))


def test_crop_of_square_shards_is_refused_at_open(shard_dir, small_data, monkeypatch):
    """data.resize=crop on shards built square (their build_config.yaml says aspect: square): a
    ValueError when the loader is opened, naming the folder and both settings, before any sample
    (or even a tar index) is read."""
    import shards.reader as reader
    import shards.shardset as shardset
    touched = []
    monkeypatch.setattr(TarReader, "read", lambda self, key, ext: touched.append(key))
    monkeypatch.setattr(shardset, "open_index", lambda path, *a: touched.append(path))
    with pytest.raises(ValueError) as e:
        StreamLoader(small_data(shard_dir, resize="crop", train=False))
    msg = str(e.value)
    for words in (str(shard_dir), "build.aspect=square", "data.resize=crop", "data.resize=squash"):
        assert words in msg, (words, msg)
    assert touched == []
    assert reader.stored_aspect(shard_dir) == "square"
    StreamLoader(small_data(shard_dir, train=False))                 # squash opens fine


def test_shards_without_a_build_record_are_not_checked_at_open(shard_dir, small_data, tmp_path):
    """Shard sets built before build_config.yaml existed open with crop (nothing to check against);
    their square clips are then refused per sample, from each clip's json."""
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out, ignore=shutil.ignore_patterns("build_config.yaml"))
    from shards.reader import stored_aspect
    assert stored_aspect(out) is None
    loader = StreamLoader(small_data(out, resize="crop", train=False))
    with pytest.raises(ValueError, match="resize=crop"):
        next(iter(loader))


def test_count_sidecars(shard_dir, tmp_path):
    """count_sidecars: how many shards of the set have a caption sidecar (what a caption loss
    needs); default folder <shards>/captions, or any captions folder; strays are not counted."""
    from shards.captions import count_sidecars
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out, ignore=shutil.ignore_patterns("captions"))
    assert count_sidecars(out) == 0                                   # never captioned
    names = load_shardset(out).names
    for name in names[:2]:
        keys = TarReader(str(out / name)).index.keys
        write_sidecar(sidecar_path(out / "captions", name), [{"key": k, "caption": "a red circle"} for k in keys],
                      model="test")
    write_sidecar(out / "captions" / "shard-999999.parquet", [{"key": "x", "caption": "stray"}], model="test")
    (out / "captions" / "notes.txt").write_text("not a sidecar")
    assert count_sidecars(out) == 2 and count_sidecars(str(out), None) == 2
    elsewhere = tmp_path / "caps"
    write_sidecar(sidecar_path(elsewhere, names[5]), [{"key": "k", "caption": "c"}], model="test")
    assert count_sidecars(out, elsewhere) == 1 and count_sidecars(out, tmp_path / "none") == 0
    (out / "shards.json").unlink()                                   # a set indexed from its tars
    assert count_sidecars(out) == 2
    assert count_sidecars(tmp_path / "no_shards_here") == 0


def _three_shards_one_empty(shard_dir, root):
    """shard-000000 and shard-000002 copied from shard_dir (2 clips each), shard-000001 an empty tar
    listed with 0 samples in shards.json: what a build leaves when every clip of a shard was skipped."""
    import tarfile
    root.mkdir()
    for name in ("shard-000000.tar", "shard-000002.tar"):
        shutil.copy(shard_dir / name, root / name)
    with tarfile.open(root / "shard-000001.tar", "w", format=tarfile.USTAR_FORMAT):
        pass
    shards = [{"name": f"shard-{i:06d}.tar", "num_samples": n, "bytes": (root / f"shard-{i:06d}.tar").stat().st_size}
              for i, n in enumerate((2, 0, 2))]
    (root / "shards.json").write_text(json.dumps({"num_samples": 4, "shards": shards}))
    shutil.copy(shard_dir / "build_config.yaml", root / "build_config.yaml")
    return root


def test_empty_shards_are_dropped_and_never_crash_a_rank(shard_dir, small_data, tmp_path, caplog):
    """3 shards, one with 0 samples: 3 ranks are refused when the loader is made (a config problem, named
    with the counts) rather than rank r dying mid-training; 2 ranks read every epoch without error."""
    root = _three_shards_one_empty(shard_dir, tmp_path / "shards")
    with caplog.at_level("WARNING", logger="shards.reader"):
        shards = load_shardset(root)
    assert shards.names == ("shard-000000.tar", "shard-000002.tar") and shards.counts == (2, 2)
    assert shards.empty == ("shard-000001.tar",)
    assert any("1 of 3 shards have no samples" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"2 shards for 3 ranks .*1 empty shards, dropped"):
        StreamLoader(small_data(root, train=True), rank=0, world=3)
    # a plan is never made over 0-sample shards
    from shards.plan import ShardSet
    with pytest.raises(ValueError, match="no samples"):
        RankPlan(ShardSet(str(root), ("a", "b", "c"), (2, 0, 2)), 0, 2, seed=0, shuffle=True, shuffle_shards=2)
    # 2 ranks: every rank has samples in every epoch (4 epochs of 2 clips each), none lost or repeated
    streams = [_flat(_keys(StreamLoader(small_data(root, train=True, batch_size=2), rank=r, world=2), n=4))
               for r in range(2)]
    for e in range(4):                 # each epoch the 2 ranks together read the 4 clips once
        epoch = streams[0][2 * e:2 * e + 2] + streams[1][2 * e:2 * e + 2]
        assert len(set(epoch)) == 4, (e, streams)
    seen = [k for rank in range(2) for k in _flat(_keys(StreamLoader(small_data(root, train=False), rank=rank, world=2)))]
    assert len(seen) == 4 and len(set(seen)) == 4
    # the resume state counts the planned (non-empty) shards; a state that counted the empty one is refused, saying why
    loader = StreamLoader(small_data(root, train=True), rank=0, world=2)
    state = loader.state_dict()
    assert state["num_shards"] == 2
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match="empty shards"):
        loader.load_state_dict({**state, "num_shards": 3})


def test_missing_shards_json_warns_once(shard_dir, small_data, tmp_path, caplog):
    """Without shards.json the reader indexes the tars (same counts), and says so once, with the count and why."""
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out, ignore=shutil.ignore_patterns("shards.json"))
    with caplog.at_level("WARNING", logger="shards.reader"):
        indexed = load_shardset(out)
        load_shardset(out)
        StreamLoader(small_data(out, train=False))
    warned = [r.getMessage() for r in caplog.records if "shards.json" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "indexing 6 tars" in warned[0] and "incomplete" in warned[0] and "not written by vip shards build" in warned[0]
    assert indexed.counts == load_shardset(shard_dir).counts and indexed.names == load_shardset(shard_dir).names
    caplog.clear()
    with caplog.at_level("WARNING", logger="shards.reader"):
        load_shardset(shard_dir)                                         # shards.json present: silent
    assert not caplog.records
