"""bench/ocl.py, shortened: every row starts from the same init, trains through the one engine on
the same batches, and is scored on held-out descriptions before and after a fine-tune."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ocl", ROOT / "bench" / "ocl.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_ocl"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_rows_share_one_init():
    ocl = _bench()
    a = ocl.build_row_model("vip", 4, seed=3).state_dict()
    b = ocl.build_row_model("vip", 4, seed=3).state_dict()
    m = ocl.build_row_model("meanpool", 4, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shared = [k for k in m if k in a and m[k].shape == a[k].shape and "transformer" in k]
    assert shared and all(torch.equal(a[k], m[k]) for k in shared)       # the same CLIP towers
    c = ocl.build_row_model("vip", 4, seed=4).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_ocl_bench_short_run(tmp_path, train_rt):
    from captioning.tiny import make_tiny_blip
    ocl = _bench()
    cap = make_tiny_blip(tmp_path / "blip", image_size=32)            # random weights: captions are noise here
    rows = ["CLIP (init)", "CLIP-ViP, L_V↔S", "CLIP-ViP, (d) L_V↔S,C + L_F↔C"]
    res = ocl.run(cap, seeds=[0], rows=rows, pre_steps=3, ft_steps=2, n_pre=24, n_ft=16, frames=2, batch=8,
                  n_test=16, progress=False, rt=train_rt)
    assert [r["row"] for r in res["results"]] == rows
    assert res["n_test"] == 16 and len(res["examples"]) == 6
    by = {r["row"]: r for r in res["results"]}
    for r in res["results"]:
        for stage in ("zero_shot", "finetuned"):
            for k in ("R@1", "R@5", "R@10"):
                assert 0 <= r[stage][k] <= 100
            assert r[stage]["R@1"] <= r[stage]["R@5"] <= r[stage]["R@10"]
    assert np.isnan(by["CLIP (init)"]["pretrain_loss"])                  # no post-pretraining
    assert np.isfinite(by["CLIP-ViP, L_V↔S"]["pretrain_loss"]) and np.isfinite(by[rows[2]]["pretrain_loss"])
    # the caption terms change what is learned: after the same steps the two losses differ
    assert by["CLIP-ViP, L_V↔S"]["pretrain_loss"] != by[rows[2]]["pretrain_loss"]
    table = ocl.table(res)
    assert all(f"| {r} |" in table for r in rows) and "±" in table
