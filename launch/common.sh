# Shared settings of the launch scripts (sourced, not run). Every value can be set beforehand:
#   PYTHON                          interpreter with ttt-train installed (default: python)
#   TTT_ENTRY                       module the workers run (default: ttt_train.train)
#   WANDB_MODE                      offline unless set (sync later with `wandb sync`)
#   OMP_NUM_THREADS                 CPU threads per worker (default: the node's cores / workers per node)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits after forwarding SIGINT/SIGHUP/SIGQUIT, or after
#                                   a worker failed, before it SIGKILLs the other workers (default: 300)
#   MAX_RESTARTS                    times torchrun restarts the workers after one fails (default: 3); the
#                                   restarted run resumes from the last checkpoint. A run that saved and
#                                   stopped (exit 75) or was signalled to stop is never restarted
# shellcheck shell=bash

LAUNCH_DIR=${LAUNCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
PYTHON=${PYTHON:-python}
TTT_ENTRY=${TTT_ENTRY:-ttt_train.train}
export WANDB_MODE=${WANDB_MODE:-offline}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-3}
if [[ ! $MAX_RESTARTS =~ ^[0-9]+$ ]]; then
    echo "launch: MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'" >&2
    exit 2
fi

# set_threads WORKERS: OMP_NUM_THREADS = cores / WORKERS (at least 1) unless already set
set_threads() {
    local cores
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / $1 > 0 ? cores / $1 : 1 ))}
}

# need_int NAME VALUE: exit 2 naming NAME unless VALUE is a positive integer
need_int() {
    if [[ ! $2 =~ ^[1-9][0-9]*$ ]]; then
        echo "launch: $1 must be a positive integer, got '$2'" >&2
        exit 2
    fi
}
