"""Benchmarks run in CI in their tiny form: they must run, print their tables, and write numbers whose
structure (shapes, frame counts, formats, counted FLOPs) a broken benchmark would get wrong. Timings
themselves are never asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "data.json"
    p = _bench("data.py", "--quick", "--formats", "8:64:8,8:64:4:fast:square", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def train_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ts.json"
    p = _bench("train_step.py", "--quick", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, out, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_data_quick(data_quick):
    stdout, res = data_quick
    assert "worker / floor" in stdout and "cores per 1,000 clips/s" in stdout and "naive" in stdout
    plain, square = res["formats"]
    for r in (plain, square):
        st = r["storage"]
        assert st["clips"] == 6 and st["frames_per_clip"] == 16            # 2-s clips at 8 fps
        assert r["floor"]["frames_decoded_per_clip"] <= 16                 # never more than the clip holds
        # the worker hands over uint8 channels-last pixels; the loader normalised float channels-first
        assert r["worker"]["batch_shapes"]["video"] == [[8, 12, 64, 64, 3], "torch.uint8"]
        assert r["loader"]["batch_shapes"]["video"] == [[8, 12, 3, 64, 64], "torch.float32"]
        assert r["cores_per_1000_clips_per_s"] == pytest.approx(1000 / r["worker"]["per_core"])
    assert (plain["storage"]["width"], plain["storage"]["height"]) == (114, 64)
    assert (square["storage"]["width"], square["storage"]["height"]) == (64, 64)


@pytest.mark.slow
def test_bench_captioning_quick(tmp_path):
    p = _bench("captioning.py", "--quick", "--json", str(tmp_path / "cap.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "captioner alone" in p.stdout and "overhead" in p.stdout
    f = _bench("captioning.py", "--quick", "--count-flops", "--clips", "2", "--json", str(tmp_path / "fl.json"))
    assert f.returncode == 0, f.stderr[-3000:]
    res = json.loads((tmp_path / "fl.json").read_text())
    assert res["images"] == 2 and res["gflops_per_caption"] > 0 and res["max_tokens"] == 8


@pytest.mark.slow
def test_bench_train_step_quick(train_quick):
    stdout, _, res = train_quick
    assert "| vip-tiny | vip | off |" in stdout and "MFU" in stdout
    rows = {(r["encoder"], r["grad_ckpt"]): r for r in res["rows"]}
    # FLOPs are model FLOPs: checkpointing recomputes but does not change them
    assert rows[("vip", True)]["gflops_per_clip"] == pytest.approx(rows[("vip", False)]["gflops_per_clip"])
    assert all(0 < r["mfu"] < 1 and r["batch"] == 4 for r in res["rows"])


@pytest.mark.slow
def test_bench_scaling_from_the_quick_runs(data_quick, train_quick, tmp_path):
    _, res = data_quick
    data = tmp_path / "data.json"
    data.write_text(json.dumps(res))
    _, ts, train = train_quick
    p = _bench("scaling.py", "--data", str(data), "--train", str(ts), "--format", "8 fps · 64 · gop 8",
               "--content", "flat", "--json", str(tmp_path / "plan.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Data-loading cores per GPU" in p.stdout and "estimate" in p.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    flops = next(r["gflops_per_clip"] for r in train["rows"] if r["encoder"] == "vip" and not r["grad_ckpt"])
    rate = plan["rates"]["vip-tiny"]
    assert rate["clips_per_s"] == pytest.approx(798e12 * 0.35 / (flops * 1e9))   # the labelled estimate
    for c, f in zip(plan["cores"], res["formats"]):
        assert c["cores_per_gpu"] == pytest.approx(rate["clips_per_s"] / f["worker"]["per_core"])


@pytest.mark.slow
def test_bench_fusion_quick(tmp_path):
    """bench/fusion.py: one 1-epoch fine-tuning per task (the e2e tests cover learning), the cost tables."""
    out = tmp_path / "fusion.json"
    p = _bench("fusion.py", "--quick", "--epochs", "1", "--json", str(out), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["task"], r["weights"]) for r in res["retrieval"]] == [("audio", "equal"), ("visual", "equal")]
    assert all(0 <= r[k] <= 100 for r in res["retrieval"] for k in ("t2v", "t2a", "t2va"))
    assert res["cost"][0]["arch"] == "vip-tiny" and res["reader"]["with"] > 0 and res["reader"]["without"] > 0
    assert "t→va R@1" in p.stdout and "(audio + head) / video" in p.stdout and "with audio (m4a decode" in p.stdout
