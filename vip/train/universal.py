"""DeepSpeed universal checkpoints: the form of a ZeRO 1-3 checkpoint that loads on any number
of ranks (each parameter's fp32 master and Adam moments whole, one file each). Used by elastic
resume (vip.train.checkpoint)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vip.train.verify import human_bytes

log = logging.getLogger(__name__)
UNIVERSAL = "universal"


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's `ds_to_universal` of the checkpoint folder `src` into `dst` (created last, by
    a rename), in a subprocess; logs the time it took and the size it wrote."""
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    (src / "latest_universal").unlink(missing_ok=True)      # written beside the output by the tool
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}")
    os.replace(tmp, dst)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    log.info("converted %s to a universal checkpoint in %.1fs (%s written to %s)", src.name,
             time.perf_counter() - t0, human_bytes(size), dst)
