#!/usr/bin/env bash
# Train on one machine with NPROC workers (one per GPU):
#   launch/single_node.sh NPROC [hydra overrides ...]
#   e.g. launch/single_node.sh 8 experiment=qwen3_4b_ttt parallel.cp=2
# Exit code: the driver's (0 done, 75 saved and stopped early: rerun to continue). See launch/README.md.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 NPROC [hydra overrides ...]" >&2
    exit 2
fi
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_int NPROC "$1"
nproc_per_node=$1
shift
set_threads "$nproc_per_node"
exec "$PYTHON" "$LAUNCH_DIR/torchrun.py" --standalone --nproc-per-node "$nproc_per_node" \
    --max-restarts "$MAX_RESTARTS" -m "$TTT_ENTRY" "$@"
