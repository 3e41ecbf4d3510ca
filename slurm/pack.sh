#!/usr/bin/env bash
# Pack a huge dataset as a Slurm array job: each task packs one slice of the input list into
# OUT.parts/part-I-of-N/, then a dependent job merges the parts into OUT (atomic; the parts are
# removed after a successful merge). Run it on the login node:
#
#   slurm/pack.sh TASKS INPUT --out shards/NAME [pack options...]
#   e.g. slurm/pack.sh 16 /data/lgg/kaggle_3m --out shards/lgg --codec jp2 --workers 8
#
# It submits `sbatch --array=0-(TASKS-1)` of itself plus `sbatch --dependency=afterok:...` for
# the merge. A failed task can be re-run alone (sbatch --array=I ...); finished parts are kept
# and a re-run task whose part is complete does nothing. Extra sbatch options (partition,
# account) go in SBATCH_* environment variables, e.g. SBATCH_PARTITION=cpu.
#
# The same commands without Slurm (what the array tasks run):
#   python -m tumorseg_dist.pack INPUT --out shards/NAME --task-index I --num-tasks N [options]
#   python -m tumorseg_dist.pack --merge --out shards/NAME
#
#SBATCH --job-name=tumorseg-pack
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-pack-%A_%a.out
set -euo pipefail

PYTHON=${PYTHON:-python}
STAGE=${PACK_STAGE:-submit}

if [[ "$STAGE" == submit ]]; then
    if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
        echo "usage: slurm/pack.sh TASKS INPUT --out shards/NAME [pack options...]" >&2
        exit 2
    fi
    tasks=$1
    shift
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    array_id=$(sbatch --parsable --array=0-$((tasks - 1)) --export=ALL,PACK_STAGE=task,PACK_TASKS="$tasks" \
        "$here/pack.sh" "$@")
    array_id=${array_id%%;*}
    merge_id=$(sbatch --parsable --dependency=afterok:"$array_id" --cpus-per-task=1 \
        --export=ALL,PACK_STAGE=merge "$here/pack.sh" "$@")
    echo "submitted pack array job $array_id ($tasks tasks) and merge job ${merge_id%%;*}"
    exit 0
fi

# Inside the allocation: run the pack module from the submit directory.
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ "$STAGE" == task ]]; then
    exec "$PYTHON" -m tumorseg_dist.pack "$@" --no-progress \
        --task-index "${SLURM_ARRAY_TASK_ID:?not in an array job}" --num-tasks "${PACK_TASKS:?}"
elif [[ "$STAGE" == merge ]]; then
    out=""
    extra=()
    args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do
        case "${args[$i]}" in
            --out) out=${args[$((i + 1))]} ;;
            --out=*) out=${args[$i]#--out=} ;;
            --overwrite) extra+=(--overwrite) ;;
        esac
    done
    [[ -n "$out" ]] || { echo "slurm/pack.sh: --out is required" >&2; exit 2; }
    exec "$PYTHON" -m tumorseg_dist.pack --merge --out "$out" "${extra[@]}"
else
    echo "slurm/pack.sh: unknown PACK_STAGE=$STAGE (submit|task|merge)" >&2
    exit 2
fi
