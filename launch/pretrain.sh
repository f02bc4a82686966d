#!/usr/bin/env bash
# Launch `vip pretrain` with the DeepSpeed launcher.
#
#   launch/pretrain.sh [launcher options] -- [--config PRESET] [section.field=value ...]
#
# Modes:
#   one machine        launch/pretrain.sh -- --config b32                # all GPUs of this node
#                      launch/pretrain.sh --nproc 2 -- --config tiny     # N processes (CPU: gloo)
#   hostfile           launch/pretrain.sh --hostfile hosts.txt -- --config b32
#                      (pdsh/ssh from this node to every host in the file: "host slots=8")
#   scheduler, 1 node  launch/pretrain.sh --node-rank "$NODE_RANK" --nnodes "$NNODES" \
#                        --master-addr "$MASTER_ADDR" -- --config b32
#                      (run once on every node, e.g. from srun or a Kubernetes pod; no ssh).
#                      Under SLURM the node rank, node count and master address are read
#                      from SLURM_NODEID, SLURM_NNODES and the first host of SLURM_JOB_NODELIST.
#
# Options: --nproc N (processes per node; default: GPUs, or 2 on a CPU machine),
#          --master-port P (default 29500), --python PATH (default .venv/bin/python).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"     # paths in the config stay relative to the caller's cwd

NPROC="" HOSTFILE="" NODE_RANK="" NNODES="" MASTER_ADDR_OPT="" MASTER_PORT_OPT="${MASTER_PORT:-29500}"
PY="${VIP_PYTHON:-$REPO/.venv/bin/python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR_OPT="$2"; shift 2 ;;
    --master-port) MASTER_PORT_OPT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) break ;;
  esac
done

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

if [[ -n "$NODE_RANK" ]]; then
  [[ -n "$NNODES" && -n "$MASTER_ADDR_OPT" ]] || { echo "--node-rank needs --nnodes and --master-addr" >&2; exit 2; }
  # every node runs this same line; a throwaway hostfile names the nodes for the launcher
  HF=$(mktemp); for i in $(seq 0 $((NNODES - 1))); do echo "node$i slots=$NPROC" >> "$HF"; done
  DS+=(--hostfile "$HF" --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NNODES" --num_gpus "$NPROC"
       --master_addr "$MASTER_ADDR_OPT")
elif [[ -n "$HOSTFILE" ]]; then
  DS+=(--hostfile "$HOSTFILE" ${MASTER_ADDR_OPT:+--master_addr "$MASTER_ADDR_OPT"})
else
  # one node: start deepspeed's per-node launcher directly (what the runner would run; one
  # interpreter start less)
  WORLD_INFO=$("$PY" -c "import base64, json, sys; n = int(sys.argv[1]); print(base64.urlsafe_b64encode(json.dumps({'localhost': list(range(n))}).encode()).decode())" "$NPROC")
  DS=("$PY" -u -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --master_addr=127.0.0.1
      --master_port="$MASTER_PORT_OPT")
fi
exec "${DS[@]}" --module vip.train "$@"
