#!/usr/bin/env bash
# Launch `vip pretrain` (python -m vip.train) with the DeepSpeed launcher; usage() below, or --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/pretrain.sh [options] -- [--config PRESET] [section.field=value ...]

Launch `vip pretrain` (python -m vip.train) with the DeepSpeed launcher. Everything after `--`
goes to the trainer unchanged; paths in it stay relative to the caller's cwd.

Modes:
  one machine        launch/pretrain.sh -- --config b32                # all GPUs of this node
                     launch/pretrain.sh --nproc 2 -- --config tiny     # N processes (CPU: gloo)
  hostfile           launch/pretrain.sh --hostfile hosts.txt -- --config b32
                     (pdsh/ssh from this node to every host in the file: "host slots=8")
  scheduler, 1 node  launch/pretrain.sh --node-rank "$NODE_RANK" --nnodes "$NNODES" \
                       --master-addr "$MASTER_ADDR" -- --config b32
                     (run once on every node, e.g. from srun or a Kubernetes pod; no ssh).
                     Under SLURM the node rank, node count and master address are read
                     from SLURM_NODEID, SLURM_NNODES and the first host of SLURM_JOB_NODELIST.

Pre-emption (one machine and scheduler modes): a SIGTERM/SIGINT to this script, to its process
group or to every process of the job is passed on to the ranks (a SIGHUP to this script as
SIGTERM), which checkpoint and stop; they get --grace seconds for it, then they are killed (the
previous complete checkpoint stays the one to resume). The exit status is then 128 + the signal
(143 for SIGTERM), or 0 when the run had just finished, or the launcher's status when a rank
failed. Without a signal the exit status is the launcher's. (With --hostfile, deepspeed's runner
stops the remote ranks itself.)

Options:
  --nproc N          processes per node (default: the node's GPUs, or 2 on a CPU machine)
  --hostfile FILE    hostfile mode
  --node-rank R      scheduler mode: this node's rank (0 .. NNODES-1)
  --nnodes N         scheduler mode: number of nodes
  --master-addr A    address of node 0 (scheduler mode; optional with --hostfile)
  --master-port P    rendezvous port (default $MASTER_PORT or 29500)
  --python PATH      python with deepspeed (default $VIP_PYTHON or this repo's .venv/bin/python)
  --grace SECONDS    pre-emption: time the ranks get to checkpoint and stop after a signal
                     (default $VIP_PREEMPT_GRACE or 120; not with --hostfile)
  --dry-run          print the launcher command (one line, shell-quoted) and exit
  -h, --help         print this text and exit
EOF
}

PROG=pretrain.sh
# shellcheck source=launch/args.sh
source "$(dirname "${BASH_SOURCE[0]}")/args.sh"     # die, need_value, int_opt

REPO="$(cd "$(dirname "$0")/.." && pwd)"     # paths in the config stay relative to the caller's cwd

NPROC="" HOSTFILE="" NODE_RANK="" NNODES="" MASTER_ADDR_OPT="" MASTER_PORT_OPT="${MASTER_PORT:-29500}"
PY="${VIP_PYTHON:-$REPO/.venv/bin/python}" DRY_RUN=0 GRACE="" GRACE_ENV="${VIP_PREEMPT_GRACE:-120}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) need_value "$@"; int_opt NPROC "$1" "$2" 1; shift 2 ;;
    --hostfile) need_value "$@"; HOSTFILE="$2"; shift 2 ;;
    --node-rank) need_value "$@"; int_opt NODE_RANK "$1" "$2" 0; shift 2 ;;
    --nnodes) need_value "$@"; int_opt NNODES "$1" "$2" 1; shift 2 ;;
    --master-addr) need_value "$@"; MASTER_ADDR_OPT="$2"; shift 2 ;;
    --master-port) need_value "$@"; int_opt MASTER_PORT_OPT "$1" "$2" 1 65535; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --grace) need_value "$@"; int_opt GRACE "$1" "$2" 0; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (the trainer's arguments go after \`--\`; see --help)" ;;
    *) die "unexpected argument '$1': put the trainer's arguments after \`--\` (see --help)" ;;
  esac
done
int_opt MASTER_PORT_OPT "--master-port (or \$MASTER_PORT)" "$MASTER_PORT_OPT" 1 65535
[[ -z "$GRACE" || -z "$HOSTFILE" ]] || die "--grace does not apply with --hostfile (deepspeed's runner stops the remote ranks itself)"
[[ -n "$GRACE" ]] || int_opt GRACE "\$VIP_PREEMPT_GRACE" "$GRACE_ENV" 0

# SLURM: one launcher per node, positions from the environment
if [[ -z "$NODE_RANK" && -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]; then
  NODE_RANK="$SLURM_NODEID"; NNODES="$SLURM_NNODES"
  MASTER_ADDR_OPT="${MASTER_ADDR_OPT:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
fi

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true); fi
if [[ "$GPUS" -eq 0 ]]; then
  export DS_ACCELERATOR=cpu                     # CPU machines: gloo, one process per --nproc
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
NPROC="${NPROC:-$([[ "$GPUS" -gt 0 ]] && echo "$GPUS" || echo 2)}"
DS=("$PY" -m deepspeed.launcher.runner --master_port "$MASTER_PORT_OPT")

# print the command instead of running it (--dry-run)
show() { local q; printf -v q '%q ' "$@"; echo "${q% }"; }

# Run the launcher "$@" as a child and set RC to its exit status, with pre-emption handled here.
# deepspeed's launcher answers SIGTERM/SIGINT by terminating the ranks, killing them 30 s later
# and exiting 1 (deepspeed/launcher/launch.py; not configurable). So it starts with both signals
# blocked (inherited through exec; the ranks unblock them: vip.train.launcher): a signal to this
# script, to its process group or to every process of the job stops the ranks only. This script
# passes it on to the launcher's process tree (again to processes that appear later), gives the
# ranks GRACE seconds to checkpoint and exit 143 (which comes back through the launcher), then
# kills what is left.
# shellcheck disable=SC2317  # functions called from traps
run_launcher() {
  CHILD="" SIG=0 SIGNAME="" DEADLINE=0 KILLED=0 RC=0
  declare -gA SENT=()                            # pids of the launcher's tree that got the signal
  tree() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do tree "$c"; done; echo "$1"; }
  alive() { kill -0 ${CHILD:+"$CHILD"} "${!SENT[@]}" 2>/dev/null; }
  forward() {                   # $1 the signal to pass on, $2 the number of the one received
    if (( SIG == 0 )); then
      SIG=$2 SIGNAME=$1 DEADLINE=$((SECONDS + GRACE))
      echo "$PROG: signal $2: SIG$1 passed on to the ranks (they checkpoint and stop; --grace ${GRACE}s)" >&2
    fi
    local p new=()
    if [[ -n "$CHILD" ]]; then
      for p in $(tree "$CHILD"); do [[ -n "${SENT[$p]:-}" ]] || { SENT[$p]=1; new+=("$p"); }; done
    fi
    (( ${#new[@]} == 0 )) || kill -"$SIGNAME" "${new[@]}" 2>/dev/null || true
  }
  trap 'forward TERM 15' TERM
  trap 'forward INT 2' INT
  trap 'forward TERM 1' HUP                      # a hang-up stops the ranks the same way
  "$PY" -c 'import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
  CHILD=$!
  (( SIG == 0 )) || forward "$SIGNAME" "$SIG"    # a signal came while it was being started
  wait "$CHILD" 2>/dev/null || RC=$?
  (( SIG )) || return 0
  # after a signal the launcher and its tree (ranks still checkpointing included) get until DEADLINE
  local n=0
  while alive && (( SECONDS < DEADLINE )); do
    sleep 0.2
    (( ++n % 5 )) || forward "$SIGNAME" "$SIG"   # ranks started after the signal get it too
  done
  if alive; then
    echo "$PROG: the ranks did not stop within --grace ${GRACE}s: killing them (the previous complete" \
         "checkpoint stays the one to resume)" >&2
    local left i; mapfile -t left < <(tree "$CHILD")
    kill -KILL "${left[@]}" "${!SENT[@]}" 2>/dev/null || true
    KILLED=1
    for ((i = 0; i < 50; i++)); do alive || break; sleep 0.1; done   # gone before this script is
  fi
  if (( RC == 128 + SIG )); then                 # `wait` was cut short by the signal: the launcher's own status
    local rc=0
    while :; do
      rc=0; wait "$CHILD" 2>/dev/null || rc=$?
      if (( rc <= 128 )) || ! kill -0 "$CHILD" 2>/dev/null; then break; fi   # else: cut short again
    done
    (( rc == 127 )) || RC=$rc                    # 127: its status was already collected by the first wait
  fi
  # stopped because of the signal (ranks exited 143 through the launcher, or were killed): 128 +
  # the signal; 0 (the run had just finished) and a failing rank's status pass through
  if (( KILLED || RC > 128 )); then RC=$((128 + SIG)); fi
}

if [[ -n "$NODE_RANK" ]]; then
  [[ -n "$NNODES" && -n "$MASTER_ADDR_OPT" ]] || die "--node-rank needs --nnodes and --master-addr"
  (( NODE_RANK < NNODES )) || die "--node-rank $NODE_RANK is not below --nnodes $NNODES"
  # every node runs this same line; a throwaway hostfile names the nodes for the launcher
  if [[ "$DRY_RUN" == 1 ]]; then
    HF="${TMPDIR:-/tmp}/vip-hostfile.XXXXXX"     # what mktemp would make; nothing is written
  else
    HF=$(mktemp "${TMPDIR:-/tmp}/vip-hostfile.XXXXXX")
    trap 'rm -f "$HF"' EXIT
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC"; done > "$HF"
  fi
  DS+=(--hostfile "$HF" --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NNODES" --num_gpus "$NPROC"
       --master_addr "$MASTER_ADDR_OPT" --module vip.train "$@")
  [[ "$DRY_RUN" == 0 ]] || { show "${DS[@]}"; exit 0; }
  run_launcher "${DS[@]}"                       # not exec: the hostfile is removed (EXIT trap) after it
  exit "$RC"
elif [[ -n "$HOSTFILE" ]]; then
  DS+=(--hostfile "$HOSTFILE" ${MASTER_ADDR_OPT:+--master_addr "$MASTER_ADDR_OPT"} --module vip.train "$@")
  [[ "$DRY_RUN" == 0 ]] || { show "${DS[@]}"; exit 0; }
  exec "${DS[@]}"                               # the runner stops the remote ranks on a signal (pdsh)
fi
# one node: start deepspeed's per-node launcher directly (what the runner would run; one
# interpreter start less). world_info is base64url(json.dumps({"localhost": [0, …, N-1]})).
RANKS=""; for ((i = 0; i < NPROC; i++)); do RANKS+="${RANKS:+, }$i"; done
WORLD_INFO=$(printf '{"localhost": [%s]}' "$RANKS" | base64 | tr -d '\n' | tr '+/' '-_')
DS=("$PY" -u -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --master_addr=127.0.0.1
    --master_port="$MASTER_PORT_OPT" --module vip.train "$@")
[[ "$DRY_RUN" == 0 ]] || { show "${DS[@]}"; exit 0; }
run_launcher "${DS[@]}"
exit "$RC"
