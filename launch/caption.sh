#!/usr/bin/env bash
# Submit the captioning job (`python -m vip caption`) to a Ray cluster with `ray job submit`;
# usage() below, or --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/caption.sh [options] -- [caption.field=value ...]

Submit the captioning job (`python -m vip caption`) to a Ray cluster with `ray job submit`.

Modes:
  running cluster  launch/caption.sh --address http://HEAD:8265 --shards /shared/shards
                   (or export RAY_ADDRESS=http://HEAD:8265). Start the cluster first: on the head
                   `ray start --head --dashboard-host 0.0.0.0`, on each GPU node
                   `ray start --address HEAD:6379` (docs/captioning.md). The job's driver runs on
                   the head; shards and sidecars must be on a filesystem every node sees.
  one machine      launch/caption.sh --shards data/shards --model-dir runs/tiny_coca
                   When nothing answers at the address and it is a loopback one (the default
                   http://127.0.0.1:8265), a head bound to 127.0.0.1 is started for this job and
                   stopped when it ends (--keep leaves it running for the next job).

Paths: the job runs in a copy of this repo that `ray job submit --working-dir .` uploads. These
options take a path and make it absolute (relative to the current directory; it need not exist):
  --shards DIR       caption.shards=DIR            shard folder
  --out DIR          caption.out=DIR               sidecar folder (default: <shards>/captions)
  --model-dir DIR    caption.model=local-dir:DIR   a local model folder
  --weights FILE     caption.pretrained=FILE       a local weights file
  --config PRESET    a preset name (tiny, default, ...) or a YAML file (.yaml/.yml: made absolute)
Overrides after `--` are passed on unchanged, after the ones above (a later value wins); a path
in them must be absolute.

Options:
  --address URL      dashboard/job address (default $RAY_ADDRESS or http://127.0.0.1:<dashboard port>)
  --port P           GCS port of a head started here (default 6379)
  --dashboard-port P (default 8265)     --agent-port P  dashboard agent port (default 52365)
  --client-port P    Ray client server port (default 10001)
  --num-cpus N, --num-gpus N            resources of a head started here (default: detected)
  --temp-dir DIR     Ray's temp/log dir for a head started here (keep it short: socket paths)
                     (--temp-dir and a --python path are made absolute too)
  --keep             leave a head started here running
  --no-wait          submit and return (follow with `ray job logs --follow ID`)
  --python PATH      python on the head node (default $VIP_PYTHON, else this repo's
                     .venv/bin/python, else python3)
  --dry-run          print the `ray job submit` command (one line, shell-quoted) and exit, without
                     probing or starting Ray
  -h, --help         print this text and exit
EOF
}

PROG=caption.sh
# shellcheck source=launch/args.sh
source "$(dirname "${BASH_SOURCE[0]}")/args.sh"     # die, need_value, int_opt
ORIG_PWD="$PWD"
# a path given from the caller's cwd → absolute (it need not exist; symlinks are kept as given)
abspath() {
  local p="$1"
  while [[ "$p" == ./* ]]; do p="${p#./}"; done
  if [[ "$p" == /* ]]; then echo "$p"; elif [[ "$p" == . ]]; then echo "$ORIG_PWD"; else echo "$ORIG_PWD/$p"; fi
}

ADDRESS="${RAY_ADDRESS:-}" PORT=6379 DASH_PORT=8265 AGENT_PORT=52365 CLIENT_PORT=10001
NUM_CPUS="" NUM_GPUS="" TEMP_DIR="" KEEP=0 WAIT=1 DRY_RUN=0 CONFIG=""
PY="${VIP_PYTHON:-}"
JOB=()                                          # `vip caption` arguments from the options
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) need_value "$@"; ADDRESS="$2"; shift 2 ;;
    --port) need_value "$@"; int_opt PORT "$1" "$2" 1 65535; shift 2 ;;
    --dashboard-port) need_value "$@"; int_opt DASH_PORT "$1" "$2" 1 65535; shift 2 ;;
    --agent-port) need_value "$@"; int_opt AGENT_PORT "$1" "$2" 1 65535; shift 2 ;;
    --client-port) need_value "$@"; int_opt CLIENT_PORT "$1" "$2" 1 65535; shift 2 ;;
    --num-cpus) need_value "$@"; int_opt NUM_CPUS "$1" "$2" 0; shift 2 ;;
    --num-gpus) need_value "$@"; int_opt NUM_GPUS "$1" "$2" 0; shift 2 ;;
    --temp-dir) need_value "$@"; TEMP_DIR="$(abspath "$2")"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    --python) need_value "$@"; PY="$2"; [[ "$PY" != */* ]] || PY="$(abspath "$PY")"; shift 2 ;;
    --shards) need_value "$@"; JOB+=("caption.shards=$(abspath "$2")"); shift 2 ;;
    --out) need_value "$@"; JOB+=("caption.out=$(abspath "$2")"); shift 2 ;;
    --model-dir) need_value "$@"; JOB+=("caption.model=local-dir:$(abspath "$2")"); shift 2 ;;
    --weights) need_value "$@"; JOB+=("caption.pretrained=$(abspath "$2")"); shift 2 ;;
    --config)
      need_value "$@"
      if [[ "$2" == *.yaml || "$2" == *.yml ]]; then CONFIG="$(abspath "$2")"; else CONFIG="$2"; fi
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (the job's overrides go after \`--\`; see --help)" ;;
    *) die "unexpected argument '$1': put the job's overrides after \`--\` (see --help)" ;;
  esac
done
[[ -z "$CONFIG" ]] || JOB=(--config "$CONFIG" ${JOB[@]+"${JOB[@]}"})
JOB+=("$@")                                     # passed on unchanged and last: they win
cd "$(dirname "$0")/.."                         # `--working-dir .` uploads this repo

if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY="$PWD/.venv/bin/python"
  else PY="$(command -v python3 || command -v python || true)"; fi
  [[ -n "$PY" ]] || { echo "caption.sh: no python found (use --python)" >&2; exit 1; }
fi
RAY="$(dirname "$PY")/ray"; [[ -x "$RAY" ]] || RAY="$(command -v ray || true)"
if [[ -z "$RAY" ]]; then
  [[ "$DRY_RUN" == 1 ]] || { echo "caption.sh: no \`ray\` next to $PY or on PATH" >&2; exit 1; }
  RAY=ray
fi
ADDRESS="${ADDRESS:-http://127.0.0.1:$DASH_PORT}"
[[ "$ADDRESS" == *://* ]] || ADDRESS="http://$ADDRESS"

SUBMIT=("$RAY" job submit --address "$ADDRESS" --working-dir . --entrypoint-num-cpus 0)
[[ "$WAIT" == 1 ]] || SUBMIT+=(--no-wait)
SUBMIT+=(-- "$PY" -m vip caption ${JOB[@]+"${JOB[@]}"})
printf -v SHOWN '%q ' "${SUBMIT[@]}"; SHOWN="${SHOWN% }"
if [[ "$DRY_RUN" == 1 ]]; then echo "$SHOWN"; exit 0; fi

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
# Ray token auth: a head started where a token exists (~/.ray/auth_token) requires it; the job CLI
# only sends it in token mode, so say so whenever a token is at hand.
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ) ]]; then
  export RAY_AUTH_MODE=token
fi

# any HTTP answer (401 included: Ray's token auth, which the ray CLI handles) means a cluster is there
alive() { "$PY" -c "
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + '/api/version', timeout=3)
except urllib.error.HTTPError:
    pass" "$ADDRESS" >/dev/null 2>&1; }

HEAD_PID=""
# shellcheck disable=SC2317  # called from the EXIT trap
stop_head() {
  if [[ -n "$HEAD_PID" ]]; then
    echo "caption.sh: stopping the Ray head started for this job (pid $HEAD_PID)" >&2
    kill -TERM "$HEAD_PID" 2>/dev/null || true   # `ray start --block` stops its own cluster on SIGTERM
    wait "$HEAD_PID" 2>/dev/null || true
  fi
}

if ! alive; then
  case "$ADDRESS" in
    http://127.0.0.1:*|http://localhost:*) ;;
    *) echo "caption.sh: no Ray cluster answers at $ADDRESS (start one: docs/captioning.md)" >&2; exit 2 ;;
  esac
  HEAD=("$RAY" start --head --block --node-ip-address 127.0.0.1 --port "$PORT" --dashboard-host 127.0.0.1
        --dashboard-port "$DASH_PORT" --dashboard-agent-listen-port "$AGENT_PORT"
        --ray-client-server-port "$CLIENT_PORT" --disable-usage-stats)
  [[ -n "$NUM_CPUS" ]] && HEAD+=(--num-cpus "$NUM_CPUS")
  [[ -n "$NUM_GPUS" ]] && HEAD+=(--num-gpus "$NUM_GPUS")
  [[ -n "$TEMP_DIR" ]] && HEAD+=(--temp-dir "$TEMP_DIR")
  echo "caption.sh: starting a Ray head on 127.0.0.1 (dashboard $ADDRESS)" >&2
  if [[ "$KEEP" == 1 ]]; then
    nohup "${HEAD[@]}" >/dev/null 2>&1 &
  else
    "${HEAD[@]}" >&2 &
    HEAD_PID=$!
    trap stop_head EXIT
  fi
  for _ in $(seq 1 120); do alive && break; sleep 1; done
  alive || { echo "caption.sh: the Ray head did not come up" >&2; exit 1; }
fi

echo "caption.sh: $SHOWN" >&2
set +e
"${SUBMIT[@]}"
rc=$?
set -e
exit $rc
