"""bench/ablation.py: the quick run prints its table; MeanPool is order-blind, ViP is not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ablation  # noqa: E402


@pytest.mark.slow
def test_ablation_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "ablation.py"), "--quick", "--json",
                        str(tmp_path / "a.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| encoder | t2v R@1 | v2t R@1 | chance |" in p.stdout
    rows = {r["encoder"]: r for r in json.loads((tmp_path / "a.json").read_text())["rows"]}
    assert set(rows) == set(ablation.ENCODERS)
    assert rows["MeanPool"]["t2v_R@1"] == rows["MeanPool"]["v2t_R@1"] == 50.0  # chance, exactly


def test_pairs_are_time_reversals():
    video, labels = ablation.group_tensors(
        ablation.make_groups([("red", "circle")], 1, np.random.default_rng(0)), 6)     # [2, 2, T, 3, H, W]
    assert [lab[2] for lab in labels] == ["left", "right", "up", "down"]
    assert torch.equal(video[:, 0], video[:, 1].flip(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_meanpool_is_order_blind_vip_is_not(seed):
    """A clip and its time reversal: MeanPool gives the same embedding (so within-pair R@1 is
    chance exactly), ViP (with a non-zero temporal embedding, as after training) does not."""
    models = ablation.build_encoders(5, seed)
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(3, 5, 3, 64, 64, generator=g)                     # [B, T, 3, H, W]
    rev = video.flip(1)
    vip = models["ViP"]
    with torch.no_grad():
        vip.visual.temporal_embedding.normal_(0, 1, generator=g)
        mp = models["MeanPool"].encode_video(video), models["MeanPool"].encode_video(rev)
        vp = vip.encode_video(video), vip.encode_video(rev)
    torch.testing.assert_close(mp[0], mp[1], atol=1e-5, rtol=0)
    assert (vp[0] - vp[1]).abs().max() > 1e-3
    # equal embeddings → tied scores → expected R@1 is chance
    t = torch.nn.functional.normalize(torch.randn(3, 2, mp[0].shape[-1], generator=g), dim=-1)
    v = torch.stack([mp[0], mp[1]], dim=1)                                 # [G, 2, D]
    assert ablation.within_group_r1(t @ v.transpose(1, 2)) == (50.0, 50.0)


def test_within_group_r1():
    sim = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.1, 0.9], [0.8, 0.2]]])   # group 0 right, group 1 wrong
    assert ablation.within_group_r1(sim) == (50.0, 50.0)
    assert ablation.within_group_r1(sim[:1]) == (100.0, 100.0)
