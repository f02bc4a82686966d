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
cd "$(dirname "$0")/.."

NPROC="" HOSTFILE="" NODE_RANK="" NNODES="" MASTER_ADDR_OPT="" MASTER_PORT_OPT="${MASTER_PORT:-29500}"
PY="${VIP_PYTHON:-.venv/bin/python}"
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

if [[ -z "$NPROC" ]]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu                     # CPU machines: gloo, one process per --nproc
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
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
  DS+=(--num_gpus "$NPROC" --master_addr 127.0.0.1)
fi
exec "${DS[@]}" --module vip.train "$@"
