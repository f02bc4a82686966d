"""Audio through the data pipeline: synthetic soundtracks, the shard build's m4a member, the reader's
log-mel stage (exact resume), and every bad-input case (counted, never a crash)."""
import dataclasses
import json

import av
import numpy as np
import pytest
import torch

from shards.audio import SILENT_PEAK, cut_audio, decode_audio, fit_frames, log_mel, mel_filterbank

SOUND_HZ = {"hum": 110.0, "beeps": 1000.0}


def _peak_hz(wave, rate):
    sp = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(sp)) * rate / len(wave)


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory, small_synth):
    from shards.synth import make_corpus
    out = tmp_path_factory.mktemp("synth_audio")
    make_corpus(dataclasses.replace(small_synth(out), audio=True))
    return out


@pytest.fixture(scope="module")
def audio_shards(audio_corpus, tmp_path_factory, small_build):
    from shards.build import build_shards
    out = tmp_path_factory.mktemp("shards_audio")
    summary = build_shards(small_build(audio_corpus, out))
    assert summary.clips_written == 12 and summary.audio["with_audio"] == 12, summary.table()
    return out


def _lines(path):
    return [json.loads(x) for x in open(path)]


# --------------------------------------------------------------------------- synth + build
def test_synth_audio_names_the_sound_and_keeps_the_video_plan(audio_corpus, corpus):
    from shards.synth_audio import PHRASES
    truth, plain = _lines(audio_corpus / "truth.jsonl"), _lines(corpus / "truth.jsonl")
    assert [{k: v for k, v in t.items() if k != "sound"} for t in truth] == plain   # same clips, same looks
    subs = {s["clip_id"]: s["text"] for s in _lines(audio_corpus / "subtitles.jsonl")}
    plain_subs = {s["clip_id"]: s["text"] for s in _lines(corpus / "subtitles.jsonl")}
    for t in truth:
        assert subs[t["clip_id"]] == f"{plain_subs[t['clip_id']]} {PHRASES[t['sound']]}"
    assert len({t["sound"] for t in truth}) > 1
    vid = next((audio_corpus / "videos").glob("*.mp4"))
    with av.open(str(vid)) as c:
        a = c.streams.audio[0]
        assert a.codec_context.sample_rate == 44100 and a.codec_context.channels == 2


def test_shards_carry_each_clips_audio_span(audio_corpus, audio_shards, small_data):
    import pyarrow.parquet as pq
    from shards.tarindex import TarReader
    truth = {t["clip_id"]: t for t in _lines(audio_corpus / "truth.jsonl")}
    man = pq.read_table(audio_shards / "manifest.parquet").to_pylist()
    assert all(r["has_audio"] for r in man)
    checked = 0
    for tar in sorted(audio_shards.glob("shard-*.tar")):
        r = TarReader(str(tar))
        for key in r.index.keys:
            meta = json.loads(r.read(key, "json"))
            assert meta["has_audio"] and meta["audio"]["rate"] == 16000 and meta["audio"]["channels"] == 1
            wave = decode_audio(r.read(key, "m4a"), 16000, meta["audio"]["num_samples"])
            assert len(wave) == meta["audio"]["num_samples"] == 32000       # 2 s clips at 16 kHz
            # the copy path for stored (16 kHz mono float) audio = the same samples as libswresample gives
            np.testing.assert_array_equal(wave, decode_audio(r.read(key, "m4a"), 16000, 32000, fast=False))
            sound = truth[meta["clip_id"]]["sound"]
            if sound in SOUND_HZ:   # the tone of this clip, not of a neighbour: the span is aligned
                assert abs(_peak_hz(wave, 16000) - SOUND_HZ[sound]) < 15, (sound, _peak_hz(wave, 16000))
                checked += 1
        r.close()
    assert checked > 0


# --------------------------------------------------------------------------- log-mel
def test_log_mel_matches_librosa():
    librosa = pytest.importorskip("librosa")
    fb = mel_filterbank(16000, 512, 40)
    np.testing.assert_allclose(fb, librosa.filters.mel(sr=16000, n_fft=512, n_mels=40), atol=1e-7)
    np.testing.assert_allclose(mel_filterbank(22050, 1024, 64, 50, 8000),
                               librosa.filters.mel(sr=22050, n_fft=1024, n_mels=64, fmin=50, fmax=8000), atol=1e-7)
    x = np.random.default_rng(0).normal(0, 0.1, 12345).astype(np.float32)
    ref = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=512, hop_length=160, win_length=400, n_mels=40,
                                         center=True, pad_mode="constant", power=2.0)
    np.testing.assert_allclose(log_mel(x, 16000), np.log(ref + 1e-6), atol=1e-4)


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0])
def test_mel_window_equals_the_window_of_the_whole_spectrogram(seconds):
    from shards.audio import mel_window
    from shards.config import DataConfig
    cfg = DataConfig(audio_seconds=seconds)
    wave = np.random.default_rng(1).normal(0, 0.1, 16000 + 77).astype(np.float32)
    for train in (False, True):
        ref = fit_frames(log_mel(wave, 16000), int(seconds * 100), train, np.random.default_rng(5))
        got = mel_window(wave, cfg, train, np.random.default_rng(5))
        np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
        assert (got[1] == ref[1]).all()


def test_fit_frames_windows_and_pads():
    mel = np.arange(3 * 10, dtype=np.float32).reshape(3, 10)
    out, mask = fit_frames(mel, 4, train=False)
    assert (out == mel[:, 3:7]).all() and mask.all()
    out, mask = fit_frames(mel, 4, train=True, rng=np.random.default_rng(0))
    start = int(out[0, 0])
    assert (out == mel[:, start:start + 4]).all()
    out, mask = fit_frames(mel, 13, train=True, rng=np.random.default_rng(0))
    assert (out[:, :10] == mel).all() and (out[:, 10:] == 0).all() and mask.tolist() == [True] * 10 + [False] * 3


# --------------------------------------------------------------------------- reader
def _collect(loader, n):
    out = []
    for b in loader:
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        if len(out) == n:
            break
    return out


def test_reader_delivers_log_mel_with_exact_resume(audio_shards, small_data):
    from shards.audio import window_frames
    from shards.reader import StreamLoader
    cfg = small_data(audio_shards, audio=True, audio_seconds=1.5)
    F = window_frames(cfg)
    assert F == 150
    full = _collect(StreamLoader(cfg), 5)
    b = full[0]
    assert b["audio"].shape == (3, 40, F) and b["audio"].dtype == torch.float32
    assert b["audio_mask"].all() and b["has_audio"].all()
    # the video is sampled exactly as without audio
    plain = _collect(StreamLoader(dataclasses.replace(cfg, audio=False)), 5)
    for x, y in zip(full, plain):
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"]) and "audio" not in y
    # resume after 2 batches: the same batches, audio included, with workers too
    first = StreamLoader(cfg)
    _collect(first, 2)
    state = first.state_dict()
    for workers in (0, 2):
        again = StreamLoader(dataclasses.replace(cfg, num_workers=workers))
        again.load_state_dict(state)
        for x, y in zip(_collect(again, 3), full[2:5]):
            assert x["key"] == y["key"]
            assert torch.equal(x["audio"], y["audio"]) and torch.equal(x["audio_mask"], y["audio_mask"])
            assert torch.equal(x["video"], y["video"])


def test_reader_without_audio_members_pads_and_counts_corrupt_audio(audio_shards, shard_dir, small_data, tmp_path):
    """Shards built from silent sources: all padding, has_audio False. A corrupt m4a member: the clip
    keeps its video, the event is counted."""
    from shards.reader import StreamLoader
    b = next(iter(StreamLoader(small_data(shard_dir, audio=True, audio_seconds=1.0))))
    assert not b["has_audio"].any() and not b["audio_mask"].any() and (b["audio"] == 0).all()
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(audio_shards, bad)
    tar = sorted(bad.glob("shard-*.tar"))[0]
    from shards.tarindex import TarReader
    r = TarReader(str(tar))
    off, size = r.index.members[r.index.keys[0]]["m4a"]
    r.close()
    data = bytearray(tar.read_bytes())
    data[off:off + size] = bytes(size)                         # zero the whole member
    tar.write_bytes(bytes(data))
    loader = StreamLoader(small_data(bad, audio=True, audio_seconds=1.0, train=False, batch_size=2))
    batches = list(loader)
    assert sum(len(x["key"]) for x in batches) == 12           # nothing lost
    assert loader.events["corrupt_audio"] == 1
    assert sum(int((~x["has_audio"]).sum()) for x in batches) == 1


# --------------------------------------------------------------------------- bad input
def _source(path, seconds=3.0, audio=None, video=True, corrupt=False):
    """A source file: 64×48 h264 at 10 fps (unless video=False) and, when `audio` = (rate, layout,
    wave fn(t) → [n] or None for silence, audio seconds), an AAC stream. corrupt: every other audio
    packet's payload replaced by noise."""
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w", format="mp4") as c:
        vs = None
        if video:
            vs = c.add_stream("libx264", rate=10)
            vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        if audio:
            rate, layout, fn, secs = audio
            s = c.add_stream("aac", rate=rate)
            s.layout = layout
        if video:
            for i in range(int(seconds * 10)):
                img = np.full((48, 64, 3), (i * 7) % 255, np.uint8)
                for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)
        if audio:
            n = int(secs * rate)
            t = np.arange(n) / rate
            mono = np.zeros(n, np.float32) if fn is None else fn(t).astype(np.float32)
            ch = av.AudioLayout(layout).nb_channels
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.tile(mono, (ch, 1))), format="fltp",
                                               layout=layout)
            frame.sample_rate, frame.pts = rate, 0
            for k, p in enumerate([*s.encode(frame), *s.encode()]):
                if corrupt and k % 2 == 1 and k > 2:
                    bad = av.Packet(rng.integers(0, 256, p.size, dtype=np.uint8).tobytes())
                    bad.pts, bad.dts, bad.time_base, bad.stream = p.pts, p.dts, p.time_base, s
                    p = bad
                c.mux(p)


def _tone(hz):
    return lambda t: 0.3 * np.sin(2 * np.pi * hz * t)


BAD_SOURCES = {   # video id → (_source kwargs, expected: "kept" | a written-without-audio reason | a skip reason)
    "noaudio": (dict(), "no_audio_stream"),
    "silent": (dict(audio=(44100, "stereo", None, 3.0)), "audio_silent"),
    "st48k": (dict(audio=(48000, "stereo", _tone(1000), 3.0)), "kept"),
    "six441": (dict(audio=(44100, "5.1", _tone(1000), 3.0)), "kept"),
    "mono8k": (dict(audio=(8000, "mono", _tone(500), 3.0)), "kept"),
    "st22k": (dict(audio=(22050, "stereo", _tone(1000), 3.0)), "kept"),
    "short": (dict(audio=(44100, "mono", _tone(1000), 1.5)), "audio_short"),
    "ended": (dict(audio=(44100, "mono", _tone(1000), 0.5)), "audio_outside_span"),
    "corrupt": (dict(audio=(44100, "stereo", _tone(1000), 3.0), corrupt=True), "audio_decode_error"),
    "audioonly": (dict(audio=(44100, "stereo", _tone(1000), 3.0), video=False), "no_video_stream"),
}


def test_bad_audio_sources_are_counted_never_crash(tmp_path, small_build):
    """Every clip spans [1, 2.5) s. Kept audio is 16 kHz mono with the source's tone."""
    import pyarrow.parquet as pq
    from shards.build import build_shards
    from shards.tarindex import TarReader
    src = tmp_path / "src"
    (src / "videos").mkdir(parents=True)
    meta, subs = [], []
    for vid, (kw, _) in BAD_SOURCES.items():
        _source(src / "videos" / f"{vid}.mp4", **kw)
        meta.append({"video_id": vid, "clip": [{"clip_id": f"{vid}.0.mp4", "span": ["00:00:01.000", "00:00:02.500"]}]})
        subs.append({"clip_id": f"{vid}.0.mp4", "text": f"clip {vid}"})
    (src / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    (src / "subtitles.jsonl").write_text("".join(json.dumps(s) + "\n" for s in subs))
    summary = build_shards(small_build(src, tmp_path / "out", clips_per_shard=20))
    assert summary.shards_failed == 0, summary.table()
    assert summary.clips_written == len(BAD_SOURCES) - 1                  # only the audio-only file is skipped
    assert summary.skips.counts == {"no_video_stream": 1}
    a = summary.audio
    assert a["no_audio_stream"] == 1 and a["audio_silent"] == 1 and a["audio_outside_span"] == 1
    assert a["audio_short"] == 1
    assert a["with_audio"] == 5 and a["audio_decode_error"] == 1          # 4 formats + short; the corrupt one
    assert "written without audio: audio_silent" in summary.table()
    rows = {r["video_id"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    r = TarReader(str(next((tmp_path / "out").glob("shard-*.tar"))))
    for key in r.index.keys:
        m = json.loads(r.read(key, "json"))
        vid, want = m["video_id"], BAD_SOURCES[m["video_id"]][1]
        assert rows[vid]["has_audio"] == m["has_audio"] == ("m4a" in r.index.members[key])
        if want in ("kept", "audio_short"):
            assert m["has_audio"] and m["audio"]["rate"] == 16000 and m["audio"]["channels"] == 1
            wave = decode_audio(r.read(key, "m4a"), 16000, m["audio"]["num_samples"])
            assert len(wave) == (8000 if want == "audio_short" else 24000), vid
            hz = 500 if vid == "mono8k" else 1000
            assert abs(_peak_hz(wave, 16000) - hz) < 15, (vid, _peak_hz(wave, 16000))
            assert m["audio"]["short"] == (want == "audio_short")
        else:
            assert not m["has_audio"] and m["audio_missing"] == want
    r.close()


def test_cut_audio_reasons_direct(tmp_path):
    _source(tmp_path / "quiet.mp4", audio=(16000, "mono", lambda t: SILENT_PEAK / 2 * np.sin(t * 3000), 3.0))
    from shards.audio import AudioMissing
    with pytest.raises(AudioMissing) as e:
        cut_audio(str(tmp_path / "quiet.mp4"), 0.0, 2.0)
    assert e.value.reason == "audio_silent"
    (tmp_path / "junk.mp4").write_bytes(b"not a container at all" * 10)
    with pytest.raises(AudioMissing) as e:
        cut_audio(str(tmp_path / "junk.mp4"), 0.0, 2.0)
    assert e.value.reason == "audio_decode_error"
