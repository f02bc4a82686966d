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
    TCP reset), stall (send nothing until the test ends), 503, 403, 404."""

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
        if fault in ("503", "403"):
            return self._status(int(fault))
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


def test_a_store_that_is_down_or_denies_access_stops_the_reader(shard_dir, small_data, serve):
    """Skipping is for a bad shard or member, not for a store that is down (every read of a batch
    fails every retry: RemoteIOError) or refuses our credentials (403: PermissionError): those stop
    the reader with the reason instead of skipping the epoch sample by sample."""
    srv = serve(shard_dir)
    cfg = small_data(srv.url, train=True, batch_size=4, io_retries=1, io_backoff=0.01)
    srv.fault(".tar", "reset", count=10**6)
    with pytest.raises(storage.RemoteIOError, match="every read of a batch"):
        next(iter(StreamLoader(cfg)))
    srv.faults.clear()
    srv.fault(".tar", "403", count=10**6)
    with pytest.raises(PermissionError, match="access denied"):
        next(iter(StreamLoader(cfg)))


def test_http_caption_sidecars_are_counted_and_joined(shard_dir, small_data, serve, tmp_path):
    """Over HTTP (no listing), sidecars are found by asking for each and joined by key."""
    from shards.captions import count_sidecars, sidecar_path, write_sidecar
    root = tmp_path / "served"
    shutil.copytree(shard_dir, root)
    captioned = {}
    for name in load_shardset(root).names[:2]:
        keys = index_tar(str(root / name)).keys
        write_sidecar(sidecar_path(root / "captions", name), [{"key": k, "caption": f"caption of {k}"} for k in keys],
                      model="test")
        captioned.update({k: f"caption of {k}" for k in keys})
    srv = serve(root)
    assert count_sidecars(srv.url) == 2 and count_sidecars(root) == 2
    seen = 0
    for b in StreamLoader(small_data(srv.url, train=False, batch_size=4)):
        for key, has in zip(b["key"], b["has_caption"].tolist()):
            assert has == (key in captioned)
            seen += has
    assert seen == 4


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


# --------------------------------------------------------------------------- S3: the whole pipeline
class _Records(list):
    """A logging handler keeping every formatted record (the secret must be in none)."""

    def __init__(self):
        super().__init__()
        import logging
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = lambda r: self.append(f"{r.name}: {r.getMessage()}")


@pytest.fixture(scope="module")
def debug_log():
    import logging
    rec = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(rec.handler)
    root.setLevel(logging.DEBUG)
    yield rec
    root.removeHandler(rec.handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def s3_shards(s3, corpus, shard_dir, debug_log, tmp_path_factory):
    """The corpus built straight to S3 (2 local build processes, shards staged in a local folder)."""
    from vip.config import ShardBuildConfig
    cfg = ShardBuildConfig(metadata=f"{corpus}/metadata.jsonl", subtitles=f"{corpus}/subtitles.jsonl",
                           videos=f"{corpus}/videos", out=f"{s3}/shards", clips_per_shard=2, fps=8.0, short_side=64,
                           keyframe_interval=4, frame_short_side=64, workers=2,
                           staging=str(tmp_path_factory.mktemp("staging")))
    summary = build_shards(cfg)
    assert summary.shards_failed == 0 and summary.clips_written == 12, summary.table()
    return cfg


def _objects(url: str) -> dict:
    fs = storage.filesystem(url)
    return {p.split("/", 1)[1]: fs.cat_file(p) for p in fs.find(url.split("://", 1)[1])}


@pytest.mark.slow
def test_build_to_s3_is_the_local_build_and_resumes(s3_shards, shard_dir, s3):
    """The shards built to S3 are byte for byte the local build (tars, member indexes, counts); the
    staging folder is left empty; a re-run after a lost commit marker and a lost tar rebuilds just
    those two shards, and an uncommitted upload (tar, no marker) is never listed."""
    url = s3_shards.out
    objs = _objects(url)
    names = load_shardset(shard_dir).names
    for name in names:
        stem = name[:-4]
        assert objs[f"shards/{name}"] == (shard_dir / name).read_bytes(), name
        assert objs[f"shards/{stem}.index.json"] == (shard_dir / f"{stem}.index.json").read_bytes()
        assert f"shards/_parts/{stem}.json" in objs
    assert json.loads(objs["shards/shards.json"]) == json.loads((shard_dir / "shards.json").read_text())
    assert load_shardset(url).counts == load_shardset(shard_dir).counts
    assert not any(Path(s3_shards.staging).iterdir())
    # lose shard 2's commit marker (as if the job died between upload and marker) and shard 4's tar
    storage.remove(f"{url}/_parts/shard-000002.json")
    storage.remove(f"{url}/shard-000004.tar")
    from shards.build import merge_manifest
    assert [s["name"] for s in merge_manifest(url)["shards"]] == [n for n in names if n not in
                                                                   ("shard-000002.tar", "shard-000004.tar")]
    summary = build_shards(s3_shards)
    assert (summary.shards_built, summary.shards_already_done, summary.shards_failed) == (2, 4, 0), summary.table()
    again = _objects(url)
    assert {k: v for k, v in again.items() if k.startswith("shards/shard-")} == \
        {k: v for k, v in objs.items() if k.startswith("shards/shard-")}
    assert json.loads(again["shards/shards.json"]) == json.loads(objs["shards/shards.json"])


@pytest.fixture(scope="module")
def captioned_s3(s3_shards, shard_dir, tmp_path_factory):
    """The caption job run twice, as one Ray job each on a private local Ray on 127.0.0.1: on the
    S3 shards (sidecars written to S3, beside them) and on the local build (a local folder)."""
    pytest.importorskip("ray")
    from captioning.job import run_caption_job
    from captioning.tiny import make_tiny_coca
    from vip.config import CaptionConfig
    coca = make_tiny_coca(tmp_path_factory.mktemp("coca") / "tiny_coca")
    local_out = tmp_path_factory.mktemp("captions") / "captions"
    kw = dict(model=coca, pretrained=None, decoding="greedy", max_tokens=6, min_tokens=2, chunk_size=1,
              batch_size=2, num_actors=1, local_cpus=2)
    remote = run_caption_job(CaptionConfig(shards=s3_shards.out, **kw))
    local = run_caption_job(CaptionConfig(shards=str(shard_dir), out=str(local_out), **kw))
    return remote, local, local_out


def _sidecars(root: str, shards: str) -> dict:
    import io

    import pyarrow.parquet as pq
    rows = {}
    for name in load_shardset(shards).names:
        sc = storage.join(root, name.replace(".tar", ".parquet"))
        for r in pq.read_table(io.BytesIO(storage.read_bytes(sc))).to_pylist():
            assert r["key"] not in rows
            rows[r["key"]] = r["caption"]
    return rows


@pytest.mark.slow
def test_caption_job_writes_sidecars_to_s3(captioned_s3, s3_shards, shard_dir):
    """Every clip of the S3 shards gets exactly one caption in a sidecar written to S3, the same
    captions as the job gives on the local copy; a re-run finds them all done."""
    remote, local, local_out = captioned_s3
    assert remote.shards_written == 6 and remote.clips == 12 and remote.captions == 12, remote.table()
    assert remote.out == f"{s3_shards.out}/captions"
    got = _sidecars(remote.out, s3_shards.out)
    assert len(got) == 12 and got == _sidecars(str(local_out), str(shard_dir))
    from shards.captions import count_sidecars
    assert count_sidecars(s3_shards.out) == 6
    assert storage.exists(f"{remote.out}/caption_runs.jsonl")
    from captioning.job import run_caption_job
    from vip.config import CaptionConfig
    again = run_caption_job(CaptionConfig(shards=s3_shards.out, model="unused", pretrained=None))
    assert again.shards_already_done == 6 and again.shards_written == 0


def _train(shards, captions, out, steps=8, **extra):
    args = ["--config", "tiny", f"data.shards={shards}", f"data.captions={captions}", "data.batch_size=2",
            "data.num_workers=1", "data.num_frames=4", "data.image_size=32", "data.context_length=32",
            "data.io_backoff=0.05", f"train.out={out}", f"train.steps={steps}", "train.global_batch=2",
            "train.save_every=2", "train.log_every=1", "train.log_keys=true", "train.tensorboard=false",
            "loss.variant=d", "model.arch=vip-tiny", "model.num_proxies=2", "model.max_frames=4",
            *[f"{k}={v}" for k, v in extra.items()]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "vip.train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _logged_keys(out) -> list:
    recs = {}
    for line in (Path(out) / "keys" / "rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        recs[(rec["step"], rec["micro"])] = rec["keys"]
    return [recs[k] for k in sorted(recs)]


@pytest.mark.slow
def test_train_from_s3_kill_and_resume_reads_the_local_batches(captioned_s3, s3_shards, shard_dir, tmp_path,
                                                               debug_log, s3):
    """Pretraining from the S3 shards and S3 caption sidecars (1 process, a DataLoader worker),
    killed with SIGKILL after its step-4 checkpoint and resumed, consumes the same samples in the
    same order as training from the local copy. The S3 secret (in the environment) appears in no
    log line, console output, saved config or written file, locally or in the bucket."""
    _, _, local_caps = captioned_s3
    p = _train(shard_dir, local_caps, tmp_path / "local")
    log_local, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log_local[-3000:]
    ref = _logged_keys(tmp_path / "local")
    assert len(ref) == 8

    out = tmp_path / "s3run"
    p = _train(s3_shards.out, f"{s3_shards.out}/captions", out)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step00000004" / "COMPLETE").exists():
        assert p.poll() is None and time.time() < deadline, p.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    log_killed, _ = p.communicate()
    assert not (out / "final").exists()
    p = _train(s3_shards.out, f"{s3_shards.out}/captions", out)
    log_resumed, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log_resumed[-3000:]
    assert "resumed from step0000000" in log_resumed
    assert _logged_keys(out) == ref

    # no secret anywhere: logs of this process (build, caption job, reads at DEBUG), console
    # output of the runs, every file they wrote, every object in the bucket
    assert debug_log and not [r for r in debug_log if SECRET in r]
    for text in (log_local, log_killed, log_resumed):
        assert SECRET not in text
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert "s3://" in (out / "config.yaml").read_text()
    for key, data in _objects(s3).items():
        assert SECRET.encode() not in data, key


class S3Proxy(http.server.ThreadingHTTPServer):
    """A reverse proxy on 127.0.0.1 in front of the moto server that injects faults into the GETs
    passing through it (same kinds as RangeServer): S3 as a flaky network shows it."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream, self.faults, self.release, self.lock = upstream, [], threading.Event(), threading.Lock()
        super().__init__(("127.0.0.1", 0), ProxyHandler)

    fault, take_fault = RangeServer.fault, RangeServer.take_fault


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._forward()

    def do_HEAD(self):
        self._forward()

    def _forward(self):
        import http.client
        srv: S3Proxy = self.server
        fault = srv.take_fault(self.path) if self.command == "GET" else None
        if fault == "503":
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        host, port = srv.upstream.split("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(self.command, self.path, headers=dict(self.headers.items()))
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if fault == "stall":
            srv.release.wait(60)
            return
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "reset":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.mark.slow
def test_s3_faults_are_retried_and_a_missing_shard_is_skipped(s3_shards, shard_dir, small_data, s3, tmp_path):
    """Through a fault-injecting proxy in front of the S3 server: a reset mid-body, a 503 SlowDown
    and a response stalled past data.io_timeout are retried and counted, and the batches are the
    local ones; on a copy of the shard set without one tar (404), its samples are counted as
    missing_shard and the rest is read."""
    fs = storage.filesystem(s3)
    src = s3_shards.out.split("://", 1)[1]
    for p in fs.find(src):
        if "shard-000003.tar" not in p:
            fs.copy(p, p.replace(src, f"{BUCKET}/holed", 1))
    proxy = S3Proxy(os.environ["AWS_ENDPOINT_URL"])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    storage.reset_filesystems()
    try:
        cfg = small_data(shard_dir, train=False, batch_size=4, io_timeout=1.0, io_backoff=0.01,
                         captions=str(tmp_path / "no-captions"))   # the S3 set may be captioned by now
        local = _batches(StreamLoader(cfg), 3)
        proxy.fault("shard-000000.tar", "reset")
        proxy.fault("shard-000002.index.json", "503", count=2)
        proxy.fault("shard-000004.tar", "stall")
        loader = StreamLoader(dataclasses.replace(cfg, shards=s3_shards.out))
        _same_batches(local, _batches(loader, 3))
        assert not any(f[2] for f in proxy.faults), proxy.faults
        io = loader.io
        assert (io["retry_connection"], io["retry_5xx"], io["retry_timeout"], io["retries"]) == (1, 2, 1, 4), io
        assert not loader.events
        holed = StreamLoader(dataclasses.replace(cfg, shards=f"{s3}/holed"))
        keys = [k for b in holed for k in b["key"]]
        assert len(keys) == 10 and not set(keys) & set(index_tar(str(shard_dir / "shard-000003.tar")).keys)
        assert holed.events == {"missing_shard": 2}, holed.events
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        storage.reset_filesystems()
        proxy.release.set()
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.slow
def test_bench_data_remote_vs_local_quick(tmp_path):
    """`bench/data.py --remote moto` (its own moto server process on 127.0.0.1) prints the remote vs
    local table; the remote side read every clip (no event), with counted requests and bytes."""
    out = tmp_path / "data.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--quick", "--formats", "8:64:8", "--remote",
                        "moto", "--seconds", "1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Remote vs. local" in p.stdout and "remote / local" in p.stdout
    (row,) = json.loads(out.read_text())["formats"]
    r = row["remote"]
    assert r["url"].startswith("s3://") and r["moto"]
    for side in ("local", "remote"):
        assert r[side]["batches"] >= 1 and r[side]["events"] == 0 and r[side]["per_core"] > 0
    # every remote batch reads its shards by range requests (≤ its 8 samples' 24 members), and bytes
    assert 1 <= r["remote"]["requests_per_batch"] < 24 and r["remote"]["bytes_per_batch"] > 0
    assert r["remote_over_local_per_core"] == pytest.approx(r["remote"]["per_core"] / r["local"]["per_core"])


@pytest.mark.slow
def test_ray_build_to_s3(s3, s3_shards, shard_dir, tmp_path):
    """The shard build as Ray tasks (a private local Ray on 127.0.0.1) writes to S3 from the task
    processes, which take the credentials from their own environment: the same bytes as the local build."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    try:
        cfg = dataclasses.replace(s3_shards, out=f"{s3}/ray-shards", ray_address="local", workers=2,
                                  staging=str(tmp_path / "staging"))
        summary = build_shards(cfg)
        assert summary.shards_built == 6 and summary.shards_failed == 0, summary.table()
        for name in load_shardset(shard_dir).names:
            assert storage.read_bytes(f"{cfg.out}/{name}") == (shard_dir / name).read_bytes(), name
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
