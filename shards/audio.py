"""Clip audio: cut from the source, store compactly, decode to a log-mel spectrogram.

Stored format (docs/data_format.md, "Audio"): the clip's span of the source's first audio
stream, downmixed to mono and resampled to `build.audio_rate` (16 kHz) by libswresample, encoded
AAC-LC at `build.audio_bitrate` (48 kbit/s) in an MP4 (`<key>.m4a`). AAC in MP4 keeps sample
alignment (the encoder delay is recorded in the edit list and removed on decode) and decodes at
~0.2 ms per second of audio on one core; 48 kbit/s is ~1/3 of the stored video's bitrate.

A clip whose source has no usable audio is written without it and the reason is counted
(`AudioMissing.reason`): no_audio_stream, audio_decode_error, audio_outside_span (the
soundtrack ends before the span starts), audio_silent (peak below −60 dBFS). A soundtrack that
ends inside the span is kept as it is (`audio_short`, counted; the reader pads it and masks the
padding). The reader turns stored audio into a log-mel spectrogram (`log_mel`, a Slaney mel
filterbank on a Hann-window STFT, as librosa's defaults) and cuts or pads it to a fixed
number of frames with a frame mask (`fit_frames`).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np

SILENT_PEAK = 1e-3                 # −60 dBFS: a soundtrack whose peak stays below is silent


class AudioMissing(Exception):
    """No audio for a clip; `reason` is the counted reason (the clip is still written)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class ClipAudio:
    m4a: bytes
    rate: int
    num_samples: int
    short: bool                    # the soundtrack ended inside the span


def _mono(frames, rate: int, fast: bool = True) -> np.ndarray:
    """Decoded audio frames (any layout, rate, sample format) → float32 mono [n] at `rate`.
    Frames already float mono at `rate` (stored clips) are copied as they are (fast: the same
    samples as libswresample gives, at half the decode cost); anything else is resampled."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    out = []
    for f in frames:
        if fast and f.sample_rate == rate and f.layout.nb_channels == 1 and f.format.name in ("flt", "fltp"):
            out.append(f.to_ndarray().reshape(-1))
            continue
        fast = False   # one path per stream: from the first frame that needs resampling on, resample
        f.pts = None               # timestamps are tracked by the caller; the resampler just streams
        out += [r.to_ndarray().reshape(-1) for r in resampler.resample(f)]
    out += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def read_span(path: str, start: float, end: float, rate: int) -> np.ndarray:
    """Source audio of [start, end) seconds (from the stream start) → float32 mono [≤ (end-start)·rate]
    at `rate`; raises AudioMissing(no_audio_stream | audio_decode_error | audio_outside_span)."""
    try:
        container = av.open(path, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise AudioMissing("audio_decode_error", f"{path}: {e}") from None
    with container:
        if not container.streams.audio:
            raise AudioMissing("no_audio_stream", path)
        stream = container.streams.audio[0]
        tb = stream.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        if stream.duration:   # the stream's real length: the codec's last-frame padding is not audio
            end = min(end, float(stream.duration * tb))
        frames, first = [], None
        try:
            if start > 0:
                container.seek(int((start + t0) / tb), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = (float(frame.pts * tb) - t0) if frame.pts is not None else None
                if first is None:
                    first = t if t is not None else 0.0
                if t is not None and t >= end:
                    break
                if t is not None and t + frame.samples / frame.sample_rate <= start:
                    first = None   # wholly before the span: the next frame starts the kept audio
                    continue
                frames.append(frame)
        except (av.error.FFmpegError, ValueError) as e:
            raise AudioMissing("audio_decode_error", f"{path}: {type(e).__name__}: {e}") from None
        if not frames or end <= start:
            raise AudioMissing("audio_outside_span", f"no audio in [{start:.3f}, {end:.3f})")
        try:
            wave = _mono(frames, rate)
        except (av.error.FFmpegError, ValueError) as e:
            raise AudioMissing("audio_decode_error", f"{path}: resample: {e}") from None
    lo = max(0, int(round((start - first) * rate)))
    wave = wave[lo:lo + int(round((end - start) * rate))]
    if not len(wave):
        raise AudioMissing("audio_outside_span", f"no audio in [{start:.3f}, {end:.3f})")
    return wave


def encode_m4a(wave: np.ndarray, rate: int, bitrate: int) -> bytes:
    """float32 mono [n] → AAC-LC in MP4 bytes."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        s = out.add_stream("aac", rate=rate)
        s.layout, s.bit_rate = "mono", bitrate
        frame = av.AudioFrame.from_ndarray(np.clip(wave, -1, 1).astype(np.float32)[None], format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for p in s.encode(frame):
            out.mux(p)
        for p in s.encode():
            out.mux(p)
    return buf.getvalue()


def cut_audio(path: str, start: float, end: float, rate: int = 16000, bitrate: int = 48000) -> ClipAudio:
    """The stored audio of a clip span, or AudioMissing with the reason it has none."""
    wave = read_span(path, start, end, rate)
    if float(np.abs(wave).max()) < SILENT_PEAK:
        raise AudioMissing("audio_silent", f"peak {float(np.abs(wave).max()):.2e}")
    short = len(wave) < int(round((end - start) * rate)) - rate // 100     # > 10 ms missing
    return ClipAudio(encode_m4a(wave, rate, bitrate), rate, len(wave), short)


def decode_audio(data: bytes, rate: int, num_samples: int | None = None, fast: bool = True) -> np.ndarray:
    """Stored audio (or any container PyAV reads) → float32 mono [n] at `rate`, cut to num_samples
    (the encoder's last-frame padding)."""
    with av.open(io.BytesIO(data), mode="r") as c:
        if not c.streams.audio:
            raise ValueError("no audio stream")
        stream = c.streams.audio[0]
        stream.codec_context.thread_count = 1
        wave = _mono(c.decode(stream), rate, fast)
    return wave[:num_samples] if num_samples is not None else wave


# --------------------------------------------------------------------------- log-mel
def hz_to_mel(f):
    """Slaney mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    logstep = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, lin)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3))


def mel_filterbank(rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft//2 + 1] triangular filters, Slaney-normalised (area 1 per filter)."""
    fmax = rate / 2 if fmax is None else fmax
    fft_hz = np.linspace(0, rate / 2, n_fft // 2 + 1)
    mel_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    w *= (2.0 / (mel_hz[2:n_mels + 2] - mel_hz[:n_mels]))[:, None]
    return w.astype(np.float32)


_FB: dict = {}


def log_mel(wave: np.ndarray, rate: int, n_fft: int = 512, win_length: int = 400, hop: int = 160,
            n_mels: int = 40, eps: float = 1e-6, start: int = 0, frames: int | None = None) -> np.ndarray:
    """float32 mono [n] → log(mel power + eps) float32 [n_mels, 1 + n // hop] (centred frames,
    zero padding; a Hann window of win_length centred in n_fft). start/frames: only frames
    [start, start + frames) of that, computed from their samples alone (the same values)."""
    import torch
    key = (rate, n_fft, n_mels)
    if key not in _FB:
        _FB[key] = torch.from_numpy(mel_filterbank(rate, n_fft, n_mels))
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if len(x) < 2:
        x = torch.nn.functional.pad(x, (0, 2 - len(x)))
    x = torch.nn.functional.pad(x[None, None], (n_fft // 2, n_fft // 2))[0, 0]   # centre, zero padding
    if frames is not None:                        # frame j reads padded samples [j·hop, j·hop + n_fft)
        x = x[start * hop:(start + frames - 1) * hop + n_fft]
    spec = torch.stft(x, n_fft, hop, win_length, torch.hann_window(win_length), center=False,
                      return_complex=True)                                          # [F, frames]
    mel = _FB[key] @ (spec.real ** 2 + spec.imag ** 2)                              # [n_mels, frames]
    return torch.log(mel + eps).numpy()


def mel_window(wave: np.ndarray, cfg, train: bool, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """fit_frames(log_mel(wave), window_frames(cfg), train, rng) with the `data.audio_*` settings of
    cfg, computing only the window's frames (the same draw, the same values)."""
    F = window_frames(cfg)
    n = 1 + max(len(wave), 2) // cfg.audio_hop
    args = (cfg.audio_rate, cfg.audio_n_fft, cfg.audio_window, cfg.audio_hop, cfg.audio_n_mels)
    if n <= F:
        return fit_frames(log_mel(wave, *args), F, train, rng)
    start = int(rng.integers(0, n - F + 1)) if train else (n - F) // 2
    return log_mel(wave, *args, start=start, frames=F), np.ones(F, bool)


def fit_frames(mel: np.ndarray, frames: int, train: bool, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """[n_mels, n] → ([n_mels, frames], mask bool [frames]): a window of `frames` (random start in
    training, centred in evaluation) or the whole spectrogram padded with zeros (mask False)."""
    n_mels, n = mel.shape
    out = np.zeros((n_mels, frames), np.float32)
    mask = np.zeros(frames, bool)
    if n > frames:
        start = int(rng.integers(0, n - frames + 1)) if train else (n - frames) // 2
        out[:] = mel[:, start:start + frames]
        mask[:] = True
    else:
        out[:, :n] = mel
        mask[:n] = True
    return out, mask


def window_frames(cfg) -> int:
    """STFT frames of the log-mel window a DataConfig asks for (data.audio_seconds at data.audio_hop)."""
    return max(1, int(round(cfg.audio_seconds * cfg.audio_rate / cfg.audio_hop)))


def empty_window(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The window of a clip without audio: zeros [n_mels, F], mask all False [F]."""
    F = window_frames(cfg)
    return np.zeros((cfg.audio_n_mels, F), np.float32), np.zeros(F, bool)


def stored_window(m4a: bytes, meta: dict, cfg, rng) -> tuple[np.ndarray, np.ndarray]:
    """A shard sample's m4a member → its log-mel window (the reader's audio stage; cfg a DataConfig)."""
    wave = decode_audio(m4a, cfg.audio_rate, (meta.get("audio") or {}).get("num_samples"))
    return mel_window(wave, cfg, cfg.train, rng)


def clip_log_mel(data: bytes, cfg, train: bool, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A clip file's soundtrack (any container) → (log-mel [n_mels, F], mask bool [F]) with the
    `data.audio_*` settings of cfg (a DataConfig); no usable audio → all padding (mask False)."""
    try:
        wave = decode_audio(data, cfg.audio_rate)
    except Exception:  # noqa: BLE001 - no audio stream, undecodable audio: the clip stays, without audio
        wave = np.zeros(0, np.float32)
    if len(wave) == 0 or float(np.abs(wave).max()) < SILENT_PEAK:
        return empty_window(cfg)
    return mel_window(wave, cfg, train, rng)
