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
                   `ray start --head --dashboard-host HEAD_ADDRESS`, on each GPU node
                   `ray start --address HEAD:6379` (docs/captioning.md). The job's driver runs on
                   the head; shards and sidecars must be on a filesystem every node sees (or s3://, gs://).
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
  --start-timeout S  seconds to wait for a head started here to answer (default 120); a head whose
                     `ray start` exits is reported at once, with the end of its output
  --keep             leave a head started here running
  --no-wait          submit and return (follow with `ray job logs --follow ID`); the job outlives
                     the script, so a head started here is kept (as with --keep)
  --python PATH      python on the head node (default $VIP_PYTHON, else this repo's
                     .venv/bin/python, else python3)
  --dry-run          print the `ray job submit` command (one line, shell-quoted) and exit, without
                     probing or starting Ray
  -h, --help         print this text and exit

Stopping: the job is submitted as vip-caption-<time>-<random>. When the script is stopped
(SIGINT/Ctrl-C, SIGTERM, SIGHUP, or its process group killed) while it waits for the job, it stops
the job (`ray job stop`, up to 20 s), then the head it started, and exits 128+signal. A head started
here runs in its own session, and a watcher does the same when the script dies by SIGKILL. With
--no-wait nothing is stopped. If a job is ever left running: `ray job stop --address URL ID`.

Exit status: 0 the job succeeded; 1 the job failed, or a head could not be started (a port in use,
`ray start` exited, no answer within --start-timeout); 2 a usage error, or no cluster answers at a
non-loopback --address; 128+N stopped by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP).
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
  if [[ "$p" == *://* ]]; then echo "$p"   # s3://, gs://, https://: as given
  elif [[ "$p" == /* ]]; then echo "$p"; elif [[ "$p" == . ]]; then echo "$ORIG_PWD"; else echo "$ORIG_PWD/$p"; fi
}

ADDRESS="${RAY_ADDRESS:-}" PORT=6379 DASH_PORT=8265 AGENT_PORT=52365 CLIENT_PORT=10001
NUM_CPUS="" NUM_GPUS="" TEMP_DIR="" KEEP=0 WAIT=1 DRY_RUN=0 CONFIG="" START_TIMEOUT=120
STOP_WAIT=20                                    # seconds `ray job stop` may take before we give up on it
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
    --start-timeout) need_value "$@"; int_opt START_TIMEOUT "$1" "$2" 1; shift 2 ;;
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

# our own submission id, so that the job can be stopped by name (ray job stop ADDRESS ID)
SUB_ID="vip-caption-$(date +%Y%m%d-%H%M%S)-$(printf '%04x%04x' "$RANDOM" "$RANDOM")"
SUBMIT=("$RAY" job submit --address "$ADDRESS" --submission-id "$SUB_ID" --working-dir .
        --entrypoint-num-cpus 0)
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

# run `$2 …` in the background and wait at most $1 seconds: its exit status, or 124 (then TERMed).
# (bash reaps a background child as soon as it exits, so `kill -0` fails from then on)
# shellcheck disable=SC2317  # called from cleanup
bounded() {
  local s="$1" pid i rc=0; shift
  "$@" & pid=$!
  for ((i = 0; i < s * 5; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; rc=124; fi
  wait "$pid" || [[ "$rc" == 124 ]] || rc=$?
  return "$rc"
}

HEAD_PID=""      # the `ray start --block` of a head started here, while it is ours to stop
HEAD_LOG=""      # that head's stdout/stderr; kept when it failed or with --keep
KEEP_LOG=0
SUBMIT_PID=""    # the `ray job submit` client (it only tails the job's log)
SUBMIT_RC=""     # its exit status once it ended: 0 succeeded (or stopped by someone), 1 failed
WATCH_PID=""     # the watcher that stands in for us after a SIGKILL (start_watcher)
SIGNALLED="" CLEANING=0
DETACH=()        # setsid: a head (and the watcher) in its own session never gets our process group's signals
if command -v setsid >/dev/null; then DETACH=(setsid); fi

# shellcheck disable=SC2317  # called from cleanup
stop_job() {
  local rc=0
  if kill -0 "$SUBMIT_PID" 2>/dev/null; then
    kill -TERM "$SUBMIT_PID" 2>/dev/null || true     # the log tail; the job runs on without it
    wait "$SUBMIT_PID" 2>/dev/null || true
  fi
  echo "caption.sh: stopping job $SUB_ID (ray job stop, up to ${STOP_WAIT} s)" >&2
  bounded "$STOP_WAIT" "$RAY" job stop --address "$ADDRESS" "$SUB_ID" >&2 || rc=$?
  if [[ "$rc" == 0 ]]; then
    echo "caption.sh: job $SUB_ID has stopped" >&2
  else
    echo "caption.sh: could not confirm that job $SUB_ID stopped (exit $rc); if it still runs:" \
         "ray job stop --address $ADDRESS $SUB_ID" >&2
  fi
}

# shellcheck disable=SC2317  # called from cleanup
stop_head() {
  local pid="$HEAD_PID" i
  [[ -n "$pid" ]] || return 0
  HEAD_PID=""
  echo "caption.sh: stopping the Ray head started for this job (pid $pid)" >&2
  kill -TERM "$pid" 2>/dev/null || true             # `ray start --block` stops its own cluster on SIGTERM
  for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "caption.sh: the head did not stop within 60 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# EXIT: a job that may still run (we were signalled, or the client was killed) is stopped first, then
# the head started here; the job's driver is gone before its head goes.
# shellcheck disable=SC2317  # the EXIT trap
cleanup() {
  set +e                                        # (stderr may be gone, e.g. after SIGHUP: carry on)
  CLEANING=1
  if [[ "$WAIT" == 1 && -n "$SUBMIT_PID" ]] && [[ -n "$SIGNALLED" || -z "$SUBMIT_RC" || "$SUBMIT_RC" -gt 128 ]]; then
    stop_job
  fi
  stop_head
  if [[ -n "$WATCH_PID" ]]; then kill "$WATCH_PID" 2>/dev/null || true; fi
  if [[ -n "$HEAD_LOG" && "$KEEP_LOG" != 1 ]]; then rm -f "$HEAD_LOG"; fi
}

# SIGINT/SIGTERM/SIGHUP: exit 128+N through cleanup. A second signal leaves at once; the watcher, if
# any, then stops the job and the head.
# shellcheck disable=SC2317  # trap handler
on_signal() {
  if [[ -n "$SIGNALLED" ]]; then trap - EXIT; exit $((128 + $2)); fi
  SIGNALLED="$1"
  printf "\ncaption.sh: got SIG%s\n" "$1" >&2 || true   # (after a progress bar: its own line)
  [[ "$CLEANING" == 1 ]] || exit $((128 + $2))     # (during cleanup: let it finish)
}
trap cleanup EXIT
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

# SIGKILL cannot be trapped: a watcher in its own session waits until this script is gone without
# having ended it, then does what cleanup would have done (stop the job, then the head started here).
start_watcher() {
  [[ ${#DETACH[@]} -gt 0 && -z "$WATCH_PID" ]] || return 0
  local job=""
  [[ "$WAIT" != 1 ]] || job="$SUB_ID"
  # shellcheck disable=SC2016  # expanded by the watcher's bash
  "${DETACH[@]}" bash -c '
    while kill -0 "$1" 2>/dev/null; do sleep 1; done
    if [[ -n "$4" ]]; then
      echo "caption.sh watcher: pid $1 is gone; stopping job $4"
      "$2" job stop --address "$3" "$4" & j=$!
      for ((i = 0; i < $6; i++)); do kill -0 "$j" 2>/dev/null || break; sleep 1; done
      kill "$j" 2>/dev/null
    fi
    if [[ -n "$5" ]]; then echo "caption.sh watcher: stopping the Ray head (pid $5)"; kill -TERM "$5"; fi
  ' caption.sh-watcher "$$" "$RAY" "$ADDRESS" "$job" "$HEAD_PID" "$STOP_WAIT" \
    </dev/null >>"${HEAD_LOG:-/dev/null}" 2>&1 &
  WATCH_PID=$!
}

if ! alive; then
  case "$ADDRESS" in
    http://127.0.0.1:*|http://localhost:*) ;;
    *) echo "caption.sh: no Ray cluster answers at $ADDRESS (start one: docs/captioning.md)" >&2; exit 2 ;;
  esac
  if [[ "$WAIT" != 1 && "$KEEP" != 1 ]]; then
    echo "caption.sh: --no-wait: the head started here keeps running after the script (as with --keep)" >&2
    KEEP=1
  fi
  # its fixed ports must be free on 127.0.0.1 (else `ray start` fails only after ~40 s of GCS retries)
  busy="$("$PY" - "--port=$PORT" "--dashboard-port=$DASH_PORT" "--agent-port=$AGENT_PORT" \
          "--client-port=$CLIENT_PORT" <<'PY'
import socket, sys
for arg in sys.argv[1:]:
    name, port = arg.split("=")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a port in TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as e:
            print(f"  127.0.0.1:{port} ({name}): {e.strerror}")
PY
)"
  if [[ -n "$busy" ]]; then
    echo "caption.sh: the Ray head failed to start: a port it needs is in use" >&2
    echo "$busy" >&2
    echo "caption.sh: choose free ones (--port, --dashboard-port, --agent-port, --client-port), or pass" \
         "--address of the cluster that holds them" >&2
    exit 1
  fi
  HEAD=("$RAY" start --head --block --node-ip-address 127.0.0.1 --port "$PORT" --dashboard-host 127.0.0.1
        --dashboard-port "$DASH_PORT" --dashboard-agent-listen-port "$AGENT_PORT"
        --ray-client-server-port "$CLIENT_PORT" --disable-usage-stats)
  [[ -n "$NUM_CPUS" ]] && HEAD+=(--num-cpus "$NUM_CPUS")
  [[ -n "$NUM_GPUS" ]] && HEAD+=(--num-gpus "$NUM_GPUS")
  [[ -n "$TEMP_DIR" ]] && HEAD+=(--temp-dir "$TEMP_DIR")
  HEAD_LOG="$(mktemp "${TMPDIR:-/tmp}/vip-caption-head.XXXXXX")"
  [[ "$KEEP" != 1 ]] || KEEP_LOG=1
  echo "caption.sh: starting a Ray head on 127.0.0.1 (dashboard $ADDRESS; its output: $HEAD_LOG)" >&2
  # (a private head has nothing to drain: on SIGTERM it stops in seconds rather than Ray's 30)
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-2}" \
    ${DETACH[@]+"${DETACH[@]}"} nohup "${HEAD[@]}" </dev/null >>"$HEAD_LOG" 2>&1 &
  HEAD_PID=$!                                   # ours to stop until it answers (then: unless --keep)
  start_watcher
  deadline=$((SECONDS + START_TIMEOUT))
  until alive; do
    if ! kill -0 "$HEAD_PID" 2>/dev/null; then
      hrc=0; wait "$HEAD_PID" || hrc=$?
      HEAD_PID="" KEEP_LOG=1
      echo "caption.sh: the Ray head failed to start (exit $hrc); the end of its output ($HEAD_LOG):" >&2
      tail -n 30 "$HEAD_LOG" | sed 's/^/  | /' >&2
      exit 1
    fi
    if (( SECONDS >= deadline )); then
      KEEP_LOG=1
      echo "caption.sh: the Ray head (pid $HEAD_PID) did not answer at $ADDRESS within ${START_TIMEOUT} s" \
           "(--start-timeout); the end of its output ($HEAD_LOG):" >&2
      tail -n 30 "$HEAD_LOG" | sed 's/^/  | /' >&2
      exit 1                                    # cleanup stops it
    fi
    sleep 1
  done
  if [[ "$KEEP" == 1 ]]; then
    echo "caption.sh: the Ray head (pid $HEAD_PID) keeps running after this script; stop it with" \
         "kill -TERM $HEAD_PID" >&2
    HEAD_PID=""
    if [[ -n "$WATCH_PID" ]]; then kill "$WATCH_PID" 2>/dev/null || true; WATCH_PID=""; fi
  fi
fi

echo "caption.sh: $SHOWN" >&2
[[ "$WAIT" != 1 ]] || start_watcher             # (once: it may watch a head started above already)
"${SUBMIT[@]}" &
SUBMIT_PID=$!
rc=0
wait "$SUBMIT_PID" || rc=$?                     # a trapped signal interrupts this wait
SUBMIT_RC=$rc
exit "$rc"
