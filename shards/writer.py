"""Write one webdataset shard atomically: members go to a temporary file that is
renamed to `shard-%06d.tar` only once complete, so a partial shard is never
visible under its final name."""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

from shards.atomic import atomic_path
from shards.keys import is_safe_key

ALLOWED_EXTS = ("mp4", "jpg", "json", "txt", "m4a")


class ShardWriter:
    """Context manager: `add(key, {"mp4": bytes, ...})`, then rename on clean exit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self.bytes = 0

    def __enter__(self) -> "ShardWriter":
        self._stack = contextlib.ExitStack()
        self.tmp = self._stack.enter_context(atomic_path(self.path, fsync=True))
        self._f = open(self.tmp, "wb")
        # ustar keeps every header 512 bytes (keys are ≤ 96 chars), deterministic output
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, members: dict[str, bytes | dict | str]) -> None:
        if not is_safe_key(key):
            raise ValueError(f"unsafe key {key!r}")
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
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
        except BaseException as e:          # a failed close is a failed shard: never published
            exc_type, exc, tb = type(e), e, e.__traceback__
            raise
        finally:
            self._f.close()
            self._stack.__exit__(exc_type, exc, tb)   # publish the shard, or remove the partial file
