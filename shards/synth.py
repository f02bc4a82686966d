"""Synthetic HD-VILA-style corpus with real h264 video.

Each source video is a sequence of clips; in each clip one coloured shape moves
across a plain background in one direction, and the clip's subtitle names the
colour, the shape and the direction of motion ("a red circle moves to the
left"). Footage between clips (gaps) is a static background that no clip span
covers. Deterministic from the seed. Writes, under `out`:

    metadata.jsonl    {"video_id", "url", "clip": [{"clip_id", "span"}]}  (HD-VILA format)
    subtitles.jsonl   {"clip_id", "text"}    (synth.text: template | speech (ASR-like) | description)
    truth.jsonl       {"clip_id", "colour", "shape", "direction", "span_s", "background", "description", …}
                      (ground truth for tests and benchmarks; `truth_plan` rebuilds the renderer's plan)
    videos/<video_id>.mp4
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from shards.atomic import atomic_path, write_text
from shards.config import SynthConfig
from shards.texts import clip_text, description
from shards.synth_audio import with_sound

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TEMPLATES = (
    "a {c} {s} moves {d}",
    "so here you can see the {c} {s} going {d}",
    "watch the {c} {s} as it slides {d}",
    "the {c} {s} travels {d} across the screen",
)
_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
_DIR_WORDS = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}


def format_timestamp(seconds: float) -> str:
    """Seconds → 'HH:MM:SS.mmm' as in HD-VILA spans."""
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def describe(colour: str, shape: str, direction: str, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(c=colour, s=shape, d=_DIR_WORDS[direction])


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of the shape."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2) ** 2
    if shape == "square":
        m = size // 8
        return (xx >= m) & (xx < size - m) & (yy >= m) & (yy < size - m)
    if shape == "triangle":  # apex up
        return (yy >= size // 8) & (np.abs(xx - c) <= (yy - size / 8) * 0.6)
    raise ValueError(shape)


@dataclass(frozen=True)
class ClipPlan:
    clip_id: str
    start: float
    end: float
    colour: str
    shape: str
    direction: str
    background: tuple
    template: int
    texture: int = -1              # -1: flat background; else the seed of a natural-texture background
    sound: str = ""                # synth.audio: the clip's sound (shards/synth_audio.py); "" = none


def truth_plan(truth: dict) -> ClipPlan:
    """The renderer's plan of a clip from its truth.jsonl line (to re-render any frame)."""
    return ClipPlan(clip_id=truth["clip_id"], start=truth["span_s"][0], end=truth["span_s"][1],
                    colour=truth["colour"], shape=truth["shape"], direction=truth["direction"],
                    background=tuple(truth["background"]), template=truth["template"],
                    texture=int(truth.get("texture", -1)), sound=truth.get("sound", ""))


def plan_video(rng: np.random.Generator, video_id: str, cfg: SynthConfig) -> list[ClipPlan]:
    if cfg.texture not in ("flat", "natural"):
        raise ValueError(f"synth.texture must be flat or natural, got {cfg.texture!r}")
    clips, t = [], cfg.gap_seconds
    for k in range(cfg.clips_per_video):
        colour = str(rng.choice(list(COLOURS)))
        bg = tuple(int(v) for v in rng.integers(0, 90, size=3))
        clips.append(ClipPlan(
            clip_id=f"{video_id}.{k}.mp4", start=t, end=t + cfg.clip_seconds, colour=colour,
            shape=str(rng.choice(SHAPES)), direction=str(rng.choice(list(DIRECTIONS))),
            background=bg, template=int(rng.integers(len(TEMPLATES)))))
        if cfg.texture == "natural":   # drawn after the flat plan's draws: flat corpora stay unchanged
            clips[-1] = dataclasses.replace(clips[-1], texture=int(rng.integers(2 ** 31)))
        t += cfg.clip_seconds + cfg.gap_seconds
    return clips


PAN_PIXELS_PER_SECOND = 24.0       # camera pan of natural-texture clips (at the source resolution)
GRAIN_FRAMES = 8                   # grain patterns cycled over frames


# Natural-texture calibration (bench/data.py): amplitude ∝ 1/f^1.3, luma contrast 30, weak chroma,
# grain σ 1.5 give ~2.1 bits/pixel for the middle frame as JPEG q90 at 455×256 (camera frames and web
# video: roughly 1.5-3) and ~260 kbit/s at 398×224, 4 fps, GOP 4. 1/f^1.0 with contrast 38 gave 3.7
# bits/pixel: more detail than typical footage.
TEXTURE_SLOPE, TEXTURE_CONTRAST, TEXTURE_CHROMA, GRAIN_SIGMA = 1.3, 30.0, 0.2, 1.5


@functools.lru_cache(maxsize=2)
def natural_texture(seed: int, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: coloured noise with a power-law amplitude spectrum (∝ 1/f^1.3, as
    natural images' ~1/f^1-1.5), luminance-dominated, mean 128."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(height, width)) ** TEXTURE_SLOPE   # [h, w//2+1]

    def field() -> np.ndarray:
        spec = (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)) * amp
        x = np.fft.irfft2(spec, s=(height, width))
        return (x - x.mean()) / (x.std() + 1e-9)                          # [h, w], unit variance

    luma, c1, c2 = field(), field(), field()
    k = TEXTURE_CHROMA
    rgb = np.stack([luma + k * c1, luma - 0.6 * k * c1 + 0.6 * k * c2, luma - k * c2], axis=-1)
    return np.clip(128 + TEXTURE_CONTRAST * rgb, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def _grain(height: int, width: int) -> np.ndarray:
    """int8 [GRAIN_FRAMES, height, width, 1]: sensor-like noise (σ = GRAIN_SIGMA levels), one pattern per frame."""
    rng = np.random.default_rng(12345)
    return np.clip(rng.normal(0, GRAIN_SIGMA, (GRAIN_FRAMES, height, width, 1)), -127, 127).astype(np.int8)


def _natural_background(plan: ClipPlan, t: float, width: int, height: int) -> np.ndarray:
    """The clip's texture seen through a camera panning diagonally at PAN_PIXELS_PER_SECOND, tinted
    towards the clip's background colour, plus per-frame grain."""
    dt = max(plan.end - plan.start, 1e-6)
    margin = int(np.ceil(PAN_PIXELS_PER_SECOND * dt)) + 1
    tex = natural_texture(plan.texture, height + margin, width + margin)
    off = int(PAN_PIXELS_PER_SECOND * min(max(t - plan.start, 0.0), dt))
    view = tex[off:off + height, off:off + width].astype(np.int16)
    view += (np.asarray(plan.background, np.int16) - 45) + _grain(height, width)[int(round(t * 30)) % GRAIN_FRAMES]
    return np.clip(view, 0, 255).astype(np.uint8)


def render_frame(plan: ClipPlan | None, t: float, width: int, height: int,
                 gap_bg: tuple = (30, 30, 30)) -> np.ndarray:
    """RGB frame [H, W, 3] uint8 at time t (seconds)."""
    if plan is None:
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = gap_bg
        return frame
    if plan.texture >= 0:
        frame = _natural_background(plan, t, width, height)
    else:
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = plan.background
        # faint static texture so the codec has something to do besides flat colour
        frame[::8, :, :] //= 2
    size = max(8, min(width, height) // 4)
    mask = _shape_mask(plan.shape, size)
    u = (t - plan.start) / max(plan.end - plan.start, 1e-6)  # 0 → 1 over the clip
    u = min(max(u, 0.0), 1.0)
    dx, dy = DIRECTIONS[plan.direction]
    # travel from one side to the other along the motion axis; centred on the other axis
    span_x, span_y = width - size, height - size
    x = span_x / 2 if dx == 0 else (span_x * (0.1 + 0.8 * u) if dx > 0 else span_x * (0.9 - 0.8 * u))
    y = span_y / 2 if dy == 0 else (span_y * (0.1 + 0.8 * u) if dy > 0 else span_y * (0.9 - 0.8 * u))
    x, y = int(round(x)), int(round(y))
    region = frame[y:y + size, x:x + size]
    region[mask] = COLOURS[plan.colour]
    return frame


def write_video(path: Path, clips: list[ClipPlan], duration: float, cfg: SynthConfig) -> int:
    """Encode the source video with libx264; returns the number of frames."""
    n_frames = int(round(duration * cfg.fps))
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = cfg.width, cfg.height, "yuv420p"
        stream.options = {"crf": str(cfg.crf), "preset": cfg.preset}
        if cfg.audio:   # a soundtrack (AAC stereo 44.1 kHz, shards/synth_audio.py), written after the video
            from shards.synth_audio import add_audio_stream
            audio = add_audio_stream(container)
        ci = 0
        for i in range(n_frames):
            t = i / cfg.fps
            while ci < len(clips) and t >= clips[ci].end:
                ci += 1
            plan = clips[ci] if ci < len(clips) and clips[ci].start <= t < clips[ci].end else None
            frame = av.VideoFrame.from_ndarray(render_frame(plan, t, cfg.width, cfg.height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if cfg.audio:
            import zlib
            from shards.synth_audio import soundtrack, write_audio
            write_audio(container, audio, soundtrack(clips, duration, zlib.crc32(f"{cfg.seed}/{path.stem}".encode())))
    return n_frames


def make_corpus(cfg: SynthConfig) -> dict:
    """Write the synthetic corpus under cfg.out; returns a small summary dict."""
    if cfg.text not in ("template", "speech", "description"):
        raise ValueError(f"synth.text must be template, speech or description, got {cfg.text!r}")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    meta_lines, sub_lines, truth_lines = [], [], []
    frames = 0
    from tqdm import tqdm
    for v in tqdm(range(cfg.num_videos), desc="synth videos", unit="video", leave=False):
        video_id = "".join(rng.choice(_ID_ALPHABET, size=11))
        clips = plan_video(rng, video_id, cfg)
        if cfg.audio:   # sounds from their own generator: the video plan is the same with or without audio
            from shards.synth_audio import plan_sounds
            clips = [dataclasses.replace(c, sound=s) for c, s in zip(clips, plan_sounds(cfg.seed, v, len(clips)))]
        duration = clips[-1].end + cfg.gap_seconds
        frames += write_video(out / "videos" / f"{video_id}.mp4", clips, duration, cfg)
        meta_lines.append({"video_id": video_id, "url": f"https://www.youtube.com/watch?v={video_id}",
                           "clip": [{"clip_id": c.clip_id, "span": [format_timestamp(c.start),
                                                                     format_timestamp(c.end)]} for c in clips]})
        trng = np.random.default_rng([cfg.seed, 1, v])   # texts: own stream, the video plan is unchanged
        for c in clips:
            text = (describe(c.colour, c.shape, c.direction, c.template) if cfg.text == "template"
                    else clip_text(cfg.text, c.colour, c.shape, c.direction, trng))
            if c.sound:   # the subtitle names the sound the frames do not show
                text = with_sound(text, c.sound)
            sub_lines.append({"clip_id": c.clip_id, "text": text})
            truth_lines.append({"clip_id": c.clip_id, "colour": c.colour, "shape": c.shape,
                                "direction": c.direction, "span_s": [c.start, c.end],
                                "background": list(c.background), "template": c.template,
                                "texture": c.texture, **({"sound": c.sound} if c.sound else {}),
                                "caption": describe(c.colour, c.shape, c.direction, 0),
                                "description": description(c.colour, c.shape, c.direction, trng)})
    for name, lines in (("metadata.jsonl", meta_lines), ("subtitles.jsonl", sub_lines), ("truth.jsonl", truth_lines)):
        write_text(out / name, "".join(json.dumps(x) + "\n" for x in lines))
    dt = time.perf_counter() - t0
    summary = {"videos": cfg.num_videos, "clips": len(sub_lines), "frames": frames,
               "seconds": round(dt, 2), "out": str(out)}
    log.info("synth: %d videos, %d clips, %d frames at %dx%d in %.1fs", cfg.num_videos, len(sub_lines),
             frames, cfg.width, cfg.height, dt)
    return summary
