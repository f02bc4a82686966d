"""`vip demo`: the end-to-end run on built-in tiny synthetic data.

Stages (each skipped when its output is already there, so a re-run resumes):
synthetic corpus → shards → streamed batches. Later stages (captions,
pretraining, retrieval before/after) are appended as they land.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from vip.config import Config

log = logging.getLogger(__name__)


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(cfg: Config) -> int:
    t0 = time.perf_counter()
    _stage("1/3 synthetic corpus (HD-VILA format, h264)")
    if (Path(cfg.synth.out) / "metadata.jsonl").exists():
        print(f"found {cfg.synth.out}; keeping it")
    else:
        from shards.synth import make_corpus
        print(json.dumps(make_corpus(cfg.synth)))

    _stage("2/3 shards build")
    from shards.build import build_shards
    summary = build_shards(cfg.build)
    print(summary.table())
    if summary.shards_failed:
        return 1

    _stage("3/3 streaming batches")
    from shards.reader import stream_report
    print(stream_report(cfg.data, num_batches=6))
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f}s")
    return 0
