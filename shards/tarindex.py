"""Random access into webdataset tars: a member offset index built from the
tar headers alone (no member data is read), then `read(key, ext)` is one
seek + one read. This is what makes resuming cheap: a reader jumps straight to
the next unconsumed sample instead of streaming past consumed ones."""
from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class TarIndex:
    path: str
    keys: list = field(default_factory=list)          # sample keys in tar order
    members: dict = field(default_factory=dict)       # key → {ext: (offset, size)}
    error: str | None = None                          # set when the tar is corrupt past some point

    def __len__(self) -> int:
        return len(self.keys)


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/key.ext' → (key, ext) as webdataset does (split at the basename's first dot)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base or base.startswith("."):
        return None
    key, ext = base.split(".", 1)
    return key, ext


def index_tar(path: str) -> TarIndex:
    """Index every regular member; a corrupt header ends the index with `error` set."""
    idx = TarIndex(path=path)
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    m = tf.next()
                except tarfile.TarError as e:
                    idx.error = f"corrupt tar after {len(idx.keys)} samples: {e}"
                    break
                if m is None:
                    break
                if not m.isfile():
                    continue
                parts = split_name(m.name)
                if parts is None:
                    continue
                key, ext = parts
                if key not in idx.members:
                    idx.members[key] = {}
                    idx.keys.append(key)
                idx.members[key][ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        idx.error = f"unreadable tar: {e}"
    if idx.error:
        log.warning("%s: %s", path, idx.error)
    return idx


class TarReader:
    """An open tar with its index; reads one member's bytes by (key, ext)."""

    def __init__(self, path: str):
        self.index = index_tar(path)
        self._f = open(path, "rb") if os.path.exists(path) else None
        self._size = os.path.getsize(path) if self._f else 0

    @property
    def is_open(self) -> bool:
        """False when the tar did not exist when opened (or after close)."""
        return self._f is not None

    def read(self, key: str, ext: str) -> bytes:
        loc = self.index.members.get(key, {}).get(ext)
        if loc is None:
            raise KeyError(f"{key}.{ext} not in {self.index.path}")
        offset, size = loc
        if offset + size > self._size:
            raise EOFError(f"{key}.{ext} runs past the end of {self.index.path} (truncated tar)")
        self._f.seek(offset)
        data = self._f.read(size)
        if len(data) != size:
            raise EOFError(f"short read of {key}.{ext} in {self.index.path}")
        return data

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
