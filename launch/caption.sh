#!/usr/bin/env bash
# Submit the captioning job (`python -m captioning`) to a Ray cluster with `ray job submit`.
#
#   launch/caption.sh [options] -- [--config PRESET] [caption.field=value ...]
#
# Modes:
#   running cluster  launch/caption.sh --address http://HEAD:8265 -- caption.shards=/shared/shards
#                    (or export RAY_ADDRESS=http://HEAD:8265). Start the cluster first: on the head
#                    `ray start --head --dashboard-host 0.0.0.0`, on each GPU node
#                    `ray start --address HEAD:6379` (docs/captioning.md). The job's driver runs on
#                    the head; shards and sidecars must be on a filesystem every node sees.
#   one machine      launch/caption.sh -- caption.shards=data/shards
#                    When nothing answers at the address and it is a loopback one (the default
#                    http://127.0.0.1:8265), a head bound to 127.0.0.1 is started for this job and
#                    stopped when it ends (--keep leaves it running for the next job).
#
# Options: --address URL     dashboard/job address (default $RAY_ADDRESS or http://127.0.0.1:<dashboard port>)
#          --port P          GCS port of a head started here (default 6379)
#          --dashboard-port P   (default 8265)     --agent-port P  dashboard agent port (default 52365)
#          --client-port P   Ray client server port (default 10001)
#          --num-cpus N, --num-gpus N             resources of a head started here (default: detected)
#          --temp-dir DIR    Ray's temp/log dir for a head started here (keep it short: socket paths)
#          --keep            leave a head started here running
#          --no-wait         submit and return (follow with `ray job logs --follow ID`)
#          --python PATH     python on the head node (default: this repo's .venv/bin/python, else python)
# Relative paths in the overrides (caption.shards=data/shards) are made absolute: the job runs in
# a copy of this folder that `ray job submit --working-dir .` uploads.
set -euo pipefail
ORIG_PWD="$PWD"
cd "$(dirname "$0")/.."

ADDRESS="${RAY_ADDRESS:-}" PORT=6379 DASH_PORT=8265 AGENT_PORT=52365 CLIENT_PORT=10001
NUM_CPUS="" NUM_GPUS="" TEMP_DIR="" KEEP=0 WAIT=1
PY="${VIP_PYTHON:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dashboard-port) DASH_PORT="$2"; shift 2 ;;
    --agent-port) AGENT_PORT="$2"; shift 2 ;;
    --client-port) CLIENT_PORT="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    --python) PY="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n "2,/^set -euo/{/^set -euo/d;p}" "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY="$PWD/.venv/bin/python"; else PY="$(command -v python)"; fi
fi
RAY="$(dirname "$PY")/ray"; [[ -x "$RAY" ]] || RAY="$(command -v ray)"
ADDRESS="${ADDRESS:-http://127.0.0.1:$DASH_PORT}"
[[ "$ADDRESS" == *://* ]] || ADDRESS="http://$ADDRESS"
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

# relative paths (from where this script was called) → absolute: the job runs in an uploaded copy of the repo
ARGS=()
for a in "$@"; do
  if [[ "$a" == *=* ]]; then
    k="${a%%=*}" v="${a#*=}" pre=""
    [[ "$v" == local-dir:* ]] && pre="local-dir:" && v="${v#local-dir:}"
    if [[ -n "$v" && "$v" != /* && "$v" != null && "$v" != none ]] && \
       [[ -e "$ORIG_PWD/$v" || "$k" =~ (^|\.)(shards|out)$ ]]; then a="$k=$pre$ORIG_PWD/$v"; fi
  fi
  ARGS+=("$a")
done

SUBMIT=("$RAY" job submit --address "$ADDRESS" --working-dir . --entrypoint-num-cpus 0)
[[ "$WAIT" == 1 ]] || SUBMIT+=(--no-wait)
echo "caption.sh: ${SUBMIT[*]} -- $PY -m captioning ${ARGS[*]}" >&2
set +e
"${SUBMIT[@]}" -- "$PY" -m captioning "${ARGS[@]}"
rc=$?
set -e
exit $rc
