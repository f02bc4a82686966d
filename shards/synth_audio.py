"""Soundtracks for the synthetic corpus (`synth.audio=true`): information the frames do not show.

Each clip gets one of `SOUNDS` — a tone pattern (a low hum, fast beeping, a rising whistle, a
two-tone siren) plus background noise; gaps between clips hold the noise only. The clip's
subtitle names the sound ("… while a low hum plays"), so a text query can only be matched to
the right clip among clips that look alike by hearing it: text→(video+audio) can beat
text→video (bench/fusion.py). The sound of clip k of video v is drawn from its own generator
(seed, v, k), so corpora without audio are unchanged. Source soundtracks are AAC stereo at
44.1 kHz in the source mp4 (as web video); `vip shards build` resamples them (shards/audio.py).
"""
from __future__ import annotations

import numpy as np

SOUNDS = ("hum", "beeps", "whistle", "siren")
PHRASES = {"hum": "while a low hum plays", "beeps": "to fast beeping", "whistle": "with a rising whistle",
           "siren": "as a two-tone siren sounds"}
SOURCE_RATE = 44100
NOISE = 0.02                       # background noise σ (full scale 1)


def plan_sounds(seed: int, video: int, n: int) -> list[str]:
    """The sound of each of a video's n clips (independent of the video plan's random draws)."""
    return [SOUNDS[int(np.random.default_rng([seed, 17, video, k]).integers(len(SOUNDS)))] for k in range(n)]


def with_sound(text: str, sound: str) -> str:
    """A clip's text with its sound named."""
    return f"{text} {PHRASES[sound]}"


def tone(sound: str, t: np.ndarray) -> np.ndarray:
    """The tone pattern of `sound` at times t (seconds from the clip start), amplitude ≤ 0.4."""
    if sound == "hum":                              # 110 Hz with two harmonics, steady
        return sum(a * np.sin(2 * np.pi * f * t) for a, f in ((0.25, 110), (0.1, 220), (0.05, 330)))
    if sound == "beeps":                            # 1 kHz, 8 beeps a second
        return 0.35 * np.sin(2 * np.pi * 1000 * t) * ((t * 8) % 1 < 0.5)
    if sound == "whistle":                          # 600 → 2400 Hz sweep every second
        u = t % 1.0
        return 0.3 * np.sin(2 * np.pi * (600 * u + 900 * u * u) + 2 * np.pi * 600 * np.floor(t))
    if sound == "siren":                            # 700 / 1100 Hz alternating every 0.25 s
        f = np.where((t * 4) % 2 < 1, 700.0, 1100.0)
        return 0.3 * np.sin(2 * np.pi * np.cumsum(f) / SOURCE_RATE)
    raise ValueError(f"unknown sound {sound!r}; one of {SOUNDS}")


def soundtrack(clips, duration: float, seed: int, rate: int = SOURCE_RATE) -> np.ndarray:
    """float32 [2, n] stereo: noise everywhere, each clip's tone over its span (clips: objects with
    start, end, sound)."""
    n = int(round(duration * rate))
    rng = np.random.default_rng([seed, 23])
    wave = rng.normal(0, NOISE, (2, n)).astype(np.float32)
    for c in clips:
        a, b = int(round(c.start * rate)), min(n, int(round(c.end * rate)))
        s = tone(c.sound, np.arange(b - a) / rate).astype(np.float32)
        wave[0, a:b] += s
        wave[1, a:b] += 0.8 * s
    return wave


def add_audio_stream(container, rate: int = SOURCE_RATE, bitrate: int = 96000):
    """An AAC stereo stream on an output container (before anything is muxed)."""
    s = container.add_stream("aac", rate=rate)
    s.layout, s.bit_rate = "stereo", bitrate
    return s


def write_audio(container, s, wave: np.ndarray, rate: int = SOURCE_RATE) -> None:
    """Encode float32 [2, n] into the stream `s` of `container` and mux it."""
    import av
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.clip(wave, -1, 1)), format="fltp", layout="stereo")
    frame.sample_rate, frame.pts = rate, 0
    for p in s.encode(frame):
        container.mux(p)
    for p in s.encode():
        container.mux(p)
