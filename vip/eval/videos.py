"""Annotation jsonl + a folder of videos → decoded, evenly sampled, CLIP-normalised clips.

Annotations are ``{"clip_id": str, "text": str | [str, ...]}`` lines. A list is several
captions of one video (each one a text query), or with ``paragraph=True`` (DiDeMo) one
paragraph (all its lines' captions joined). Lines repeating a clip_id add captions to that video. Videos are found as
``<videos>/<clip_id>`` or ``<videos>/<clip_id>.<ext>`` (any container PyAV reads).

A video that cannot be used raises `VideoError` naming the file, with the reason counted in
results: ``no_video_stream`` (an audio-only file: the builder's reason too) or ``decode_error``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from shards.reader import normalise
from shards.video import decode_frames, sample_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    clip_id: str
    texts: tuple[str, ...]


def read_annotations(path: str | Path, paragraph: bool = False) -> list[Item]:
    """Items in first-seen clip order; captions of repeated clip_ids are merged."""
    order: list[str] = []
    texts: dict[str, list[str]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            cid, text = str(row["clip_id"]), row["text"]
            caps = [text] if isinstance(text, str) else [str(t) for t in text]
            if not caps:
                raise ValueError(f"{path}:{n}: clip {cid} has no text")
            if cid not in texts:
                order.append(cid)
                texts[cid] = []
            texts[cid].extend(caps)
    if paragraph:  # every caption of a clip, in file order, as one paragraph
        return [Item(c, (" ".join(t.strip() for t in texts[c] if t.strip()),)) for c in order]
    return [Item(c, tuple(texts[c])) for c in order]


def index_folder(folder: str | Path) -> dict[str, Path]:
    """clip_id → file: exact names first, then names without their last extension."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    out: dict[str, Path] = {}
    for p in files:
        out.setdefault(p.stem, p)
    for p in files:
        out[p.name] = p
    return out


class VideoError(ValueError):
    """A video file that cannot be used; `reason` is the counted skip reason
    (``no_video_stream`` | ``decode_error``), the message names the file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def count_frames(data: bytes) -> int:
    """Frames of the first video stream, counted by demuxing (no decoding).
    VideoError(no_video_stream) when the file has no video stream (audio only)."""
    import io
    with av.open(io.BytesIO(data), mode="r") as c:
        if not c.streams.video:
            raise VideoError("no_video_stream", "no video stream (audio only?)")
        stream = c.streams.video[0]
        return sum(1 for pkt in c.demux(stream) if pkt.size)


def load_video(path: str | Path, num_frames: int, size: int, resize: str = "squash") -> np.ndarray:
    """uint8 [T, size, size, 3]: T evenly spaced frames over the whole video (eval sampling).

    A missing file raises FileNotFoundError; a file without a video stream VideoError(no_video_stream);
    any other failure to read it VideoError(decode_error): every message names the path."""
    data = Path(path).read_bytes()
    try:
        n = count_frames(data)
        if n <= 0:
            raise ValueError("no video frames")
        idx = sample_indices(n, num_frames, train=False)
        return decode_frames(data, idx, size, resize)
    except VideoError as e:
        raise VideoError(e.reason, f"{path}: {e.detail}") from None
    except Exception as e:  # noqa: BLE001 - av.error.*, codec surprises: name the file
        raise VideoError("decode_error", f"{path}: {type(e).__name__}: {e}") from e


class VideoFolder(Dataset):
    """(index, normalised video [T, 3, H, W] or None, failure reason or None) per clip id."""

    def __init__(self, clip_ids: list[str], folder: str | Path, num_frames: int, size: int, resize: str = "squash"):
        self.clip_ids, self.num_frames, self.size, self.resize = list(clip_ids), num_frames, size, resize
        self.files = index_folder(folder)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, i: int):
        cid = self.clip_ids[i]
        path = self.files.get(cid)
        if path is None:
            return i, None, "missing"
        try:
            frames = load_video(path, self.num_frames, self.size, self.resize)
        except VideoError as e:
            log.warning("skipping %s: %s", cid, e)
            return i, None, e.reason
        except Exception as e:  # noqa: BLE001 - any decode failure skips the video
            log.warning("skipping %s: %s: %s", cid, type(e).__name__, e)
            return i, None, "decode_error"
        return i, normalise(frames), None


def collate(samples: list) -> dict:
    """→ {"index": [n], "video": [n, T, 3, H, W] or None, "failed": [(index, reason)]}."""
    ok = [(i, v) for i, v, r in samples if r is None]
    return {"index": [i for i, _ in ok], "video": torch.stack([v for _, v in ok]) if ok else None,
            "failed": [(i, r) for i, v, r in samples if r is not None]}
