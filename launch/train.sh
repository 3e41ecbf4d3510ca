#!/usr/bin/env bash
# Train on this machine with every visible GPU, one process each (or N CPU processes):
#
#   launch/train.sh --data shards/lgg --epochs 50             # all GPUs of this host
#   NPROC_PER_NODE=2 launch/train.sh --device cpu --epochs 2  # two CPU processes (gloo)
#
# Arguments are `python -m tumorseg_dist.train` flags. Knobs (environment variables):
#   NPROC_PER_NODE  processes (default: visible GPUs from CUDA_VISIBLE_DEVICES / nvidia-smi, else 1)
#   MAX_RESTARTS    restart the whole group this many times after a worker dies (default 0);
#                   add --resume auto (the default) so a restart continues from last.pt
#   TORCHRUN        the torchrun to use (default: .venv/bin/torchrun of this checkout, else PATH)
#   TORCHRUN_ARGS   extra torchrun arguments
# Several hosts: launch/multinode.sh. Slurm: sbatch slurm/train.sh. See docs/cluster.md.
set -euo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$REPO_DIR/launch/common.sh"

NPROC=$(tumorseg_nproc)
TORCHRUN=${TORCHRUN:-$(tumorseg_torchrun "$REPO_DIR")}
echo "tumorseg: $(hostname): $NPROC process(es), max restarts ${MAX_RESTARTS:-0}" >&2
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of words on purpose
exec "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC" \
    --max-restarts="${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-} \
    -m tumorseg_dist.train "$@"
