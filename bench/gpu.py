"""The prepared GPU check's command: `python bench/gpu.py --out DIR …` (also `python -m bench.gpu_check …`).

The check itself lives in the package bench/gpu_check/ (its __init__ says what it measures; __main__ runs
the parts; one module per part; report.py: shared helpers and gpu.md)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check.__main__ import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)      # DeepSpeed's process group and DataLoader threads: no slow interpreter teardown
