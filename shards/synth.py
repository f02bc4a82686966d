"""Synthetic HD-VILA-style corpus with real h264 video.

Each source video is a sequence of clips; in each clip one coloured shape moves
across a plain background in one direction, and the clip's subtitle names the
colour, the shape and the direction of motion ("a red circle moves to the
left"). Footage between clips (gaps) is a static background that no clip span
covers. Deterministic from the seed. Writes, under `out`:

    metadata.jsonl    {"video_id", "url", "clip": [{"clip_id", "span"}]}  (HD-VILA format)
    subtitles.jsonl   {"clip_id", "text"}
    truth.jsonl       {"clip_id", "colour", "shape", "direction", "span_s", "background", …}
                      (ground truth for tests and benchmarks; `truth_plan` rebuilds the renderer's plan)
    videos/<video_id>.mp4
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from vip.config import SynthConfig

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


def truth_plan(truth: dict) -> ClipPlan:
    """The renderer's plan of a clip from its truth.jsonl line (to re-render any frame)."""
    return ClipPlan(clip_id=truth["clip_id"], start=truth["span_s"][0], end=truth["span_s"][1],
                    colour=truth["colour"], shape=truth["shape"], direction=truth["direction"],
                    background=tuple(truth["background"]), template=truth["template"])


def plan_video(rng: np.random.Generator, video_id: str, cfg: SynthConfig) -> list[ClipPlan]:
    clips, t = [], cfg.gap_seconds
    for k in range(cfg.clips_per_video):
        colour = str(rng.choice(list(COLOURS)))
        bg = tuple(int(v) for v in rng.integers(0, 90, size=3))
        clips.append(ClipPlan(
            clip_id=f"{video_id}.{k}.mp4", start=t, end=t + cfg.clip_seconds, colour=colour,
            shape=str(rng.choice(SHAPES)), direction=str(rng.choice(list(DIRECTIONS))),
            background=bg, template=int(rng.integers(len(TEMPLATES)))))
        t += cfg.clip_seconds + cfg.gap_seconds
    return clips


def render_frame(plan: ClipPlan | None, t: float, width: int, height: int,
                 gap_bg: tuple = (30, 30, 30)) -> np.ndarray:
    """RGB frame [H, W, 3] uint8 at time t (seconds)."""
    if plan is None:
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = gap_bg
        return frame
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
    tmp = path.with_name(path.name + ".part")
    n_frames = int(round(duration * cfg.fps))
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = cfg.width, cfg.height, "yuv420p"
        stream.options = {"crf": str(cfg.crf), "preset": cfg.preset}
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
    tmp.replace(path)
    return n_frames


def make_corpus(cfg: SynthConfig) -> dict:
    """Write the synthetic corpus under cfg.out; returns a small summary dict."""
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
        duration = clips[-1].end + cfg.gap_seconds
        frames += write_video(out / "videos" / f"{video_id}.mp4", clips, duration, cfg)
        meta_lines.append({"video_id": video_id, "url": f"https://www.youtube.com/watch?v={video_id}",
                           "clip": [{"clip_id": c.clip_id, "span": [format_timestamp(c.start),
                                                                     format_timestamp(c.end)]} for c in clips]})
        for c in clips:
            sub_lines.append({"clip_id": c.clip_id, "text": describe(c.colour, c.shape, c.direction, c.template)})
            truth_lines.append({"clip_id": c.clip_id, "colour": c.colour, "shape": c.shape,
                                "direction": c.direction, "span_s": [c.start, c.end],
                                "background": list(c.background), "template": c.template,
                                "caption": describe(c.colour, c.shape, c.direction, 0)})
    for name, lines in (("metadata.jsonl", meta_lines), ("subtitles.jsonl", sub_lines), ("truth.jsonl", truth_lines)):
        (out / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    dt = time.perf_counter() - t0
    summary = {"videos": cfg.num_videos, "clips": len(sub_lines), "frames": frames,
               "seconds": round(dt, 2), "out": str(out)}
    log.info("synth: %d videos, %d clips, %d frames at %dx%d in %.1fs", cfg.num_videos, len(sub_lines),
             frames, cfg.width, cfg.height, dt)
    return summary
