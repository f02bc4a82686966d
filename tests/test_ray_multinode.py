"""The shard build and the caption job on a two-node Ray cluster on this machine (both nodes on
127.0.0.1, Ray's own multi-node test cluster), with the worker node killed mid-job.

Each test runs a driver in a subprocess (Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 at import,
which keeps every address on loopback): it starts a head node and a worker node (each with its own
custom resource, so results name them), runs the job, kills the worker node (all its processes,
no drain) as soon as the first result from it is in, and prints what ran where as JSON."""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"     # before Ray is imported: loopback stays loopback
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
import ray
import ray._private.utils
from ray.cluster_utils import Cluster

# this test cluster is not recorded as "the current cluster" of the machine (/tmp/ray): another
# process's ray.init() without an address must never join it
ray._private.utils.write_ray_address = lambda *a, **k: None
mode, arg = sys.argv[1], json.loads(sys.argv[2])
common = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}
head = {**common, "num_cpus": arg["head_cpus"], "resources": {"head": 1}, "include_dashboard": False,
        "temp_dir": arg["temp"]}
cluster = Cluster(initialize_head=True, head_node_args=head)
worker = cluster.add_node(**common, num_cpus=arg["worker_cpus"], resources={"worker": 1})
ray.init(address=cluster.address, log_to_driver=False)
ids = {("worker" if "worker" in n["Resources"] else "head"): n["NodeID"] for n in ray.nodes() if n["Alive"]}
killed = []

def kill_if_from_worker(node):
    if arg["kill"] and not killed and node == ids["worker"]:
        cluster.remove_node(worker, allow_graceful=False)     # every process of the node, no drain
        killed.append(True)

try:
    if mode == "build":
        from shards.build import build_shards
        from shards.config import ShardBuildConfig
        cfg = ShardBuildConfig(**{**arg["cfg"], "ray_address": cluster.address})
        s = build_shards(cfg, on_shard_done=lambda summary, res: kill_if_from_worker(res.node))
        out = {"nodes": dict(s.nodes), "built": s.shards_built, "failed": s.shards_failed, "failures": s.failures}
    else:
        from captioning.config import CaptionConfig
        from captioning.job import run_caption_job
        def hook(job):           # the worker's actor has captioned a chunk and holds more: kill the node
            busy = any(n == ids["worker"] and job.load[slot] > 0 for slot, n in job.slot_nodes.items())
            kill_if_from_worker(ids["worker"] if busy else None)
        s = run_caption_job(CaptionConfig(**arg["cfg"], ray_address=cluster.address), on_chunk_done=hook)
        out = {"nodes": dict(s.nodes), "written": s.shards_written, "failed": s.shards_failed, "clips": s.clips,
               "captions": s.captions, "failures": dict(s.failures), "restarts": s.actor_restarts,
               "retries": s.chunk_retries}
    out.update(ids=ids, killed=bool(killed))
    print("RESULT " + json.dumps(out), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


def _drive(tmp_path, mode, arg, timeout=420):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    temp = tempfile.mkdtemp(prefix="vr", dir="/tmp")           # Ray's socket paths are length-limited
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    try:
        p = subprocess.run([sys.executable, str(script), mode, json.dumps({**arg, "temp": temp})], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(["rm", "-rf", temp])
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout[-3000:], p.stderr[-5000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_build_on_two_nodes_survives_losing_the_worker_node(corpus, small_build, tmp_path):
    """6 shards built by Ray tasks spread over a head and a worker node; the worker node is
    killed when its first shard is in. Every shard is built (none failed), each tar and part
    record exists once, the manifest lists every clip once, and both nodes built shards."""
    from shards.reader import load_shardset
    out = tmp_path / "shards"
    cfg = dataclasses.asdict(small_build(corpus, out, workers=1))
    res = _drive(tmp_path, "build", {"cfg": cfg, "head_cpus": 2, "worker_cpus": 2, "kill": True})
    assert res["killed"] and res["failed"] == 0 and res["built"] == 6, res
    assert set(res["nodes"]) == {res["ids"]["head"], res["ids"]["worker"]}, res   # work landed on both
    assert sum(res["nodes"].values()) == 6
    tars = sorted(p.name for p in out.glob("shard-*.tar"))
    assert tars == [f"shard-{i:06d}.tar" for i in range(6)]
    assert not list(out.glob(".*.tmp")) and len(list((out / "_parts").glob("shard-*.json"))) == 6
    import pyarrow.parquet as pq
    keys = pq.read_table(out / "manifest.parquet").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 12 and load_shardset(out).num_samples == 12


@pytest.mark.slow
def test_caption_job_on_two_nodes_survives_losing_the_worker_node(shard_dir, tmp_path):
    """Two captioner actors spread over a head and a worker node; the worker node is killed once
    its actor has returned a chunk while it holds more (so calls are lost with it). Every clip of every shard is captioned exactly once (one sidecar per
    shard, its keys the tar's, no clip twice), and both nodes captioned clips."""
    from captioning.tiny import make_tiny_coca
    from shards.captions import read_sidecar, sidecar_path
    from shards.reader import load_shardset
    from shards.tarindex import index_tar
    model = make_tiny_coca(tmp_path / "coca")
    out = tmp_path / "captions"
    cfg = dict(shards=str(shard_dir), out=str(out), model=model, pretrained=None, decoding="greedy", max_tokens=4,
               min_tokens=1, chunk_size=1, batch_size=1, num_actors=2, actor_cpus=1.0, decode_cpus=0.5, device="cpu",
               max_attempts=4)
    res = _drive(tmp_path, "caption", {"cfg": cfg, "head_cpus": 3, "worker_cpus": 2, "kill": True})
    assert res["killed"] and res["failed"] == 0 and res["written"] == 6, res
    assert res["captions"] == res["clips"] == 12 and not res["failures"], res
    assert set(res["nodes"]) == {res["ids"]["head"], res["ids"]["worker"]}, res
    assert res["restarts"] >= 1                      # the worker's actor was replaced on the head
    shards = load_shardset(shard_dir)
    for name in shards.names:
        caps = read_sidecar(sidecar_path(out, name))
        assert sorted(caps) == sorted(index_tar(str(Path(shard_dir) / name)).keys)
        assert all(isinstance(c, str) and c for c in caps.values())
