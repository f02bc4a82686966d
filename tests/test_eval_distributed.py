"""Evaluation split over 2 gloo ranks (joined the way `torchrun … vip eval` joins: init_runtime from
the launcher's environment) gives the single-process result, on a video folder and on shards."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch


def _worker(rank, world, port, cfg, data, out):
    from vip.eval.retrieval import evaluate, evaluate_shards
    from vip.model.archs import tokenizer_for
    from vip.model.convert import load
    from vip.train.runtime import init_runtime
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    rt = init_runtime("cpu", "fp32")
    import torch.distributed as dist
    try:
        assert (rt.rank, rt.world) == (rank, world)
        m = load(cfg.model)
        res = {"folder": evaluate(m, cfg, tokenizer_for("vip-tiny", m.context_length), rt, progress=False),
               "shards": evaluate_shards(m, data, rt, max_clips=1000)}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one(video_set, tiny_export, shard_dir, small_data, free_port, tmp_path):
    import torch.multiprocessing as mp
    from vip.config import EvalConfig
    from vip.eval.encode import runtime_of
    from vip.eval.retrieval import evaluate, evaluate_shards
    from vip.model.archs import tokenizer_for
    from vip.model.convert import load
    cfg = EvalConfig(annotations=str(video_set / "ann.jsonl"), videos=str(video_set / "videos"),
                     model=str(tiny_export), num_frames=4, batch_size=1)
    data = dataclasses.replace(small_data(shard_dir, image_size=64), batch_size=1)
    m = load(cfg.model)
    single = evaluate(m, cfg, tokenizer_for("vip-tiny", m.context_length), progress=False)
    single_shards = evaluate_shards(m, data, runtime_of(m), max_clips=1000)
    assert single_shards["clips"] == 12
    out = tmp_path / "res"
    mp.spawn(_worker, args=(2, free_port(), cfg, data, str(out)), nprocs=2, join=True)
    for r in range(2):
        got = json.loads((tmp_path / f"res.{r}").read_text())
        assert got["folder"]["videos"] == single["videos"] and got["folder"]["skipped_ids"] == single["skipped_ids"]
        for k, v in single["metrics"].items():
            assert got["folder"]["metrics"][k] == pytest.approx(v, abs=1e-6), k
        assert set(got["shards"]) == set(single_shards)
        for k, v in single_shards.items():
            assert got["shards"][k] == pytest.approx(v, abs=1e-6), k
