#!/usr/bin/env bash
# The README's first command: set up .venv and run the demo on built-in tiny
# synthetic data: corpus (speech-like subtitles, described held-out clips) →
# shards → small captioner trained here (or reused) → captions (Ray) → the vs
# baseline and OCL (d) on 2 DeepSpeed CPU ranks → retrieval side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/vip demo "$@"
