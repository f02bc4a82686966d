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
    from shards.reader import StreamLoader, audio_frames
    cfg = small_data(audio_shards, audio=True, audio_seconds=1.5)
    F = audio_frames(cfg)
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
