"""bench/heads.py smoke: the quality table and the cost table come out, and what cannot be learned is not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_heads_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "heads.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench/heads.py"), "--quick", "--backbones", "MeanPool",
                        "--heads", "none", "meanp", "drl", "--tasks", "order", "--sizes", "64", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| order | MeanPool | drl |" in p.stdout and "| 64×64 | drl |" in p.stdout
    res = json.loads(out.read_text())
    q = {r["head"]: r for r in res["quality"]}
    # frame-wise CLIP + a mean over frames cannot tell a clip from its time reversal: exactly chance
    assert q["none"]["pair_R@1"] == 50.0 and q["meanp"]["pair_R@1"] == 50.0
    cost = {(r["head"], r["n"], r.get("train", False)) for r in res["cost"]}
    assert {("dot", 64, False), ("meanp", 64, False), ("drl", 64, False), ("drl", 16, True), ("dot", 16, True)} <= cost
    assert all(r["seconds"] > 0 and r["peak_mib"] >= 0 for r in res["cost"])
