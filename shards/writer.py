"""Write one webdataset shard atomically, with its member index.

Members go to a temporary file; the member index (`shard-%06d.index.json`: where each member's
bytes are, shards/tarindex.py) is built as they are added. On a clean exit the index is published,
then the tar under its final name: locally by renames (`shards/atomic.py`), on object storage by
uploading the finished local file (staged in `staging`) — one object each, visible whole or not at
all. So a tar under its final name always has its index beside it, and a partial shard is never
visible. (The builder's part record, written after, is the shard's commit marker.)"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from shards import storage
from shards.atomic import atomic_path
from shards.keys import is_safe_key
from shards.tarindex import TarIndex, index_bytes, index_path

ALLOWED_EXTS = ("mp4", "jpg", "json", "txt", "m4a")


class ShardWriter:
    """Context manager: `add(key, {"mp4": bytes, ...})`, then publish on clean exit.

    `path` is a local path or a URL (s3://…, gs://…); remote shards are staged in `staging`
    (default: the system temporary folder) and uploaded on exit."""

    def __init__(self, path: str | Path, staging: str | None = None):
        self.path = storage.check_url(str(path))
        self.remote = storage.is_remote(self.path)
        self.staging = staging
        self.count = 0
        self.bytes = 0
        self.index = TarIndex(path=self.path, source="index")

    def __enter__(self) -> "ShardWriter":
        self._stack = contextlib.ExitStack()
        if self.remote:
            if self.staging:
                os.makedirs(self.staging, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{storage.basename(self.path)}.", suffix=".tmp", dir=self.staging)
            os.close(fd)
            self.tmp = Path(tmp)
            self._stack.callback(self.tmp.unlink, missing_ok=True)
        else:
            self.tmp = self._stack.enter_context(atomic_path(self.path, fsync=True))
        self._f = open(self.tmp, "wb")
        # ustar keeps every header 512 bytes (keys are ≤ 96 chars), deterministic output
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, members: dict[str, bytes | dict | str]) -> None:
        if not is_safe_key(key):
            raise ValueError(f"unsafe key {key!r}")
        if key in self.index.members:
            raise ValueError(f"key {key!r} added twice to {self.path}")
        locs = {}
        for ext, data in members.items():
            if ext not in ALLOWED_EXTS:
                raise ValueError(f"member .{ext} not allowed (only {ALLOWED_EXTS})")
            if isinstance(data, dict):
                data = json.dumps(data, ensure_ascii=False, sort_keys=True).encode("utf-8")
            elif isinstance(data, str):
                data = data.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "vip"
            header = len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))
            locs[ext] = (self._tar.offset + header, len(data))
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.index.keys.append(key)
        self.index.members[key] = locs
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                self._tar.close()
            finally:
                self._f.close()
            if exc_type is None:
                self.tar_bytes = os.path.getsize(self.tmp)
                index = index_bytes(self.index, self.tar_bytes)
                if self.remote:
                    storage.write_bytes(index_path(self.path), index)      # the index first, then the tar
                    storage.put_file(self.tmp, self.path)
                else:
                    storage.write_bytes(index_path(self.path), index)      # renamed into place before the tar
        except BaseException as e:          # a failed close or upload is a failed shard: never published
            exc_type, exc, tb = type(e), e, e.__traceback__
            raise
        finally:
            self._stack.__exit__(exc_type, exc, tb)   # publish the local shard, or remove the partial file
