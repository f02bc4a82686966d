"""`vip eval` split over 2 gloo ranks gives the single-process result (slow: spawns processes)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_eval import tiny_export, video_set  # noqa: F401  (fixtures)


def _worker(rank, world, init, cfg, out):
    import torch.distributed as dist
    from vip.eval.retrieval_eval import evaluate, tokenizer_for
    from vip.model.convert import load
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        m = load(cfg.model)
        res = evaluate(m, cfg, tokenizer_for("vip-tiny", m.context_length), progress=False)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one(video_set, tiny_export, tmp_path):  # noqa: F811
    import torch.multiprocessing as mp
    from vip.config import EvalConfig
    from vip.eval.retrieval_eval import evaluate, tokenizer_for
    from vip.model.convert import load
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"),
                     model=str(tiny_export), num_frames=4, batch_size=1)
    m = load(cfg.model)
    single = evaluate(m, cfg, tokenizer_for("vip-tiny", m.context_length), progress=False)
    out = tmp_path / "res"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", cfg, str(out)), nprocs=2, join=True)
    for r in range(2):
        got = json.loads((tmp_path / f"res.{r}").read_text())
        assert got["videos"] == single["videos"] and got["skipped_ids"] == single["skipped_ids"]
        for k, v in single["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k
