"""HD-VILA metadata and subtitles → validated clip records, with counted skips.

Input lines: `{"video_id", "url", "clip": [{"clip_id": "<vid>.<k>.mp4", "span": ["HH:MM:SS.mmm", …]}]}`
and subtitles `{"clip_id", "text"}`. Nothing here raises on bad input: each
problem is logged with the line or clip it concerns and counted by reason in a
`SkipLog`; the good records go on.
"""
from __future__ import annotations

import collections
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from shards.keys import BadKeyError, clip_key

log = logging.getLogger(__name__)

_TS = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


@dataclass(frozen=True)
class ClipRecord:
    """One clip to cut: everything a shard worker needs, nothing else."""

    key: str
    clip_id: str
    video_id: str
    start: float       # seconds
    end: float         # seconds
    subtitle: str


@dataclass
class SkipLog:
    """Counts of skipped items by reason, plus a few examples of each."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, what: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{what}: {detail}" if detail else what)
        log.warning("skip [%s] %s%s", reason, what, f": {detail}" if detail else "")

    def merge(self, other: "SkipLog") -> None:
        self.counts.update(other.counts)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}


def parse_timestamp(value) -> float:
    """'HH:MM:SS.mmm' (or 'MM:SS.mmm', or a number of seconds) → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"bad timestamp {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _TS.match(str(value).strip())
        if not m:
            raise ValueError(f"bad timestamp {value!r}")
        h, mnt, s = m.groups()
        seconds = int(h or 0) * 3600 + int(mnt) * 60 + float(s)
    if not (seconds >= 0 and seconds < float("inf")):
        raise ValueError(f"bad timestamp {value!r}")
    return seconds


def read_jsonl_lines(path: str | Path, skips: SkipLog, what: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each good JSON-object line; count the rest."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.add(f"{what}_not_utf8", f"{path}:{lineno}", str(e))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                skips.add(f"malformed_{what}", f"{path}:{lineno}", str(e))
                continue
            if not isinstance(obj, dict):
                skips.add(f"malformed_{what}", f"{path}:{lineno}", "not a JSON object")
                continue
            yield lineno, obj


def load_subtitles(path: str | Path, skips: SkipLog) -> dict[str, str]:
    """clip_id → subtitle text. Bad lines are counted; the first of duplicates wins."""
    subs: dict[str, str] = {}
    for lineno, obj in read_jsonl_lines(path, skips, "subtitle"):
        cid, text = obj.get("clip_id"), obj.get("text")
        if not isinstance(cid, str) or not cid:
            skips.add("malformed_subtitle", f"{path}:{lineno}", "missing clip_id")
            continue
        if isinstance(text, list):  # some dumps keep subtitle lines as a list
            text = " ".join(str(t) for t in text)
        if not isinstance(text, str):
            skips.add("malformed_subtitle", f"{path}:{lineno}", f"text of {cid} is not a string")
            continue
        if cid in subs:
            skips.add("duplicate_subtitle", cid, f"{path}:{lineno}")
            continue
        subs[cid] = text
    return subs


def iter_clips(metadata: str | Path, subtitles: dict[str, str], skips: SkipLog) -> Iterator[ClipRecord]:
    """Validated clip records in metadata order. Duplicate clip ids and keys keep the first."""
    seen_ids: set[str] = set()
    seen_keys: dict[str, str] = {}
    for lineno, obj in read_jsonl_lines(metadata, skips, "metadata"):
        where = f"{metadata}:{lineno}"
        vid = obj.get("video_id")
        clips = obj.get("clip")
        if not isinstance(vid, str) or not vid or "/" in vid or vid in (".", ".."):
            skips.add("malformed_metadata", where, f"bad video_id {vid!r}")
            continue
        if not isinstance(clips, list):
            skips.add("malformed_metadata", where, "'clip' is not a list")
            continue
        for c in clips:
            rec = _clip_record(c, vid, where, subtitles, skips)
            if rec is None:
                continue
            if rec.clip_id in seen_ids:
                skips.add("duplicate_clip_id", rec.clip_id, where)
                continue
            if rec.key in seen_keys:
                skips.add("duplicate_key", rec.clip_id, f"key {rec.key} already used by {seen_keys[rec.key]}")
                continue
            seen_ids.add(rec.clip_id)
            seen_keys[rec.key] = rec.clip_id
            yield rec


def _clip_record(c, vid: str, where: str, subtitles: dict[str, str], skips: SkipLog) -> ClipRecord | None:
    if not isinstance(c, dict) or not isinstance(c.get("clip_id"), str):
        skips.add("malformed_metadata", where, f"bad clip entry {str(c)[:80]!r}")
        return None
    cid = c["clip_id"]
    try:
        key = clip_key(cid)
    except BadKeyError as e:
        skips.add("bad_clip_id", cid, str(e))
        return None
    span = c.get("span")
    try:
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise ValueError(f"span {span!r} is not [start, end]")
        start, end = parse_timestamp(span[0]), parse_timestamp(span[1])
    except ValueError as e:
        skips.add("bad_span", cid, str(e))
        return None
    if end <= start:
        skips.add("empty_span", cid, f"end {end:.3f}s <= start {start:.3f}s")
        return None
    text = subtitles.get(cid)
    if text is None:
        skips.add("missing_subtitle", cid)
        return None
    text = " ".join(text.split())
    if not text:
        skips.add("empty_subtitle", cid)
        return None
    return ClipRecord(key=key, clip_id=cid, video_id=vid, start=start, end=end, subtitle=text)


def chunk(records: Iterable[ClipRecord], size: int) -> Iterator[list[ClipRecord]]:
    """Consecutive groups of `size` records (clips of one video stay together mostly)."""
    buf: list[ClipRecord] = []
    for r in records:
        buf.append(r)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
