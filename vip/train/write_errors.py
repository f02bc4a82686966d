"""Why a checkpoint write failed, in words that name the path: no space (with what is free),
permission denied, read-only file system, a file where a folder should be, no such folder."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from vip.train.verify import human_bytes


class CheckpointWriteError(OSError):
    """A checkpoint that cannot be written: no space, no permission, no folder (names the path)."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def blocking_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of `path` when it is a file, not a folder."""
    p = existing_ancestor(path)
    return None if p.is_dir() else p


def os_reason(e: BaseException, path: Path) -> str | None:
    """'no space left on device' / 'permission denied' / … for an error of a write under `path`."""
    for err in (e, e.__cause__, e.__context__):
        if err is None:
            continue
        code, msg = getattr(err, "errno", None), str(err)
        if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in msg or "unexpected pos" in msg \
                or "file write failed" in msg:
            try:
                free = f", {human_bytes(shutil.disk_usage(existing_ancestor(path)).free)} free"
            except OSError:
                free = ""
            return ("disk quota exceeded" if code == errno.EDQUOT else "no space left on device") + free
        if code in (errno.EACCES, errno.EPERM) or "Permission denied" in msg:
            return "permission denied"
        if code == errno.EROFS or "Read-only file system" in msg:
            return "read-only file system"
        if code == errno.ENOTDIR or "Not a directory" in msg:
            blocker = blocking_ancestor(path)
            return f"{blocker} is a file, not a folder" if blocker else "not a directory"
        if code == errno.ENOENT or "does not exist" in msg:
            return "folder does not exist"
        if "cannot be opened" in msg:          # torch's message for a file it could not create
            if not os.access(existing_ancestor(path), os.W_OK):
                return "permission denied"
    return None


def existing_ancestor(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path("/")
