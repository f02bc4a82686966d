#!/usr/bin/env bash
# Create .venv with everything pinned in requirements.txt (runtime) and
# requirements-test.txt (tests only), plus DeepSpeed (pure Python; ops compile on
# first use) and this package in editable mode.
# Idempotent: does nothing when the requirements, pyproject.toml and this script
# have not changed (a stamp of their hash in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VIP_VENV:-.venv}
STAMP="$VENV/.vip-setup"
want=$(cat requirements.txt requirements-test.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "[setup] creating $VENV with $($PY --version) (first run: several minutes)" >&2
[[ -d "$VENV" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel >/dev/null
# torch and torchvision must come in one pip command (see docs/install.md); the test
# packages come in the same command so that they can never move a runtime pin.
"$VENV/bin/pip" install -q -r requirements.txt -r requirements-test.txt
# DeepSpeed's setup imports torch: build it against the torch installed above.
DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --no-build-isolation "deepspeed==0.18.9"
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, torchvision, open_clip, av, deepspeed, ray, pytest, webdataset; print('[setup] ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__)" >&2
echo "$want" > "$STAMP"
