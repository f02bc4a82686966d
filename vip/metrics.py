"""Training observability: throughput meter, JSONL metrics and TensorBoard (rank 0 only)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Throughput:
    """Samples/s and the share of wall time spent waiting for data, over a window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.data_wait = 0.0
        self.steps = 0

    def update(self, samples: int, data_wait: float) -> None:
        self.samples += samples
        self.data_wait += data_wait
        self.steps += 1

    def read(self, world: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"samples_per_s": self.samples / dt, "samples_per_s_per_gpu": self.samples / dt / max(world, 1),
                "data_wait_share": self.data_wait / dt, "step_time_s": dt / max(self.steps, 1)}


class MetricsLog:
    """Append-only metrics.jsonl (+ TensorBoard scalars) under the run folder."""

    def __init__(self, out: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(Path(out) / "tb"))
                except Exception as e:  # tensorboard is optional
                    log.warning("tensorboard disabled: %s", e)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
