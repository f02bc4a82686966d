"""Remote vs. local reading of the same shards, for `bench/data.py --remote …` / `--shards s3://…`.

The worker path (`shards.reader.ClipStream` in this process: range reads, member index, decode,
tokenise, collate) is timed twice on one shard set: from a local folder and from object storage.
Reported per side: clips per CPU-second of this process (all its threads: fsspec's IO thread
included; the storage server's CPU is not, it runs in another process), clips per wall-second
(one worker, so the request latency shows), and, remotely, range requests, bytes and retries per
batch (the reader's own counters, shards/storage.py). The ratio remote / local of clips/s/core is
what object storage costs a data-loading core.

`--remote moto` starts moto's S3 server (`python -m moto.server`) on 127.0.0.1 in a separate
process, with throw-away credentials in this process's AWS_* variables, and uploads the shards
there; `--remote s3://bucket/prefix` uploads them to a real store (credentials from the usual AWS
environment/config); `--shards s3://…` measures an existing remote set against a local copy
downloaded first.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_FILES = ("shards.json", "build_config.yaml", "manifest.parquet")


@contextlib.contextmanager
def moto_s3(bucket: str = "vip-bench"):
    """A moto S3 server in its own process on 127.0.0.1 (a free port); yields s3://bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto's S3 server did not start (pip install 'moto[server]')") from None
                time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        from shards import storage
        storage.reset_filesystems()
        storage.filesystem("s3://x").mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def _shard_files(names: list[str]) -> list[str]:
    return [*SHARD_FILES, *names, *(n[:-4] + ".index.json" for n in names)]


def upload(local: Path, url: str) -> None:
    """A local shard set (tars, member indexes, shards.json, …) → url/…"""
    from shards import storage
    from shards.reader import load_shardset
    for name in _shard_files(list(load_shardset(local).names)):
        if (local / name).is_file():
            storage.write_bytes(storage.join(url, name), (local / name).read_bytes())


def download(url: str, local: Path) -> Path:
    """A remote shard set → a local folder (for the local side of the comparison)."""
    from shards import storage
    from shards.reader import load_shardset
    local.mkdir(parents=True, exist_ok=True)
    for name in _shard_files(list(load_shardset(url).names)):
        try:
            (local / name).write_bytes(storage.read_bytes(storage.join(url, name)))
        except FileNotFoundError:
            pass
    return local


def measure_side(s, root: str) -> dict:
    """The worker path over `root` (a folder or a URL): clips/s/core, wall clips/s, IO per batch."""
    import collections

    from bench.data_paths import data_config, timed
    from shards import storage
    from shards.reader import StreamLoader
    stream = iter(StreamLoader(data_config(s, root, 0)).dataset())
    next(stream)                                   # warm up: shard set, tokenizer, first shards opened
    io: collections.Counter = collections.Counter()
    counts = {"batches": 0, "events": 0}

    def step() -> int:
        batch = next(stream)
        io.update(batch["_io"])
        counts["batches"] += 1
        counts["events"] += len(batch["_events"])
        return len(batch["key"])

    s0 = storage.snapshot()
    t = timed(step, s.seconds, min_clips=3 * s.batch_size)
    n = max(1, counts["batches"])
    return {"timing": t.to_dict(), "per_core": t.per_core, "wall_clips_per_s": t.wall_rate,
            "batches": counts["batches"], "events": counts["events"],
            "requests_per_batch": io["requests"] / n, "bytes_per_batch": io["bytes"] / n,
            "retries": io["retries"], "io": storage.delta(s0)}


def measure_pair(s, local: Path, url: str) -> dict:
    local_row = measure_side(s, str(local))
    remote_row = measure_side(s, url)
    return {"url": url, "local": local_row, "remote": remote_row,
            "remote_over_local_per_core": remote_row["per_core"] / local_row["per_core"],
            "remote_over_local_wall": remote_row["wall_clips_per_s"] / local_row["wall_clips_per_s"]}


def remote_table(res: dict) -> str:
    from bench import md_table
    head = ["content", "format", "store", "local clips/s/core", "remote clips/s/core", "**remote / local**",
            "local wall clips/s", "remote wall clips/s", "requests / batch", "KB / batch", "KB / request",
            "retries"]
    rows = []
    for r in res["formats"]:
        p = r.get("remote")
        if not p:
            continue
        lo, re_ = p["local"], p["remote"]
        rows.append([r["content"], r["label"], p["url"].split("://", 1)[0] + "://" + ("(moto, 127.0.0.1)" if p.get(
            "moto") else p["url"].split("://", 1)[1]), f"{lo['per_core']:.1f}", f"{re_['per_core']:.1f}",
            f"**{p['remote_over_local_per_core']:.2f}**", f"{lo['wall_clips_per_s']:.1f}",
            f"{re_['wall_clips_per_s']:.1f}", f"{re_['requests_per_batch']:.1f}",
            f"{re_['bytes_per_batch'] / 1e3:,.0f}",
            f"{re_['bytes_per_batch'] / max(1e-9, re_['requests_per_batch']) / 1e3:,.0f}", str(re_["retries"])])
    return md_table(head, rows) if rows else ""


@contextlib.contextmanager
def remote_target(spec: str | None):
    """--remote moto | s3://… | gs://… → a URL prefix to upload to (None: no remote measurement)."""
    if not spec:
        yield None
    elif spec == "moto":
        with moto_s3() as url:
            yield url
    else:
        yield spec.rstrip("/")


def local_copy_of(url: str) -> Path:
    return download(url, Path(tempfile.mkdtemp(prefix="vip-bench-remote-")))
