#!/usr/bin/env bash
# Train on several machines: run this on every node with the same overrides.
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=4 NODE_RANK=<0..3> GPUS_PER_NODE=8 \
#       launch/multi_node.sh [hydra overrides ...]
# torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT; the node with NODE_RANK=0 (which must be
# MASTER_ADDR) hosts it. NODE_RANK defaults to SLURM_NODEID under SLURM. RDZV_ID (default: the
# SLURM job id, else ttt-train) names the rendezvous.
# Exit code: the driver's (0 done, 75 saved and stopped early: rerun to continue).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
for name in MASTER_ADDR MASTER_PORT NNODES NODE_RANK GPUS_PER_NODE; do
    if [[ -z ${!name:-} ]]; then
        echo "launch: set $name (multi_node.sh needs MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, GPUS_PER_NODE)" >&2
        exit 2
    fi
done
need_int NNODES "$NNODES"
need_int GPUS_PER_NODE "$GPUS_PER_NODE"
need_int MASTER_PORT "$MASTER_PORT"
if [[ ! $NODE_RANK =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "launch: NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'" >&2
    exit 2
fi
is_host=false
if (( NODE_RANK == 0 )); then
    is_host=true
fi
set_threads "$GPUS_PER_NODE"
exec "$PYTHON" "$LAUNCH_DIR/torchrun.py" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-ttt-train}}" --rdzv-conf "is_host=$is_host" \
    --max-restarts "$MAX_RESTARTS" -m "$TTT_ENTRY" "$@"
