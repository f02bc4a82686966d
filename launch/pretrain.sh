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
                     A SIGTERM/SIGINT to this script is passed on to the launcher and the ranks
                     (they checkpoint and stop); the exit status is the launcher's.

Options:
  --nproc N          processes per node (default: the node's GPUs, or 2 on a CPU machine)
  --hostfile FILE    hostfile mode
  --node-rank R      scheduler mode: this node's rank (0 .. NNODES-1)
  --nnodes N         scheduler mode: number of nodes
  --master-addr A    address of node 0 (scheduler mode; optional with --hostfile)
  --master-port P    rendezvous port (default $MASTER_PORT or 29500)
  --python PATH      python with deepspeed (default $VIP_PYTHON or this repo's .venv/bin/python)
  --dry-run          print the command that would run (one line, shell-quoted) and exit
  -h, --help         print this text and exit
EOF
}

PROG=pretrain.sh
# shellcheck source=launch/args.sh
source "$(dirname "${BASH_SOURCE[0]}")/args.sh"     # die, need_value, int_opt

REPO="$(cd "$(dirname "$0")/.." && pwd)"     # paths in the config stay relative to the caller's cwd

NPROC="" HOSTFILE="" NODE_RANK="" NNODES="" MASTER_ADDR_OPT="" MASTER_PORT_OPT="${MASTER_PORT:-29500}"
PY="${VIP_PYTHON:-$REPO/.venv/bin/python}" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) need_value "$@"; int_opt NPROC "$1" "$2" 1; shift 2 ;;
    --hostfile) need_value "$@"; HOSTFILE="$2"; shift 2 ;;
    --node-rank) need_value "$@"; int_opt NODE_RANK "$1" "$2" 0; shift 2 ;;
    --nnodes) need_value "$@"; int_opt NNODES "$1" "$2" 1; shift 2 ;;
    --master-addr) need_value "$@"; MASTER_ADDR_OPT="$2"; shift 2 ;;
    --master-port) need_value "$@"; int_opt MASTER_PORT_OPT "$1" "$2" 1 65535; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (the trainer's arguments go after \`--\`; see --help)" ;;
    *) die "unexpected argument '$1': put the trainer's arguments after \`--\` (see --help)" ;;
  esac
done
int_opt MASTER_PORT_OPT "--master-port (or \$MASTER_PORT)" "$MASTER_PORT_OPT" 1 65535

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
  # not exec: the hostfile is removed (EXIT trap) when the launcher ends. A SIGTERM/SIGINT/SIGHUP
  # sent to this script alone (preemption of a pod, Ctrl-C) is passed on to the launcher's whole
  # process tree, ranks included (they checkpoint and stop), and this script waits for all of it.
  "${DS[@]}" &
  CHILD=$! TREE=() SIGNALLED=0 FORWARDED=0
  # shellcheck disable=SC2317  # called from forward()
  tree() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do tree "$c"; done; echo "$1"; }
  # shellcheck disable=SC2317  # called from the traps below
  forward() {
    SIGNALLED=1 FORWARDED=1
    if kill -0 "$CHILD" 2>/dev/null; then mapfile -t TREE < <(tree "$CHILD"); fi
    kill -"$1" "${TREE[@]}" 2>/dev/null || true
  }
  trap 'forward TERM' TERM
  trap 'forward INT' INT
  trap 'forward HUP' HUP
  while :; do
    FORWARDED=0
    rc=0; wait "$CHILD" 2>/dev/null || rc=$?
    # a trapped signal interrupts `wait` (status > 128): wait again while the launcher is still there
    if ! (( FORWARDED && rc > 128 )) || ! kill -0 "$CHILD" 2>/dev/null; then break; fi
  done
  # after a signal the ranks may still be checkpointing when the launcher is gone: wait for them
  if (( SIGNALLED && ${#TREE[@]} )); then
    while kill -0 "${TREE[@]}" 2>/dev/null; do sleep 0.5; done
  fi
  exit "$rc"
elif [[ -n "$HOSTFILE" ]]; then
  DS+=(--hostfile "$HOSTFILE" ${MASTER_ADDR_OPT:+--master_addr "$MASTER_ADDR_OPT"})
else
  # one node: start deepspeed's per-node launcher directly (what the runner would run; one
  # interpreter start less). world_info is base64url(json.dumps({"localhost": [0, …, N-1]})).
  RANKS=""; for ((i = 0; i < NPROC; i++)); do RANKS+="${RANKS:+, }$i"; done
  WORLD_INFO=$(printf '{"localhost": [%s]}' "$RANKS" | base64 | tr -d '\n' | tr '+/' '-_')
  DS=("$PY" -u -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --master_addr=127.0.0.1
      --master_port="$MASTER_PORT_OPT")
fi
DS+=(--module vip.train "$@")
[[ "$DRY_RUN" == 0 ]] || { show "${DS[@]}"; exit 0; }
exec "${DS[@]}"
