"""The small captioner trained here (captioning/trainer.py): its captions are informative on
held-out frames, and the caption job loads its model directory like any other captioner."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioning.config import CaptionConfig, CaptionerTrainConfig

STEPS = 600


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from captioning.trainer import train_captioner
    cfg = CaptionerTrainConfig(out=str(tmp_path_factory.mktemp("captioner") / "blip"), train_images=2048,
                               eval_images=96, steps=STEPS)
    return cfg, train_captioner(cfg, progress=False)


def test_score_caption():
    from captioning.trainer import score_caption
    assert score_caption("a red circle", "red", "circle") == (True, True)
    assert score_caption("A red circle.", "red", "circle") == (True, True)
    assert score_caption("a blue circle", "red", "circle") == (False, True)
    assert score_caption("a red blue square circle", "red", "circle") == (False, False)   # hedging is wrong
    assert score_caption("", "red", "circle") == (False, False)


def test_vocabulary_covers_the_training_captions():
    import numpy as np

    from captioning.trainer import vocabulary
    from shards.synth import COLOURS, SHAPES
    from shards.texts import image_description
    vocab = set(vocabulary())
    rng = np.random.default_rng(0)
    for c in COLOURS:
        for s in SHAPES:
            assert set(image_description(c, s, rng).split()) <= vocab


@pytest.mark.slow
def test_captioner_learns_colour_and_shape(trained):
    """A short training names colour and shape of held-out frames far above chance (1/8, 1/3)."""
    cfg, rec = trained
    acc = rec["accuracy"]
    assert rec["loss_last"] < 0.5 * rec["loss_first"], rec
    assert acc["images"] == 96
    assert acc["colour"] >= 0.8, acc                      # chance 0.125
    assert acc["both"] >= 4 * acc["chance_both"], acc     # chance 1/24
    out = Path(cfg.out)
    for name in ("config.json", "model.safetensors", "vocab.txt", "preprocessor_config.json", "captioner.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "captioner.json").read_text())["config"]["steps"] == STEPS
    from captioning.trainer import ensure_captioner
    assert ensure_captioner(cfg)["reused"] is True        # same config: the directory is reused, not retrained


@pytest.mark.slow
def test_trained_captioner_through_the_caption_job(trained, shard_dir, corpus, tmp_path):
    """The real Ray job loads the directory (captioner=hf) and its sidecars name each clip's colour."""
    ray = pytest.importorskip("ray")
    from captioning.job import run_caption_job
    cfg, _ = trained
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        summary = run_caption_job(CaptionConfig(shards=str(shard_dir), out=str(tmp_path / "captions"), captioner="hf",
                                                model=cfg.out, pretrained=None, decoding="greedy", max_tokens=12,
                                                chunk_size=4, batch_size=4, num_actors=1))
    finally:
        ray.shutdown()
    assert summary.shards_failed == 0
    rows = [r for p in sorted((tmp_path / "captions").glob("shard-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 12 and all(r["error"] is None for r in rows)
    from shards.keys import clip_key
    truth = {clip_key(t["clip_id"]): t for t in map(json.loads, (corpus / "truth.jsonl").read_text().splitlines())}
    right = sum(r["caption"].split().count(truth[r["key"]]["colour"]) == 1 for r in rows)
    assert right >= 9, [(r["caption"], truth[r["key"]]["colour"]) for r in rows]       # chance: 1.5 of 12
    assert {r["model"] for r in rows} == {f"hf:{cfg.out}"}                                # provenance: this folder
    assert all(r["model_tag"].startswith("sha256:") for r in rows)                       # … and its weights' digest
