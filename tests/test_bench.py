"""Benchmarks run in CI in their tiny form: they must run and print their table with a ratio."""
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


@pytest.mark.slow
def test_bench_data_quick(tmp_path):
    p = _bench("data.py", "--quick", "--json", str(tmp_path / "data.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reader / floor" in p.stdout and "naive" in p.stdout
    res = json.loads((tmp_path / "data.json").read_text())
    assert res  # numbers were written


@pytest.mark.slow
def test_bench_captioning_quick(tmp_path):
    p = _bench("captioning.py", "--quick", "--json", str(tmp_path / "cap.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "captioner alone" in p.stdout and "overhead" in p.stdout


@pytest.mark.slow
def test_bench_train_step_quick(tmp_path):
    p = _bench("train_step.py", "--quick", "--json", str(tmp_path / "ts.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| vip | off |" in p.stdout and "MFU" in p.stdout
    res = json.loads((tmp_path / "ts.json").read_text())
    rows = {(r["encoder"], r["grad_ckpt"]): r for r in res["rows"]}
    # FLOPs are model FLOPs: checkpointing recomputes but does not change them
    assert rows[("vip", True)]["gflops_per_clip"] == pytest.approx(rows[("vip", False)]["gflops_per_clip"])
    assert all(0 < r["mfu"] < 1 for r in res["rows"])
