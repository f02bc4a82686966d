"""Training observability: throughput meter, JSONL metrics + TensorBoard (rank 0), per-rank key logs."""
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


class TrainLog:
    """What a training loop reports: per micro-batch throughput (and consumed keys when
    train.log_keys), per optimiser step a metrics record and a log line every log_every steps."""

    def __init__(self, out: str | Path, rank: int, world: int, log_every: int, total_steps: int,
                 tensorboard: bool = True, log_keys: bool = False):
        self.metrics = MetricsLog(out, enabled=rank == 0, tensorboard=tensorboard)
        self.meter = Throughput()
        self.rank, self.world, self.every, self.total = rank, world, log_every, total_steps
        self._keys = None
        if log_keys:
            (Path(out) / "keys").mkdir(parents=True, exist_ok=True)
            self._keys = open(Path(out) / "keys" / f"rank{rank}.jsonl", "a")

    def micro(self, step: int, micro: int, keys: list, data_wait: float) -> None:
        """After a trained micro-batch of optimiser step `step`; `micro` numbers the run's trained
        micro-batches from 1, continuing across resumes (the trainer keeps it in its checkpointed
        counters)."""
        self.meter.update(len(keys) * self.world, data_wait)
        if self._keys is not None:
            self._keys.write(json.dumps({"step": step, "micro": micro, "keys": keys}) + "\n")
            self._keys.flush()

    def step(self, step: int, loss, terms: dict, extra: dict) -> None:
        """After optimiser step `step`: a record + log line on rank 0 every log_every steps."""
        if self.rank != 0 or not (step % self.every == 0 or step == self.total):
            return
        rate = self.meter.read(self.world)
        rec = {"loss": float(loss), **{f"loss_{k}": float(v) for k, v in terms.items()}, **extra, **rate}
        self.metrics.write(step, "train", rec)
        log.info("step %d/%d loss %.4f lr %.2e scale %.1f | %.1f samples/s (%.1f/gpu) data wait %.0f%%", step,
                 self.total, rec["loss"], rec.get("lr", float("nan")), rec.get("logit_scale", float("nan")),
                 rate["samples_per_s"], rate["samples_per_s_per_gpu"], 100 * rate["data_wait_share"])
        self.meter.reset()

    def close(self) -> None:
        if self._keys is not None:
            self._keys.close()
        self.metrics.close()


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
