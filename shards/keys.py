"""Sample keys: clip ids made safe for tar member names and webdataset.

webdataset splits a member name at the first dot of its basename into key and
extension, and a `/` would create folders (or escape the output folder with
`..`). A key therefore holds only `[A-Za-z0-9_-]`: a trailing video extension
is dropped and every other character becomes `_`. The original id is kept in
the sample's json. `QMi8x8o55Ns.1.mp4` → `QMi8x8o55Ns_1`.
"""
from __future__ import annotations

import hashlib
import re

_VIDEO_EXT = re.compile(r"\.(mp4|mkv|webm|avi|mov|m4v|flv)$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY_LEN = 96  # keeps "<key>.json" inside the 100-byte ustar name field


class BadKeyError(ValueError):
    """The clip id cannot be turned into a key (empty after sanitising)."""


def clip_key(clip_id: str) -> str:
    """Deterministic tar/webdataset-safe key for a clip id."""
    if not isinstance(clip_id, str):
        raise BadKeyError(f"clip id must be a string, got {type(clip_id).__name__}")
    stem = _VIDEO_EXT.sub("", clip_id.strip())
    key = _UNSAFE.sub("_", stem).strip("_")
    if not key:
        raise BadKeyError(f"clip id {clip_id!r} has no usable characters")
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.sha1(clip_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        key = f"{key[:MAX_KEY_LEN - 13]}_{digest}"
    return key


def is_safe_key(key: str) -> bool:
    return bool(key) and len(key) <= MAX_KEY_LEN and _UNSAFE.search(key) is None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_index(name: str) -> int:
    m = re.fullmatch(r"shard-(\d{6,})(\.tar|\.parquet)?", name.rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"not a shard name: {name!r}")
    return int(m.group(1))
