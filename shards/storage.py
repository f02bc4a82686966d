"""Where shard sets live: a local folder, or object storage through fsspec (`s3://`, `gs://`,
`http(s)://`). Every byte the pipeline reads or publishes goes through here.

- Reads are byte ranges (`read_ranges`: many ranges of one object at once, fetched concurrently;
  the reader merges nearby ranges before calling it, so a batch costs few requests).
- Transient failures (timeouts, dropped connections, HTTP 5xx and 429, throttling) are retried
  with exponential backoff and jitter, up to `IOOptions.retries` times, and counted; a missing
  object (404) is never retried: it raises FileNotFoundError at once, for the caller to count and
  skip. The filesystems' own retry loops are turned off so that every retry is counted here.
- Publishing is atomic: locally a temporary name + rename (`shards/atomic.py`); on object storage
  one PUT per object (an object is visible whole or not at all); a multi-object unit (a shard and
  its member index) is committed by writing its commit marker last (docs/data_format.md).
- Credentials come only from each filesystem's own environment and config files (AWS_* variables,
  ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, FSSPEC_S3_* …): never from our configs. A URL carrying
  credentials (`s3://KEY:SECRET@bucket`, `https://user:pass@host`) is refused, because URLs are
  saved in configs and written to logs.

Counters (`STATS`, per process) feed the reader's per-batch IO figures and `bench/data.py`.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REMOTE = ("s3", "s3a", "gs", "gcs", "http", "https")
STATS: collections.Counter = collections.Counter()   # requests, bytes, retries, retry_<kind>, failed_<kind>
_lock = threading.Lock()
_warned: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class IOOptions:
    """How remote objects are read (`data.io_*` fields map onto these)."""

    timeout: float = 60.0         # seconds to connect, and between bytes of a response, per request
    retries: int = 5              # retries of a transient failure (then the read fails and is counted)
    backoff: float = 0.5          # first retry waits ~backoff s (×0.5–1 jitter), doubling each time
    backoff_max: float = 30.0
    concurrency: int = 16         # range requests of one call in flight at once

    def __post_init__(self):
        if not (self.timeout > 0 and self.retries >= 0 and self.backoff >= 0 and self.concurrency >= 1):
            raise ValueError(f"storage options out of range: {self} (timeout > 0, retries ≥ 0, backoff ≥ 0, "
                             "concurrency ≥ 1)")


DEFAULT = IOOptions()


class RemoteIOError(OSError):
    """A remote read or write that still failed after every retry (`kind`: timeout, connection, 5xx)."""

    def __init__(self, what: str, kind: str, attempts: int, cause: BaseException):
        super().__init__(errno.EIO, f"{what}: {kind} after {attempts} attempts: {type(cause).__name__}: {cause}")
        self.kind = kind


# --------------------------------------------------------------------------- paths
def protocol(path: str | os.PathLike) -> str | None:
    """'s3', 'gs', 'http', … for a URL; None for a local path (or file://)."""
    s = str(path)
    if "://" not in s:
        return None
    p = s.split("://", 1)[0].lower()
    return None if p in ("file", "local") else p


def is_remote(path: str | os.PathLike) -> bool:
    return protocol(path) is not None


def check_url(path: str | os.PathLike) -> str:
    """`path` as a string; refuses unknown schemes and URLs with credentials in them."""
    s = str(path)
    p = protocol(s)
    if p is None:
        return s[len("file://"):] if s.startswith("file://") else s
    if p not in REMOTE:
        raise ValueError(f"{s}: unsupported storage scheme {p!r} (local paths, s3://, gs://, http(s)://)")
    parts = urlsplit(s)
    if parts.username or parts.password:
        raise ValueError(f"{p}://…: credentials in a URL are refused (URLs are saved in configs and logs): "
                         f"give them through the filesystem's environment or config (docs/scaling.md, "
                         f"\"Object storage\")")
    return s


def join(root: str | os.PathLike, *names: str) -> str:
    """root/name/… for a local folder or a URL (Path would turn 's3://b' into 's3:/b')."""
    root = check_url(root)
    if is_remote(root):
        return "/".join([root.rstrip("/"), *[n.strip("/") for n in names]])
    return str(Path(root).joinpath(*names))


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def display(path: str) -> str:
    """A path for logs: the URL without any query string (which may hold a signature)."""
    s = str(path)
    return s.split("?", 1)[0] if is_remote(s) else s


# --------------------------------------------------------------------------- filesystems
_fs: dict = {}


def filesystem(path: str, opts: IOOptions = DEFAULT):
    """This process's fsspec filesystem for `path`'s scheme, with our timeouts and the filesystem's
    own retries off (ours count them). Made anew in a forked or spawned process."""
    p = protocol(path)
    key = (os.getpid(), p, opts.timeout)
    fs = _fs.get(key)
    if fs is not None:
        return fs
    import fsspec
    t = opts.timeout
    try:
        if p in ("s3", "s3a"):
            import s3fs
            fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
                "connect_timeout": t, "read_timeout": t, "retries": {"total_max_attempts": 1}})
            fs.retries = 1                          # s3fs's own retry loop off: ours counts
        elif p in ("http", "https"):
            import aiohttp
            fs = fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={
                "timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)})
        elif p in ("gs", "gcs"):
            # gcsfs retries 5xx itself (its own loop, not switchable per instance): those retries are
            # not in our counters; ours add on top for what it gives up on
            fs = fsspec.filesystem("gs", skip_instance_cache=True, requests_timeout=t)
        else:
            fs = fsspec.filesystem(p)
    except ImportError as e:
        raise ImportError(f"{p}:// needs the fsspec backend for it ({e}); s3:// uses s3fs, gs:// gcsfs "
                          f"(pip install gcsfs matching fsspec's version), http(s):// aiohttp") from None
    _fs[key] = fs
    return fs


def reset_filesystems() -> None:
    """Forget this process's filesystems (after the environment's endpoint or credentials changed)."""
    _fs.clear()


def _strip(path: str) -> str:
    """The path as the filesystem wants it (s3fs: 'bucket/key'; http: the whole URL)."""
    return path if protocol(path) in ("http", "https") else path.split("://", 1)[1]


# --------------------------------------------------------------------------- retries
_TIMEOUT_NAMES = {"TimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError", "timeout",
                  "ServerTimeoutError", "ConnectTimeout", "ReadTimeout"}
_CONN_NAMES = {"ConnectionError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
               "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
               "ClientOSError", "EndpointConnectionError", "ConnectionClosedError", "IncompleteRead",
               "HTTPClientError", "ResponseStreamingError", "ContentLengthError", "TransferEncodingError",
               "ProtocolError", "ResponseParserError"}


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def transient(e: BaseException) -> str | None:
    """'timeout' | 'connection' | '5xx' (retry it) or None (a 404, a permission error, bad data:
    retrying would give the same answer). Looks through the exception's causes, by type name, so
    that every backend's exceptions classify without importing them."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return None
        names = {c.__name__ for c in type(e).__mro__}
        if names & _TIMEOUT_NAMES:
            return "timeout"
        if names & _CONN_NAMES:
            return "connection"
        status = _status(e)
        if status is not None and (status >= 500 or status == 429):
            return "5xx"
        if status is not None and 400 <= status < 500:
            return None
        if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE,
                                                   errno.ECONNABORTED, errno.EREMOTEIO):
            return "connection"
        if "SlowDown" in str(e) or "reduce your request rate" in str(e):
            return "5xx"
        e = e.__cause__ or e.__context__
    return None


def denied_or_missing(e: BaseException, what: str) -> BaseException:
    """A non-transient error as the Python error it means: 401/403 → PermissionError, 404 →
    FileNotFoundError (backends differ: s3fs translates them, aiohttp does not)."""
    if isinstance(e, (PermissionError, FileNotFoundError)):
        return e
    status = _status(e)
    if status is None and e.__cause__ is not None:
        status = _status(e.__cause__)
    if status in (401, 403):
        return PermissionError(errno.EACCES, f"{display(what)}: access denied (HTTP {status})")
    if status == 404:
        return FileNotFoundError(errno.ENOENT, f"{display(what)}: not found (HTTP 404)")
    return e


def _count(**kw) -> None:
    with _lock:
        STATS.update(kw)


def _sleep_before_retry(attempt: int, opts: IOOptions) -> None:
    time.sleep(min(opts.backoff_max, opts.backoff * 2 ** attempt) * random.uniform(0.5, 1.0))


def _warn(kind: str, msg: str, *args) -> None:
    _warned[kind] += 1
    n = _warned[kind]
    if n <= 10 or n & (n - 1) == 0:       # the first 10, then at powers of two
        log.warning(msg + (f" (#{n} of this kind in this process)" if n > 10 else ""), *args)


def retrying(what: str, fn, opts: IOOptions = DEFAULT, requests: int = 1):
    """fn() with transient failures retried (backoff, counted); other errors raised at once."""
    for attempt in range(opts.retries + 1):
        try:
            _count(requests=requests)
            return fn()
        except Exception as e:
            kind = transient(e)
            if kind is None:
                err = denied_or_missing(e, what)
                if isinstance(err, FileNotFoundError):
                    _count(not_found=1)
                if err is e:
                    raise
                raise err from e
            if attempt == opts.retries:
                _count(**{"failed": 1, f"failed_{kind}": 1})
                raise RemoteIOError(display(what), kind, attempt + 1, e) from e
            _count(**{"retries": 1, f"retry_{kind}": 1})
            _warn(kind, "storage: %s: %s (%s), retry %d/%d", display(what), kind, type(e).__name__,
                  attempt + 1, opts.retries)
            _sleep_before_retry(attempt, opts)


# --------------------------------------------------------------------------- reads
def read_bytes(path: str, opts: IOOptions = DEFAULT) -> bytes:
    """The whole file or object; FileNotFoundError when it does not exist."""
    path = check_url(path)
    if not is_remote(path):
        data = Path(path).read_bytes()
        _count(requests=1, bytes=len(data))
        return data
    fs = filesystem(path, opts)
    kw = {"max_concurrency": 1} if protocol(path) in ("s3", "s3a") else {}   # one GET, no size request first
    data = retrying(path, lambda: fs.cat_file(_strip(path), **kw), opts)
    _count(bytes=len(data))
    return data


def read_text(path: str, opts: IOOptions = DEFAULT) -> str:
    return read_bytes(path, opts).decode("utf-8")


def read_ranges(path: str, ranges: list[tuple[int, int]], opts: IOOptions = DEFAULT) -> list:
    """[start, end) byte ranges of one file → a list of bytes, or of the exception that range met
    (after the retries of a transient one); a short answer (a range past the end) is an EOFError.
    Remote ranges are fetched concurrently (`opts.concurrency` in flight)."""
    path = check_url(path)
    if not ranges:
        return []
    if not is_remote(path):
        out = []
        try:
            f = open(path, "rb")
        except OSError as e:
            return [e] * len(ranges)
        with f:
            for s, e in ranges:
                f.seek(s)
                out.append(f.read(e - s))
        _count(requests=len(ranges), bytes=sum(len(b) for b in out))
        return [_check_length(path, b, s, e) for b, (s, e) in zip(out, ranges)]
    fs = filesystem(path, opts)
    out: list = [None] * len(ranges)
    todo = list(range(len(ranges)))
    for attempt in range(opts.retries + 1):
        _count(requests=len(todo))
        try:
            got = fs.cat_ranges([_strip(path)] * len(todo), [ranges[i][0] for i in todo],
                                [ranges[i][1] for i in todo], on_error="return", batch_size=opts.concurrency)
        except Exception as e:          # the call as a whole failed (not one range): every range met it
            got = [e] * len(todo)
        again = []
        for i, res in zip(todo, got):
            if isinstance(res, BaseException):
                kind = transient(res)
                if kind is None:
                    res = denied_or_missing(res, path)
                    if isinstance(res, FileNotFoundError):
                        _count(not_found=1)
                    out[i] = res
                elif attempt == opts.retries:
                    _count(**{"failed": 1, f"failed_{kind}": 1})
                    out[i] = RemoteIOError(f"{display(path)}[{ranges[i][0]}:{ranges[i][1]}]", kind, attempt + 1, res)
                else:
                    _count(**{"retries": 1, f"retry_{kind}": 1})
                    _warn(kind, "storage: %s [%d:%d]: %s (%s: %s), retry %d/%d", display(path), *ranges[i], kind,
                          type(res).__name__, str(res)[:120], attempt + 1, opts.retries)
                    again.append(i)
            else:
                _count(bytes=len(res))
                out[i] = _check_length(path, res, *ranges[i])
        if not again:
            break
        todo = again
        _sleep_before_retry(attempt, opts)
    return out


def _check_length(path: str, data: bytes, start: int, end: int):
    if len(data) == end - start:
        return data
    if len(data) >= end and is_remote(path):
        # an HTTP server that ignores Range sends the whole object: cut the range out of it
        _warn("no_range", "storage: %s: the server ignored the byte range (sent %d bytes): reads are whole files",
              display(path), len(data))
        return data[start:end]
    return EOFError(f"{display(path)}: range [{start}, {end}) runs past the end (got {len(data)} bytes): "
                    "truncated object")


def exists(path: str, opts: IOOptions = DEFAULT) -> bool:
    path = check_url(path)
    if not is_remote(path):
        return os.path.exists(path)
    fs = filesystem(path, opts)
    return bool(retrying(path, lambda: fs.exists(_strip(path)), opts))


def size(path: str, opts: IOOptions = DEFAULT) -> int:
    path = check_url(path)
    if not is_remote(path):
        return os.path.getsize(path)
    fs = filesystem(path, opts)
    return int(retrying(path, lambda: fs.size(_strip(path)), opts))


def listdir(path: str, opts: IOOptions = DEFAULT) -> list[str] | None:
    """Names of the files directly in a folder ([] when it does not exist); None where the store
    cannot list (plain HTTP servers): the caller then asks for each name it needs."""
    path = check_url(path)
    if not is_remote(path):
        return [p.name for p in Path(path).iterdir() if p.is_file()] if os.path.isdir(path) else []
    if protocol(path) in ("http", "https"):
        return None
    fs = filesystem(path, opts)
    try:
        entries = retrying(path, lambda: fs.ls(_strip(path), detail=True, refresh=True), opts)
    except FileNotFoundError:
        return []
    return [basename(e["name"]) for e in entries if e.get("type") == "file"]


def open_seekable(path: str, opts: IOOptions = DEFAULT, block_size: int = 1 << 20):
    """A read-only file object (range reads with a read-ahead buffer) for code that wants one
    (e.g. tarfile scanning the headers of a shard that has no member index)."""
    path = check_url(path)
    if not is_remote(path):
        return open(path, "rb")
    fs = filesystem(path, opts)
    _count(requests=1)
    return retrying(path, lambda: fs.open(_strip(path), "rb", block_size=block_size, cache_type="readahead"), opts)


# --------------------------------------------------------------------------- writes
def makedirs(path: str) -> None:
    """A local folder (object stores have no folders: nothing to do)."""
    if not is_remote(check_url(path)):
        Path(path).mkdir(parents=True, exist_ok=True)


def _writable(path: str) -> None:
    if protocol(path) in ("http", "https"):
        raise ValueError(f"{display(path)}: http(s):// is read-only here; write to a local folder, s3:// or gs://")


def write_bytes(path: str, data: bytes, opts: IOOptions = DEFAULT) -> None:
    """Publish `data` at `path` atomically: readers see the old object or the whole new one."""
    path = check_url(path)
    if not is_remote(path):
        from shards.atomic import write_bytes as local_write
        local_write(path, data)
        _count(requests=1, bytes_written=len(data))
        return
    _writable(path)
    fs = filesystem(path, opts)
    retrying(path, lambda: fs.pipe_file(_strip(path), data), opts)
    _count(bytes_written=len(data))


def write_text(path: str, text: str, opts: IOOptions = DEFAULT) -> None:
    write_bytes(path, text.encode("utf-8"), opts)


def put_file(local: str | os.PathLike, path: str, opts: IOOptions = DEFAULT) -> None:
    """Publish a finished local file at `path` (a URL, or a local path: moved there atomically)."""
    path = check_url(path)
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, path)
        return
    _writable(path)
    fs = filesystem(path, opts)
    n = os.path.getsize(local)
    retrying(path, lambda: fs.put_file(str(local), _strip(path)), opts)   # one PUT, or a multipart upload
    _count(bytes_written=n)                                                # completed at once at the end


def remove(path: str, opts: IOOptions = DEFAULT) -> None:
    path = check_url(path)
    if not is_remote(path):
        Path(path).unlink(missing_ok=True)
        return
    fs = filesystem(path, opts)
    try:
        retrying(path, lambda: fs.rm_file(_strip(path)), opts)
    except FileNotFoundError:
        pass


def snapshot() -> dict:
    """A copy of this process's counters (subtract two for the IO of what ran between them)."""
    with _lock:
        return dict(STATS)


def delta(before: dict, after: dict | None = None) -> dict:
    after = snapshot() if after is None else after
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
