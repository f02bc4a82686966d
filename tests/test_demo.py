"""The README's demo, shortened: synthetic data → shards → captions (Ray) → DeepSpeed pretraining
on 2 processes → retrieval must clearly beat the untrained model on held-out clips."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_improves_retrieval(tmp_path):
    vip = str(Path(sys.executable).parent / "vip")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    overrides = ["synth.width=320", "synth.height=180", "train.steps=200", "train.eval_every=0",
                 "train.save_every=100"]
    p = subprocess.run([vip, "demo", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res = json.loads((tmp_path / "runs/demo/retrieval.json").read_text())
    before, after = res["untrained"], res["pretrained"]
    n = after["clips"]
    assert n == before["clips"] >= 24
    # chance: R@1 = 100/n, R@5 = 500/n; the untrained model sits near chance
    for d in ("t2v", "v2t"):
        assert after[f"{d}_R@5"] >= before[f"{d}_R@5"] + 15, res
        assert after[f"{d}_R@5"] >= 2 * 500 / n, res
        assert after[f"{d}_MdR"] < before[f"{d}_MdR"], res
    # every stage left its artefacts
    assert (tmp_path / "data/shards/captions").is_dir()
    assert (tmp_path / "runs/demo/curves.png").exists()
    assert "| pretrained |" in p.stdout
