"""Captioning (docs/captioning.md): captioners, the Ray job, fault tolerance, sidecars, reader integration,
and `launch/caption.sh`. Tiny random-weight models built here and loaded from local folders; every Ray
listener on 127.0.0.1; one in-process Ray cluster shared by the module."""
from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from captioning.captioners import build_captioner, file_digest
from captioning.frames import load_chunk, plan_chunks
from captioning.job import run_caption_job
from captioning.tiny import make_tiny_blip, make_tiny_coca
from shards.captions import sidecar_path
from shards.reader import StreamLoader, load_shardset
from shards.tarindex import index_tar
from vip.config import CaptionConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tiny_coca(tmp_path_factory) -> str:
    return make_tiny_coca(tmp_path_factory.mktemp("coca") / "tiny_coca")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    return make_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny_blip")


@pytest.fixture(scope="module")
def ray_local():
    """One private Ray cluster on loopback for the module's job tests."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def ccfg(shards, out, model, **kw) -> CaptionConfig:
    base = dict(shards=str(shards), out=str(out) if out else None, model=model, pretrained=None, decoding="greedy", max_tokens=6,
                min_tokens=2, chunk_size=1, batch_size=2, num_actors=1)
    base.update(kw)
    return CaptionConfig(**base)


def tar_keys(shards) -> dict[str, list[str]]:
    ss = load_shardset(shards)
    return {name: index_tar(str(Path(shards) / name)).keys for name in ss.names}


def sidecar_rows(out) -> list[dict]:
    rows = []
    for p in sorted(Path(out).glob("shard-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            rows.append({**r, "shard": p.stem})
    return rows


def assert_exactly_once(shards, out, allow_errors: dict | None = None) -> list[dict]:
    """One row per key across all sidecars, every key of every shard present, captions non-null
    except for the keys in allow_errors ({key: error prefix})."""
    allow_errors = allow_errors or {}
    rows = sidecar_rows(out)
    counts = collections.Counter(r["key"] for r in rows)
    assert all(c == 1 for c in counts.values()), [k for k, c in counts.items() if c > 1]
    expected = tar_keys(shards)
    for name, keys in expected.items():
        got = [r["key"] for r in rows if r["shard"] == Path(name).stem]
        assert got == keys, (name, got, keys)  # tar order, nothing missing, nothing extra
    for r in rows:
        if r["key"] in allow_errors:
            assert r["caption"] is None and r["error"].startswith(allow_errors[r["key"]]), r
        else:
            assert isinstance(r["caption"], str) and r["caption"].strip() and r["error"] is None, r
    return rows


# --------------------------------------------------------------------------- captioners (no Ray)
def test_coca_captioner_batches_and_provenance(tiny_coca):
    cap = build_captioner(CaptionConfig(model=tiny_coca, pretrained=None, decoding="greedy", max_tokens=6,
                                        min_tokens=2, device="cpu"))
    assert cap.input_spec.size == 32 and cap.input_spec.resize == "crop"
    imgs = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = cap.caption(imgs, ["a", "b", "c"])
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    assert "<start_of_text>" not in out[0] and "<end_of_text>" not in out[0]
    assert cap.caption(imgs, ["a", "b", "c"]) == out  # greedy is deterministic
    folder = Path(tiny_coca.split(":", 1)[1])
    prov = cap.provenance
    assert prov.model == f"open_clip:{tiny_coca}"
    assert prov.model_tag == file_digest([folder / "open_clip_model.safetensors"]) and prov.model_tag.startswith("sha256:")
    g = prov.generation
    assert g["decoding"] == "greedy" and g["generation_type"] == "top_k" and g["top_k"] == 1
    assert g["seq_len"] == 7 and g["precision"] == "fp32" and g["device"] == "cpu" and g["prompt"] is None
    json.dumps(g)  # stored as JSON in the sidecar


def test_coca_decoding_choices(tiny_coca):
    """auto → greedy on CPU; beam search runs (slow on CPU, so only a tiny one here); sampling is seeded."""
    cap = build_captioner(CaptionConfig(model=tiny_coca, pretrained=None, max_tokens=6, min_tokens=2, device="cpu"))
    assert cap.provenance.generation["decoding"] == "greedy"
    imgs = np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    beam = build_captioner(CaptionConfig(model=tiny_coca, pretrained=None, decoding="beam", num_beams=2,
                                         num_beam_groups=1, max_tokens=4, min_tokens=1, device="cpu"))
    assert len(beam.caption(imgs, ["x", "y"])) == 2
    assert beam.provenance.generation["generation_type"] == "beam_search"
    samp = build_captioner(CaptionConfig(model=tiny_coca, pretrained=None, decoding="top_p", max_tokens=6,
                                         min_tokens=2, device="cpu", seed=5))
    assert samp.caption(imgs, ["x", "y"]) == samp.caption(imgs, ["x", "y"])  # seeded from the keys


def test_hf_captioner_from_local_folder(tiny_blip):
    cfg = CaptionConfig(captioner="hf", model=tiny_blip, pretrained=None, prompt="a picture of", decoding="greedy",
                        max_tokens=5, min_tokens=1, device="cpu")
    cap = build_captioner(cfg)
    assert cap.input_spec.size == 32 and cap.input_spec.resize == "squash"
    imgs = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = cap.caption(imgs, ["a", "b", "c"])
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    assert not any(t.lower().startswith("a picture of") for t in out)  # the prompt is not part of the caption
    prov = cap.provenance
    assert prov.model == f"hf:{tiny_blip}" and prov.model_tag.startswith("sha256:")
    assert prov.generation["prompt"] == "a picture of" and prov.generation["model_class"] == "BlipForConditionalGeneration"
    assert prov.generation["max_new_tokens"] == 5 and prov.generation["num_beams"] == 1


def test_load_chunk_reads_jpegs_from_tar(shard_dir, tmp_path):
    ss = load_shardset(shard_dir)
    name = ss.names[0]
    chunks = plan_chunks(0, name, str(shard_dir / name), ss.counts[0], chunk_size=1)
    assert [(c.start, c.stop) for c in chunks] == [(0, 1), (1, None)]
    meta, imgs = load_chunk(chunks[1], 48, "crop")
    keys = index_tar(str(shard_dir / name)).keys
    assert meta["keys"] == keys[1:] and meta["ok"] == keys[1:] and not meta["errors"] and meta["fatal"] is None
    assert imgs.shape == (1, 48, 48, 3) and imgs.dtype == np.uint8
    missing = plan_chunks(9, "shard-999999.tar", str(tmp_path / "shard-999999.tar"), 2, 4)[0]
    meta, imgs = load_chunk(missing, 48, "crop")
    assert meta["fatal"].startswith("shard_unreadable") and imgs.shape[0] == 0


def test_vip_caption_command_overrides_and_errors(tmp_path, caplog, capsys, monkeypatch):
    """`vip caption --config P caption.field=value …` (also `python -m vip caption`, what
    launch/caption.sh submits): a bad config → exit 2 before any Ray work; no shards → exit 1;
    debug.caption_fault_exit_chunk reaches the job as its fault_exit_chunk argument."""
    from vip.cli import main
    assert main(["caption", "--config", "tiny", "caption.nonexistent=1"]) == 2
    assert main(["caption", "--config", "tiny", "caption.decoding=nucleus"]) == 2
    assert "'greedy'" in capsys.readouterr().err                      # the allowed values are named
    assert main(["caption", "--config", "tiny", f"caption.shards={tmp_path / 'none'}", "caption.num_actors=1"]) == 1
    assert "no shards in" in caplog.text
    import captioning.job
    seen = {}

    def fake_job(cfg, on_chunk_done=None, fault_exit_chunk=None):
        seen.update(cfg=cfg, fault_exit_chunk=fault_exit_chunk)
        return captioning.job.CaptionSummary(out=str(tmp_path))
    monkeypatch.setattr(captioning.job, "run_caption_job", fake_job)
    assert main(["caption", "--config", "tiny", f"caption.shards={tmp_path}", "caption.num_actors=3",
                 "debug.caption_fault_exit_chunk=2"]) == 0
    assert seen["fault_exit_chunk"] == 2 and seen["cfg"].num_actors == 3 and seen["cfg"].shards == str(tmp_path)
    assert "| clips |" in capsys.readouterr().out                      # the summary table is printed


# --------------------------------------------------------------------------- the Ray job
@pytest.fixture(scope="module")
def captioned(ray_local, shard_dir, tiny_coca, tmp_path_factory):
    """The job run once over the shared shards (sidecars in a separate folder)."""
    out = tmp_path_factory.mktemp("captions") / "captions"
    summary = run_caption_job(ccfg(shard_dir, out, tiny_coca, chunk_size=1, inflight_per_actor=3))
    return out, summary


@pytest.mark.slow
def test_job_captions_every_clip_exactly_once(captioned, shard_dir, tiny_coca):
    out, s = captioned
    rows = assert_exactly_once(shard_dir, out)
    assert len(rows) == 12 and s.clips == 12 and s.captions == 12 and not s.failures
    assert s.shards_total == 6 and s.shards_written == 6 and s.shards_failed == 0 and s.actor_restarts == 0
    folder = Path(tiny_coca.split(":", 1)[1])
    tag = file_digest([folder / "open_clip_model.safetensors"])
    for r in rows:  # provenance on every row
        assert r["model"] == f"open_clip:{tiny_coca}" and r["model_tag"] == tag and r["created_at"] is not None
        g = json.loads(r["generation"])
        assert g["decoding"] == "greedy" and g["seq_len"] == 7 and g["device"] == "cpu"
    assert not list(Path(out).glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "| clips | 12 (12 captioned) |" in s.table()


@pytest.mark.slow
def test_job_rerun_on_finished_dataset_does_nothing(captioned, shard_dir, tiny_coca):
    out, _ = captioned
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(out).glob("shard-*.parquet")}
    t0 = time.perf_counter()
    s = run_caption_job(ccfg(shard_dir, out, tiny_coca))
    assert s.shards_already_done == 6 and s.shards_written == 0 and s.clips == 0 and s.actors == 0
    assert time.perf_counter() - t0 < 10  # no actors started, no model loaded
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(out).glob("shard-*.parquet")}
    assert after == before


@pytest.mark.slow
def test_reader_joins_job_captions(captioned, shard_dir, small_data):
    """StreamLoader batches: has_caption True for captioned clips; caption tokens = tokenized caption."""
    import open_clip
    out, _ = captioned
    caps = {r["key"]: r["caption"] for r in sidecar_rows(out)}
    cfg = small_data(shard_dir, captions=str(out), train=False)
    tok = open_clip.get_tokenizer(cfg.tokenizer, context_length=cfg.context_length)
    seen = 0
    for batch in StreamLoader(cfg):
        assert batch["has_caption"].all()
        want = tok([caps[k] for k in batch["key"]], context_length=cfg.context_length)
        assert (batch["caption"] == want).all()
        seen += len(batch["key"])
    assert seen == 12
    plain = next(iter(StreamLoader(small_data(shard_dir, train=False))))  # no sidecars there: no captions
    assert not plain["has_caption"].any() and (plain["caption"] == 0).all()


@pytest.mark.slow
def test_actor_that_exits_mid_job_loses_and_duplicates_nothing(ray_local, shard_dir, tiny_coca, tmp_path):
    """Fault injection: actor 0 os._exit(1)s on its 3rd chunk; the job replaces it and retries its chunks."""
    out = tmp_path / "captions"
    s = run_caption_job(ccfg(shard_dir, out, tiny_coca, inflight_per_actor=3), fault_exit_chunk=3)
    assert s.actor_restarts == 1 and s.chunk_retries >= 1
    assert s.shards_written == 6 and s.clips == 12 and s.captions == 12 and not s.failures
    assert_exactly_once(shard_dir, out)


@pytest.mark.slow
def test_killed_actor_mid_job(ray_local, shard_dir, tiny_coca, tmp_path):
    """ray.kill() of the captioner actor after the first finished chunk: the job still ends complete."""
    out = tmp_path / "captions"
    killed = []

    def kill_first(job):
        if not killed:
            killed.append(job.actors[0])
            ray_local.kill(job.actors[0], no_restart=True)

    s = run_caption_job(ccfg(shard_dir, out, tiny_coca, inflight_per_actor=3), on_chunk_done=kill_first)
    assert killed and s.actor_restarts == 1
    assert s.shards_written == 6 and s.clips == 12 and s.captions == 12
    assert_exactly_once(shard_dir, out)


@pytest.mark.slow
def test_corrupt_jpeg_and_missing_tar(ray_local, shard_dir, tiny_coca, tmp_path):
    """A corrupt JPEG → null caption + error, shard still finished; a missing tar → no sidecar (the
    shard failed) until a re-run finds it."""
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    names = load_shardset(shards).names
    idx = index_tar(str(shards / names[2]))
    bad_key = idx.keys[1]
    offset, size = idx.members[bad_key]["jpg"]
    with open(shards / names[2], "r+b") as f:  # overwrite the member's bytes in place, tar stays valid
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    hidden = tmp_path / names[4]
    shutil.move(shards / names[4], hidden)
    out = shards / "captions"  # default location
    s = run_caption_job(ccfg(shards, None, tiny_coca, chunk_size=2))
    assert s.failures["corrupt_jpeg"] == 1 and s.failures["shard_unreadable"] == 1
    assert s.shards_written == 5 and s.shards_failed == 1 and s.clips == 10 and s.captions == 9
    assert not sidecar_path(out, names[4]).exists()
    rows = {r["key"]: r for r in sidecar_rows(out)}
    assert rows[bad_key]["caption"] is None and rows[bad_key]["error"].startswith("corrupt_jpeg")
    assert rows[idx.keys[0]]["caption"]  # its neighbour in the same shard is fine
    shutil.move(hidden, shards / names[4])
    s2 = run_caption_job(ccfg(shards, None, tiny_coca, chunk_size=2))
    assert s2.shards_already_done == 5 and s2.shards_written == 1 and s2.clips == 2
    assert_exactly_once(shards, out, allow_errors={bad_key: "corrupt_jpeg"})


@pytest.mark.slow
def test_hf_captioner_job_through_vip_cli(ray_local, shard_dir, tiny_blip, tmp_path, capsys):
    """`vip caption` with a HuggingFace image-to-text model (tiny BLIP from a local folder)."""
    from vip.cli import main
    out = tmp_path / "hf_captions"
    rc = main(["caption", f"caption.shards={shard_dir}", f"caption.out={out}", "caption.captioner=hf",
               f"caption.model={tiny_blip}", "caption.pretrained=null", "caption.prompt=a picture of",
               "caption.decoding=greedy", "caption.max_tokens=5", "caption.min_tokens=1", "caption.chunk_size=4",
               "caption.batch_size=4", "caption.num_actors=1"])
    assert rc == 0
    assert "| clips | 12 (12 captioned) |" in capsys.readouterr().out
    rows = assert_exactly_once(shard_dir, out)
    assert {r["model"] for r in rows} == {f"hf:{tiny_blip}"}
    assert json.loads(rows[0]["generation"])["prompt"] == "a picture of"


# --------------------------------------------------------------------------- ray job submit
@pytest.mark.slow
def test_launch_script_submits_to_a_loopback_head(shard_dir, tiny_coca, free_port, tmp_path):
    """launch/caption.sh: starts a head on 127.0.0.1 (own ports), `ray job submit`s the job, waits,
    and stops the head it started."""
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards, ignore=shutil.ignore_patterns("captions"))
    temp = tempfile.mkdtemp(prefix="vipray", dir="/tmp")  # short: Ray's socket paths are length-limited
    ports: list[int] = []
    while len(ports) < 4:                     # four distinct ports, chosen now
        port = free_port()
        ports += [port] if port not in ports else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = ["bash", str(REPO / "launch/caption.sh"), "--port", str(ports[0]), "--dashboard-port", str(ports[1]),
           "--agent-port", str(ports[2]), "--client-port", str(ports[3]), "--num-cpus", "2", "--temp-dir", temp,
           "--python", sys.executable, "--", f"caption.shards={shards}", f"caption.model={tiny_coca}",
           "caption.pretrained=null", "caption.decoding=greedy", "caption.max_tokens=6", "caption.min_tokens=2",
           "caption.chunk_size=4"]
    try:
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        log = p.stdout + p.stderr
        assert p.returncode == 0, log[-12000:]
        assert "succeeded" in log and "stopping the Ray head" in log, log[-4000:]
        assert_exactly_once(shards, shards / "captions")
        with socket.socket() as s:  # the head it started is gone (its dashboard port is free again)
            assert s.connect_ex(("127.0.0.1", ports[1])) != 0
    finally:
        shutil.rmtree(temp, ignore_errors=True)
