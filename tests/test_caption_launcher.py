"""launch/caption.sh starting and stopping its own Ray head (docs/captioning.md, "Stopping and
failures"): a head that cannot start is reported at once (a port in use; `ray start` exiting, with its
output), a head that never answers is stopped after --start-timeout, and a signal to the script's
process group (SIGTERM, or SIGKILL through the watcher) stops the running job before the head, so no
driver is left writing sidecars. Every listener on 127.0.0.1, every port chosen at run time."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from captioning.tiny import make_tiny_coca

REPO = Path(__file__).resolve().parents[1]
CAPTION = REPO / "launch" / "caption.sh"


@pytest.fixture(scope="module")
def tiny_coca(tmp_path_factory) -> str:
    return make_tiny_coca(tmp_path_factory.mktemp("coca") / "tiny_coca")


@pytest.fixture
def ports(free_port) -> list[int]:
    """GCS, dashboard, agent and client ports: four distinct ones, free now."""
    out: list[int] = []
    while len(out) < 4:
        port = free_port()
        out += [port] if port not in out else []
    return out


@pytest.fixture
def ray_temp():
    """Ray's --temp-dir: short (its socket paths are length-limited), removed afterwards."""
    d = tempfile.mkdtemp(prefix="r", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(tmp_path):
    """No outside cluster; the head's log file (and anything else temporary) under tmp_path."""
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
             RAY_USAGE_STATS_ENABLED="0")
    return e


def head_args(ports, temp) -> list[str]:
    return ["--port", str(ports[0]), "--dashboard-port", str(ports[1]), "--agent-port", str(ports[2]),
            "--client-port", str(ports[3]), "--num-cpus", "2", "--temp-dir", str(temp), "--python", sys.executable]


def processes_with(text: str) -> list[str]:
    """Command lines (arguments joined by spaces) of the processes whose command line contains text."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{d.name}: {cmd[:300]}")
    return found


def wait_until_gone(text: str, timeout: float) -> list[str]:
    """Poll until no process mentions text (or timeout); what is left."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*")} if folder.exists() else {}


# --------------------------------------------------------------------------- a head that cannot start
def test_port_in_use_is_reported_at_once(ports, ray_temp, env, tmp_path):
    """The GCS port held by a plain listening socket: reported before `ray start` runs (Ray itself
    would give up only after ~40 s of retries), exit 1, nothing started."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[0]))
        busy.listen()
        t0 = time.monotonic()
        p = subprocess.run(["bash", str(CAPTION), *head_args(ports, ray_temp), "--", "caption.shards=/nowhere"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    assert took < 30, took
    assert "failed to start" in p.stderr and f"127.0.0.1:{ports[0]} (--port)" in p.stderr, p.stderr
    assert "in use" in p.stderr, p.stderr
    assert "ray job submit" not in p.stderr and not processes_with(ray_temp)


@pytest.mark.slow
def test_head_that_exits_is_reported_at_once_with_its_output(ports, env, tmp_path):
    """`ray start` exits at once (here its --temp-dir is under a regular file): reported as soon as it
    has exited, with the end of its own output, exit 1; no 120 s wait."""
    (tmp_path / "file").write_text("not a folder")
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(CAPTION), *head_args(ports, tmp_path / "file" / "r"), "--",
                        "caption.shards=/nowhere"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    assert took < 30, (took, p.stderr)
    assert "the Ray head failed to start (exit 1)" in p.stderr, p.stderr
    assert "NotADirectoryError" in p.stderr, p.stderr          # Ray's own traceback, from the head's log
    assert "ray job submit" not in p.stderr
    logs = list(tmp_path.glob("vip-caption-head.*"))          # kept for a head that failed
    assert len(logs) == 1 and "NotADirectoryError" in logs[0].read_text()


@pytest.mark.slow
def test_head_that_never_answers_is_stopped_after_start_timeout(ports, ray_temp, env, tmp_path):
    """--start-timeout 1: a head still starting after 1 s is reported with its output and stopped."""
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(CAPTION), *head_args(ports, ray_temp), "--start-timeout", "1", "--",
                        "caption.shards=/nowhere"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    assert "did not answer" in p.stderr and "within 1 s (--start-timeout)" in p.stderr, p.stderr
    assert "stopping the Ray head" in p.stderr and "ray job submit" not in p.stderr, p.stderr
    assert took < 60, took
    assert not wait_until_gone(ray_temp, 10), processes_with(ray_temp)
    assert port_closed(ports[1])


# --------------------------------------------------------------------------- stopped mid-job
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killing_the_launcher_stops_the_job_and_the_head(sig, shard_dir, tiny_coca, ports, ray_temp, env,
                                                         tmp_path):
    """A slow job (beam search, one clip per call) is writing sidecars when the script's process group
    is signalled. SIGTERM: the script stops the job (and waits for it) before the head, exits 143.
    SIGKILL: the watcher does the same. Either way no driver is left and nothing more is written."""
    shards, out = tmp_path / "shards", tmp_path / "captions"
    shutil.copytree(shard_dir, shards, ignore=shutil.ignore_patterns("captions"))
    log_path = tmp_path / "launcher.log"
    cmd = ["bash", str(CAPTION), *head_args(ports, ray_temp), "--", f"caption.shards={shards}",
           f"caption.out={out}", f"caption.model={tiny_coca}", "caption.pretrained=null", "caption.decoding=beam",
           "caption.max_tokens=60", "caption.min_tokens=2", "caption.chunk_size=1", "caption.batch_size=1",
           "caption.num_actors=1"]
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.parquet")):          # the job runs and writes sidecars
            assert p.poll() is None, log_path.read_text()[-6000:]
            assert time.monotonic() < deadline, log_path.read_text()[-6000:]
            time.sleep(0.2)
        drivers = [c for c in processes_with(str(out)) if "job submit" not in c]   # not the log-tail client
        assert drivers, "no driver process found"
        os.killpg(p.pid, sig)
        rc = p.wait(timeout=60)
        text = log_path.read_text()
        if sig == signal.SIGTERM:
            assert rc == 128 + signal.SIGTERM, text[-6000:]
            assert "got SIGTERM" in text and "stopping job vip-caption-" in text, text[-6000:]
            stopped, head = text.index("has stopped"), text.index("stopping the Ray head")
            assert stopped < head, text[-6000:]                 # the job first, then its head
            left = wait_until_gone(str(out), 2)                 # the driver is gone by the time we exit
            assert not left, left
        else:
            assert rc == -signal.SIGKILL
            left = wait_until_gone(str(out), 40)                # the watcher stops the job ...
            assert not left, left
        left = wait_until_gone(ray_temp, 30)                    # ... and the head
        assert not left, left
        assert not wait_until_gone(f"caption.sh-watcher {p.pid} ", 5)
        assert port_closed(ports[1])
        before = snapshot(out)
        time.sleep(5)
        assert snapshot(out) == before                          # no orphan writes sidecars
        assert len(list(out.glob("shard-*.parquet"))) < 6       # (the job was cut short)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
