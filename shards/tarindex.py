"""Random access into webdataset tars, local or remote (shards/storage.py).

A shard's member index says where every member's bytes are: `read(key, ext)` is then one
seek + one read locally, one range request remotely. The builder writes the index beside each
tar (`shard-%06d.index.json`, docs/data_format.md), so opening a shard reads one small file and
never scans the tar's headers; a tar without one (or whose index does not match it) is indexed
from its headers as before (no member data read). This is what makes resuming cheap: a reader
jumps straight to the next unconsumed sample instead of streaming past consumed ones.

`prefetch(keys)` reads every member of a batch's samples of this shard at once: the byte spans
of the samples are sorted and merged when the gap between them is small, and the merged ranges
are fetched concurrently, so a remote batch costs a few requests per shard instead of three per
sample; `read` then serves from that buffer until `release()`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field

from shards import storage
from shards.storage import IOOptions

log = logging.getLogger(__name__)
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"


@dataclass
class TarIndex:
    path: str
    keys: list = field(default_factory=list)          # sample keys in tar order
    members: dict = field(default_factory=dict)       # key → {ext: (offset, size)}
    error: str | None = None                          # set when the tar is corrupt past some point
    missing: bool = False                             # the tar does not exist (a 404 remotely)
    source: str = "headers"                           # "headers" (scanned) | "index" (the member index file)

    def __len__(self) -> int:
        return len(self.keys)

    def span(self, key: str) -> tuple[int, int]:
        """[first byte, end) of a sample's member data (its members are adjacent in the tar)."""
        locs = self.members[key].values()
        return min(o for o, _ in locs), max(o + s for o, s in locs)


def header_name(block: bytes) -> str | None:
    """The member name in a 512-byte ustar header (prefix/name), None when it is not one."""
    if len(block) < 512 or not block[257:262] == b"ustar":
        return None
    name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{prefix}/{name}" if prefix else name


def _first_member(idx: "TarIndex", key: str) -> tuple[str, int]:
    """(ext, data offset) of the member of `key` that comes first in the tar."""
    ext, (off, _) = min(idx.members[key].items(), key=lambda kv: kv[1][0])
    return ext, off


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/key.ext' → (key, ext) as webdataset does (split at the basename's first dot)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base or base.startswith("."):
        return None
    key, ext = base.split(".", 1)
    return key, ext


def index_path(tar_path: str) -> str:
    """shard-000012.tar → shard-000012.index.json (beside it, same folder or prefix)."""
    s = str(tar_path)
    return (s[:-4] if s.endswith(".tar") else s) + INDEX_SUFFIX


def _scan(fileobj, idx: TarIndex) -> None:
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tf:
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
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            idx.missing = True
        idx.error = idx.error or f"unreadable tar: {e}"


def index_tar(path: str, opts: IOOptions = storage.DEFAULT) -> TarIndex:
    """Index every regular member from the headers; a corrupt header ends the index with `error` set."""
    idx = TarIndex(path=str(path))
    try:
        f = storage.open_seekable(str(path), opts)
    except OSError as e:
        idx.missing = isinstance(e, FileNotFoundError)
        idx.error = f"{'shard not found' if idx.missing else 'unreadable tar'}: {e}"
    else:
        with f:
            _scan(f, idx)
    if idx.error:
        log.warning("%s: %s", storage.display(str(path)), idx.error)
    return idx


# --------------------------------------------------------------------------- the member index file
def index_bytes(idx: TarIndex, tar_bytes: int) -> bytes:
    """The member index file's content (docs/data_format.md, "Member index")."""
    return json.dumps({"version": INDEX_VERSION, "tar": storage.basename(idx.path), "tar_bytes": int(tar_bytes),
                       "samples": [[k, {e: list(v) for e, v in idx.members[k].items()}] for k in idx.keys]},
                      separators=(",", ":")).encode("utf-8")


def parse_index(path: str, data: bytes) -> tuple[TarIndex, int]:
    """(TarIndex, tar size) from a member index file; ValueError when it is not one."""
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
            raise ValueError(f"version {doc.get('version') if isinstance(doc, dict) else None!r}")
        idx = TarIndex(path=str(path), source="index")
        tar_bytes = int(doc["tar_bytes"])
        for key, members in doc["samples"]:
            locs = {str(e): (int(v[0]), int(v[1])) for e, v in members.items()}
            if not isinstance(key, str) or not locs or any(o < 0 or s < 0 or o + s > tar_bytes
                                                          for o, s in locs.values()):
                raise ValueError(f"bad entry for {key!r}")
            idx.keys.append(key)
            idx.members[key] = locs
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{storage.display(index_path(path))}: not a member index ({type(e).__name__}: {e})") from None
    return idx, tar_bytes


def open_index(path: str, opts: IOOptions = storage.DEFAULT) -> TarIndex:
    """The member index of a tar: from its index file when there is one that matches the tar,
    else from the tar's headers. Locally the match is checked against the tar's size (one stat);
    remotely the index is trusted (checking costs a request; a range past the end is then a
    short read, counted as a corrupt member)."""
    path = str(path)
    remote = storage.is_remote(path)
    try:
        idx, tar_bytes = parse_index(path, storage.read_bytes(index_path(path), opts))
    except FileNotFoundError:
        idx = None
    except ValueError as e:
        log.warning("%s: scanning the tar's headers instead", e)
        idx = None
    if idx is not None and not remote:
        try:
            if os.path.getsize(path) != tar_bytes or not _headers_match(path, idx):
                log.warning("%s: the member index does not match the tar: scanning its headers", path)
                idx = None
        except OSError:
            idx = TarIndex(path=path, error=f"shard not found: {path}", missing=True)
    if idx is not None:
        return idx
    if remote:
        log.info("%s: no member index: scanning the tar's headers (one range request per member)",
                 storage.display(path))
    return index_tar(path, opts)


def _headers_match(path: str, idx: TarIndex) -> bool:
    """Whether the tar's headers before the first and last samples' first members name them (two
    512-byte reads; remote samples are checked as they are prefetched)."""
    if not idx.keys:
        return True
    with open(path, "rb") as f:
        for key in {idx.keys[0], idx.keys[-1]}:
            ext, off = _first_member(idx, key)
            f.seek(max(0, off - 512))
            if header_name(f.read(512)) != f"{key}.{ext}":
                return False
    return True


# --------------------------------------------------------------------------- reader
class TarReader:
    """An open tar with its member index; reads one member's bytes by (key, ext).

    `path` is a local path or a URL (shards/storage.py). A tar that does not exist (404) opens
    with `is_open` False and an empty index whose `error` says so."""

    def __init__(self, path: str, opts: IOOptions = storage.DEFAULT, coalesce_bytes: int = 1 << 20):
        self.path, self.opts, self.coalesce_bytes = str(path), opts, coalesce_bytes
        self.remote = storage.is_remote(self.path)
        self.index = open_index(self.path, opts)
        self._cache: dict = {}            # (key, ext) → bytes | exception, filled by prefetch
        self.failed = 0                   # ranges of the last prefetch that failed every retry
        self._f = None
        self._size = 0
        if not self.remote and not self.index.missing and os.path.exists(self.path):
            self._f = open(self.path, "rb")
            self._size = os.path.getsize(self.path)

    @property
    def is_open(self) -> bool:
        """False when the tar did not exist when opened (or after close)."""
        return (not self.index.missing) if self.remote else self._f is not None

    def read(self, key: str, ext: str) -> bytes:
        loc = self.index.members.get(key, {}).get(ext)
        if loc is None:
            raise KeyError(f"{key}.{ext} not in {storage.display(self.index.path)}")
        hit = self._cache.get((key, ext))
        if hit is not None:
            if isinstance(hit, BaseException):
                raise hit
            return hit
        offset, size = loc
        if self.remote:
            data = storage.read_ranges(self.path, [(offset, offset + size)], self.opts)[0]
            if isinstance(data, BaseException):
                raise data
            return data
        if self._f is None:
            raise FileNotFoundError(f"{self.path} is not open")
        if offset + size > self._size:
            raise EOFError(f"{key}.{ext} runs past the end of {self.index.path} (truncated tar)")
        self._f.seek(offset)
        data = self._f.read(size)
        if len(data) != size:
            raise EOFError(f"short read of {key}.{ext} in {self.index.path}")
        return data

    def prefetch(self, keys: list[str], exts: tuple[str, ...] | None = None) -> int:
        """Read the members (`exts`, default all) of `keys` with few range requests: the samples'
        spans sorted and merged across gaps ≤ coalesce_bytes. Local tars read straight from the
        page cache: nothing to gain, nothing done. Returns the number of range requests."""
        self.failed = 0
        if not self.remote or not self.is_open:
            return 0
        spans = []
        check = self.index.source == "index"          # also fetch the header before each sample: a member
        for key in dict.fromkeys(keys):               # index that does not match its tar is caught
            members = {e: v for e, v in self.index.members.get(key, {}).items() if exts is None or e in exts}
            if members and not all((key, e) in self._cache for e in members):
                start = min(o for o, _ in members.values())
                spans.append((max(0, start - 512) if check else start, max(o + s for o, s in members.values()),
                              key, members))
        if not spans:
            return 0
        spans.sort(key=lambda s: s[0])
        merged: list[list] = []                       # [start, end, [(key, members), …]]
        for start, end, key, members in spans:
            if merged and start - merged[-1][1] <= self.coalesce_bytes:
                merged[-1][1] = max(merged[-1][1], end)
                merged[-1][2].append((key, members))
            else:
                merged.append([start, end, [(key, members)]])
        got = storage.read_ranges(self.path, [(s, e) for s, e, _ in merged], self.opts)
        denied = next((g for g in got if isinstance(g, PermissionError)), None)
        if denied is not None:              # a credentials problem, not a data problem: stop here
            raise PermissionError(f"{storage.display(self.path)}: access denied ({denied}): check the storage "
                                  "credentials in this process's environment (docs/scaling.md)")
        gone = next((g for g in got if isinstance(g, FileNotFoundError)), None)
        if gone is not None:                # the index is there, the tar is not (404): a missing shard
            self.index.missing, self.index.error = True, f"shard not found: {gone}"
            log.warning("%s: %s", storage.display(self.path), self.index.error)
        for (start, _, samples), data in zip(merged, got):
            for key, members in samples:
                err = data if isinstance(data, BaseException) else None
                if err is None and check:
                    ext0, o0 = min(((e, o) for e, (o, _) in members.items()), key=lambda eo: eo[1])
                    name = header_name(data[o0 - 512 - start:o0 - start])
                    if name != f"{key}.{ext0}":
                        err = OSError(errno.EIO, f"{storage.display(self.path)}: the member index does not match "
                                                 f"the tar (header says {name!r}, index {key}.{ext0})")
                for ext, (o, n) in members.items():
                    self._cache[(key, ext)] = err if err is not None else data[o - start:o - start + n]
        self.failed = sum(isinstance(g, storage.RemoteIOError) for g in got)
        return len(merged)

    def release(self) -> None:
        """Drop prefetched bytes (after the batch they were read for)."""
        self._cache.clear()

    def close(self) -> None:
        self._cache.clear()
        if self._f:
            self._f.close()
            self._f = None
