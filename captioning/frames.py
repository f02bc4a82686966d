"""Middle frames straight from shard tars: one chunk of a shard → resized uint8 images.

A chunk is (shard, first sample, last sample) in tar order. `load_chunk` opens
the tar's member index (shards/tarindex.py; the tar may be local or remote), reads only
the `<key>.jpg` members of the chunk (one seek each locally; remotely a few concurrent
range requests), and decodes them with PIL (JPEG only,
nothing is ever unpickled). Per-clip problems become error strings; only a tar
that cannot be opened at all is fatal for the chunk. No torch here: this runs
in light CPU tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from shards.tarindex import TarReader
from shards.video import decode_jpeg


@dataclass(frozen=True)
class Chunk:
    """Samples [start, stop) of one shard in tar order; stop None = to the end of the tar."""

    shard_id: int
    shard: str          # file name, e.g. shard-000012.tar
    path: str           # full path of the tar
    start: int
    stop: Optional[int]
    index: int          # chunk number within the shard
    count: int          # chunks in the shard

    @property
    def name(self) -> str:
        return f"{self.shard}[{self.start}:{'' if self.stop is None else self.stop}]"


def plan_chunks(shard_id: int, shard: str, path: str, num_samples: int, chunk_size: int) -> list[Chunk]:
    """Cut a shard into chunks of chunk_size samples; the last one runs to the end of the tar
    (so a tar holding more samples than shards.json says still gets every clip captioned)."""
    n = max(1, -(-num_samples // max(1, chunk_size)))
    return [Chunk(shard_id, shard, path, i * chunk_size, (i + 1) * chunk_size if i < n - 1 else None, i, n)
            for i in range(n)]


def load_chunk(chunk: Chunk, size: int, resize: str) -> tuple[dict, np.ndarray]:
    """→ (meta, images). meta: {"chunk", "keys" (all keys of the chunk, tar order), "ok" (keys that
    decoded, in the order of `images`), "errors" {key: "reason: detail"}, "fatal" (str|None),
    "index_error" (str|None)}; images uint8 [len(ok), size, size, 3]."""
    meta = {"chunk": chunk.name, "keys": [], "ok": [], "errors": {}, "fatal": None, "index_error": None}
    empty = np.zeros((0, size, size, 3), np.uint8)
    try:
        reader = TarReader(chunk.path)
    except OSError as e:
        meta["fatal"] = f"shard_unreadable: {e}"
        return meta, empty
    try:
        idx = reader.index
        if not reader.is_open or (not idx.keys and idx.error):
            meta["fatal"] = f"shard_unreadable: {idx.error or 'no such file: ' + chunk.path}"
            return meta, empty
        meta["index_error"] = idx.error
        keys = idx.keys[chunk.start:chunk.stop]
        meta["keys"] = keys
        reader.prefetch(keys, exts=("jpg",))   # remote shards: the chunk's JPEGs in a few concurrent requests
        images = []
        for key in keys:
            try:
                data = reader.read(key, "jpg")
            except KeyError:
                meta["errors"][key] = "missing_jpg: no .jpg member"
                continue
            except (EOFError, OSError) as e:
                meta["errors"][key] = f"truncated_member: {e}"
                continue
            try:
                images.append(decode_jpeg(data, size, resize, resample="bicubic"))
            except Exception as e:  # PIL raises many types for bad data; one clip never kills the chunk
                meta["errors"][key] = f"corrupt_jpeg: {type(e).__name__}: {e}"
                continue
            meta["ok"].append(key)
        return meta, (np.stack(images) if images else empty)
    finally:
        reader.close()
