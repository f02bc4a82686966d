"""Shards on object storage (shards/storage.py, docs/scaling.md "Object storage"): the member index,
range reads from a real HTTP server and a real S3-compatible server (moto's server mode), both on
127.0.0.1 and started here, injected faults (a connection reset mid-read, a response that stalls
past the timeout, 5xx, a missing shard), and the whole pipeline against S3: build → caption →
train → kill → resume, with the same batches as from local disk, and no secret in any log or
saved file."""
from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from shards import storage
from shards.build import build_shards
from shards.reader import StreamLoader, load_shardset
from shards.tarindex import TarReader, index_path, index_tar, open_index, parse_index

ROOT = Path(__file__).resolve().parents[1]
SECRET = "vipTESTsecret0123456789abcdefNEVERLOG"     # the S3 secret key: must appear in no log or file
ACCESS = "VIPTESTACCESSKEY"
BUCKET = "vip-test"


# --------------------------------------------------------------------------- servers
class RangeServer(http.server.ThreadingHTTPServer):
    """Serves a folder over HTTP/1.1 with byte ranges, and injects faults on request: for the next
    `count` GETs whose path contains `match`, `kind` is one of reset (send half the range, then a
    TCP reset), stall (send nothing until the test ends), 503, 404."""

    daemon_threads = True

    def __init__(self, root: Path):
        self.root, self.faults, self.log, self.release = Path(root), [], [], threading.Event()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), RangeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault(self, match: str, kind: str, count: int = 1) -> None:
        with self.lock:
            self.faults.append([match, kind, count])

    def take_fault(self, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f[0] in path and f[2] > 0:
                    f[2] -= 1
                    return f[1]
        return None

    def gets(self, suffix: str) -> list:
        """(path, Range header) of the GETs of paths ending in `suffix`, in order."""
        with self.lock:
            return [(p, r) for m, p, r in self.log if m == "GET" and p.endswith(suffix)]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        srv: RangeServer = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((self.command, self.path, rng))
        fault = srv.take_fault(self.path) if body else None
        file = srv.root / self.path.lstrip("/").split("?")[0]
        if fault == "404" or not file.is_file():
            return self._status(404)
        if fault == "503":
            return self._status(503)
        data = file.read_bytes()
        start, end, status = 0, len(data), 200
        if rng and rng.startswith("bytes="):
            a, b = rng[6:].split("-")
            start, end, status = int(a), min(len(data), int(b) + 1 if b else len(data)), 206
        part = data[start:end]
        if fault == "stall":
            srv.release.wait(60)
            return
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if not body:
            return
        if fault == "reset":
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()           # RST: the client sees the connection drop mid-body
            self.close_connection = True
            return
        self.wfile.write(part)

    def _status(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def serve():
    """serve(folder) → RangeServer on 127.0.0.1 (a port chosen by the OS), stopped after the test."""
    servers = []

    def start(root):
        srv = RangeServer(root)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server (ThreadedMotoServer) on 127.0.0.1; the credentials and endpoint reach the
    filesystems only through the standard AWS_* variables. Yields the bucket URL."""
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": ACCESS,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage.filesystem(f"s3://{BUCKET}").mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _keys(loader, n=None):
    out = []
    for b in loader:
        out.append(list(b["key"]))
        if n is not None and len(out) == n:
            break
    return out


def _batches(loader, n):
    out = []
    for b in loader:
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        if len(out) == n:
            break
    return out


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for k in ("video", "frame", "subtitle", "caption", "has_caption"):
            assert torch.equal(x[k], y[k]), k


# --------------------------------------------------------------------------- member index
def test_member_index_matches_the_tar_headers(shard_dir):
    """The builder's member index (beside every tar) gives exactly what scanning the tar's headers
    gives; a reader opening the shard uses it and never scans; a stale index is not trusted."""
    names = load_shardset(shard_dir).names
    for name in names:
        tar = str(shard_dir / name)
        scanned = index_tar(tar)
        idx, tar_bytes = parse_index(tar, Path(index_path(tar)).read_bytes())
        assert tar_bytes == os.path.getsize(tar)
        assert idx.keys == scanned.keys and idx.members == scanned.members and len(idx) == 2
        assert open_index(tar).source == "index"
        r = TarReader(tar)
        for key in idx.keys:
            assert set(idx.members[key]) == {"mp4", "jpg", "json"}
            assert json.loads(r.read(key, "json"))["key"] == key
        r.close()


def test_stale_or_garbled_index_falls_back_to_the_headers(shard_dir, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shard_dir, out)
    tar = str(out / "shard-000000.tar")
    Path(index_path(tar)).write_bytes(b"{not json")
    assert open_index(tar).source == "headers" and len(open_index(tar)) == 2
    Path(index_path(tar)).write_bytes((shard_dir / "shard-000001.index.json").read_bytes())   # another tar's
    idx = open_index(tar)                                     # (the sizes differ: 2 different clips)
    assert idx.keys == index_tar(tar).keys


# --------------------------------------------------------------------------- HTTP: reads, coalescing, resume
def test_http_reader_gives_the_local_batches_with_few_range_requests(shard_dir, small_data, serve):
    """Reading the shards from an HTTP server gives bit-identical batches (train order, 2 epochs);
    each shard is opened by its member index (one small GET), never by scanning the tar; every
    tar read is a byte range; a batch reads each of its shards with one request, not three per
    sample; and the loader counts the requests and bytes."""
    srv = serve(shard_dir)
    cfg = small_data(shard_dir, train=True, batch_size=3)
    local = _batches(StreamLoader(cfg), 8)
    loader = StreamLoader(dataclasses.replace(cfg, shards=f"{srv.url}/"))
    remote = _batches(loader, 8)
    _same_batches(local, remote)
    tar_gets = srv.gets(".tar")
    assert tar_gets and all(r and r.startswith("bytes=") for _, r in tar_gets)      # never a whole tar
    # one range request per (batch, shard it reads): a shard's samples merge into one read
    shard_of = {k: n for n in load_shardset(shard_dir).names for k in index_tar(str(shard_dir / n)).keys}
    per_batch = [len({shard_of[k] for k in b["key"]}) for b in remote]
    samples = sum(len(b["key"]) for b in remote)
    assert len(tar_gets) == sum(per_batch) < 3 * samples, (len(tar_gets), per_batch)
    opened = srv.gets(".index.json")
    assert len(opened) <= 2 * len(load_shardset(shard_dir).names)   # once per shard per epoch at most
    assert loader.io["requests"] >= len(tar_gets) and loader.io["bytes"] > 0 and not loader.io["retries"]


def test_http_resume_is_exact(shard_dir, small_data, serve):
    srv = serve(shard_dir)
    cfg = small_data(f"{srv.url}", train=True, batch_size=2, num_workers=2)
    ref = _keys(StreamLoader(small_data(shard_dir, train=True, batch_size=2)), 10)
    first = StreamLoader(cfg)
    assert _keys(first, 4) == ref[:4]
    state = first.state_dict()
    again = StreamLoader(cfg)
    again.load_state_dict(state)
    assert _keys(again, 6) == ref[4:10]


# --------------------------------------------------------------------------- HTTP: faults
def test_reset_stall_and_5xx_are_retried_and_counted(shard_dir, small_data, serve):
    """A connection reset mid-body, a response that stalls past data.io_timeout and a 503 are
    retried (with backoff) and counted; the batches are still the local ones."""
    srv = serve(shard_dir)
    cfg = small_data(shard_dir, train=False, batch_size=4, io_timeout=1.0, io_backoff=0.01)
    local = _batches(StreamLoader(cfg), 3)
    srv.fault("shard-000000.tar", "reset")
    srv.fault("shard-000002.tar", "stall")
    srv.fault("shard-000004.tar", "503", count=2)
    srv.fault("shard-000001.index.json", "reset")
    loader = StreamLoader(dataclasses.replace(cfg, shards=srv.url))
    remote = _batches(loader, 3)
    _same_batches(local, remote)
    assert not any(f[2] for f in srv.faults), srv.faults          # every fault was met
    io = loader.io
    assert io["retry_connection"] == 2 and io["retry_timeout"] == 1 and io["retry_5xx"] == 2, io
    assert io["retries"] == 5 and not io["failed"] and not loader.events, (io, loader.events)


def test_missing_shard_and_unreadable_member_are_counted_and_skipped(shard_dir, small_data, serve, tmp_path):
    """A shard gone from the server (404) costs only its samples (`missing_shard`); a member that
    fails every retry costs its sample (`corrupt_member`); the rest of the epoch is read."""
    root = tmp_path / "served"
    shutil.copytree(shard_dir, root)
    (root / "shard-000003.tar").unlink()
    Path(index_path(str(root / "shard-000003.tar"))).unlink()
    srv = serve(root)
    cfg = small_data(srv.url, train=False, batch_size=4, io_retries=2, io_backoff=0.01)
    srv.fault("shard-000005.tar", "reset", count=3)                 # 1 try + 2 retries: the range fails
    loader = StreamLoader(cfg)
    keys = [k for b in loader for k in b["key"]]
    missing = set(index_tar(str(shard_dir / "shard-000003.tar")).keys)
    lost = set(index_tar(str(shard_dir / "shard-000005.tar")).keys)
    everything = {k for n in load_shardset(shard_dir).names for k in index_tar(str(shard_dir / n)).keys}
    assert set(keys) == everything - missing - lost and len(keys) == len(set(keys)) == 8
    assert loader.events["missing_shard"] == 2 and loader.events["corrupt_member"] == 2, loader.events
    assert loader.io["failed_connection"] == 1 and loader.io["retry_connection"] == 2, loader.io


def test_credentials_in_urls_are_refused(small_data):
    for url in (f"s3://{ACCESS}:{SECRET}@bucket/shards", f"https://user:{SECRET}@example.org/shards"):
        with pytest.raises(ValueError) as e:
            load_shardset(url)
        assert SECRET not in str(e.value) and "credentials" in str(e.value)
    with pytest.raises(ValueError, match="read-only"):
        storage.write_bytes("http://127.0.0.1:9/x", b"x")


def test_transient_classification():
    """What is retried: timeouts, dropped connections, 5xx/429 (through wrapped causes); what is
    not: 404, 403, other 4xx, bad data."""
    class ClientResponseError(Exception):
        def __init__(self, status):
            self.status = status

    class ReadTimeoutError(Exception):
        pass
    wrapped = OSError("remote said no")
    wrapped.__cause__ = ClientResponseError(503)
    assert storage.transient(TimeoutError()) == "timeout" and storage.transient(ReadTimeoutError()) == "timeout"
    assert storage.transient(ConnectionResetError()) == "connection"
    assert storage.transient(wrapped) == "5xx" and storage.transient(ClientResponseError(429)) == "5xx"
    for e in (FileNotFoundError("x"), PermissionError("x"), ClientResponseError(403), ValueError("bad")):
        assert storage.transient(e) is None, e
