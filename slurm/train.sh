#!/bin/bash
# Train on one or more Slurm nodes: one srun task per node runs torchrun, which starts one
# training process per GPU (c10d rendezvous on the job's first node). From the repository root:
#
#   sbatch slurm/train.sh --data shards/lgg --epochs 50
#   sbatch --nodes=4 --time=2-00:00:00 slurm/train.sh --data shards/lgg   # override any #SBATCH line
#
# Cross-validation (data packed with --folds K): one array task per fold, task k trains --fold k
# into runs/<job name>-<array job id>-f<k>/ (all folds of one submission side by side):
#
#   sbatch --array=0-4 slurm/train.sh --data shards/msd --epochs 50
#
# Run directory: runs/<job name>-<job id>/ (the same after a requeue); console log:
# <job name>-<job id>.out in the submit directory. Training flags are those of
# `python -m tumorseg_dist.train --help`; --out and --resume auto are added unless you pass them.
# Preemption: 120 s before the time limit Slurm sends USR1; the training saves a checkpoint and
# exits 75, and this script requeues the job, which resumes from it. See docs/cluster.md.
#
# ============================ ENVIRONMENT: EDIT FOR YOUR CLUSTER ============================
#SBATCH --job-name=tumorseg
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32          # CPU cores per node for loader workers
#SBATCH --time=24:00:00
##SBATCH --partition=gpu            # delete one '#' to use a partition
##SBATCH --account=my_project       # delete one '#' to charge an account
##SBATCH --mem=0                    # all the node's memory, on clusters that need --mem
#SBATCH --ntasks-per-node=1         # keep: one torchrun per node
#SBATCH --output=%x-%j.out          # keep %j: the log is named from the job id
#SBATCH --open-mode=append          # keep: a requeued job appends to the same log
#SBATCH --signal=B:USR1@120         # keep: checkpoint warning 120 s before the time limit
#SBATCH --requeue
#
# Software (runs on the first node; srun passes the environment on to every node):
# module purge
# module load cuda/12.4 python/3.11
VENV=${VENV:-${SLURM_SUBMIT_DIR:-$PWD}/.venv}  # the virtual environment made by `make setup`
# ================================ END OF ENVIRONMENT BLOCK ================================
#
# Knobs (environment variables, e.g. `NPROC_PER_NODE=2 sbatch slurm/train.sh ...`):
#   NPROC_PER_NODE   processes per node (default: the node's GPUs from Slurm, else 1)
#   RUN_DIR          run directory (default: $RUNS_DIR/<job name>-<job id>); RUNS_DIR=runs
#   RDZV_HOST        rendezvous address (default: NodeAddr of the first node)
#   RDZV_PORT        rendezvous port (default: 20000 + job id % 10000)
#   RDZV_TIMEOUT     seconds for all nodes to join before failing with an error (default 300)
#   MAX_RESTARTS     torchrun restarts of the worker group after a failure (default 0)
#   MAX_REQUEUES     stop requeueing after this many requeues (default 20)
#   SHUTDOWN_TIMEOUT seconds the training gets to checkpoint after USR1/TERM (default 90)
#   TORCHRUN_ARGS    extra torchrun arguments; REPO_DIR the checkout (default: submit dir)
set -uo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "tumorseg: error: REPO_DIR $REPO_DIR does not exist" >&2; exit 1; }
if [ ! -f launch/common.sh ]; then
    echo "tumorseg: error: $REPO_DIR is not the tumorseg_dist checkout: submit from the repository" \
         "root (cd tumorseg_dist && sbatch slurm/train.sh) or set REPO_DIR" >&2
    exit 1
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "tumorseg: error: run this with sbatch (sbatch slurm/train.sh ...); without Slurm use" \
         "launch/train.sh or launch/multinode.sh" >&2
    exit 1
fi
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
else
    echo "tumorseg: warning: no virtual environment at $VENV (set VENV in the environment" \
         "block); using $(command -v python3 || echo 'no python3')" >&2
fi
# shellcheck source=../launch/common.sh
source launch/common.sh

ATTEMPT=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_NNODES:-1}
NPROC=$(tumorseg_nproc)
RUNS_DIR=${RUNS_DIR:-runs}
# A job array over folds: task k is --fold k (unless the flags choose a fold), in its own run dir.
FOLD=""
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    case " $* " in *" --fold "*|*" --fold="*) ;; *) FOLD=$SLURM_ARRAY_TASK_ID ;; esac
    case " $* " in *" --out "*|*" --out="*)
        echo "tumorseg: error: an array job trains one fold per task, each in its own run directory:" \
             "leave --out out (task k writes $RUNS_DIR/<job name>-<array job id>-f<k>; set RUNS_DIR" \
             "to move them)" >&2
        exit 1 ;;
    esac
fi
RUN_DIR=${RUN_DIR:-$RUNS_DIR/${SLURM_JOB_NAME:-tumorseg}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${FOLD:+-f$FOLD}}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-0}
MAX_REQUEUES=${MAX_REQUEUES:-20}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
REQUEUE_EXIT_CODE=75   # tumorseg_dist.dist.REQUEUE_EXIT_CODE

# The user's --out wins (and becomes the run directory); --resume auto unless they chose one.
has_resume=0
prev=""
for a in "$@"; do
    case "$a" in
        --out=*) RUN_DIR=${a#--out=} ;;
        --resume|--resume=*) has_resume=1 ;;
    esac
    [ "$prev" = "--out" ] && RUN_DIR=$a
    prev=$a
done
train_args=()
case " $* " in *" --out "*|*" --out="*) ;; *) train_args+=(--out "$RUN_DIR") ;; esac
[ "$has_resume" = 1 ] || train_args+=(--resume auto)
[ -n "$FOLD" ] && train_args+=(--fold "$FOLD")
train_args+=("$@")

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "${RDZV_HOST:-}" ]; then
    RDZV_HOST=$(scontrol show node "$HEAD_NODE" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    RDZV_HOST=${RDZV_HOST:-$HEAD_NODE}
fi
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
ENDPOINT=$RDZV_HOST:$RDZV_PORT

STATE_DIR=$RUN_DIR/slurm
TORCHRUN_LOG_DIR=$STATE_DIR/torchrun-$ATTEMPT
export EXIT_CODE_DIR=$STATE_DIR/exit-$ATTEMPT
rm -rf "$TORCHRUN_LOG_DIR" "$EXIT_CODE_DIR"
mkdir -p "$TORCHRUN_LOG_DIR" "$EXIT_CODE_DIR"

echo "tumorseg: job $SLURM_JOB_ID attempt $ATTEMPT: $NNODES node(s) x $NPROC process(es)," \
     "rendezvous $ENDPOINT (timeout ${RDZV_TIMEOUT}s), run dir $RUN_DIR, $(date -Is)"

srun_args=(--nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" --kill-on-bad-exit=0)
# Slurm 22.05 does not pass the job's --cpus-per-task on to srun by itself.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of words on purpose
srun "${srun_args[@]}" torchrun \
    --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-conf="join_timeout=$RDZV_TIMEOUT" \
    --max-restarts="$MAX_RESTARTS" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    --log-dir="$TORCHRUN_LOG_DIR" \
    ${TORCHRUN_ARGS:-} \
    launch/record_exit.py tumorseg_dist.train "${train_args[@]}" &
SRUN_PID=$!

# USR1 (the time-limit warning, or `scancel --signal=USR1 --batch JOBID`) reaches only this
# shell: pass it to every process of the training step once. TERM (scancel, preemption, the
# time limit itself) is sent to the step's processes by Slurm directly: only note it here.
forwarded=0
on_usr1() {
    echo "tumorseg: $(date -Is) got USR1: asking the training to save a checkpoint and stop"
    if [ "$forwarded" = 0 ]; then
        forwarded=1
        scancel --signal=USR1 "$SLURM_JOB_ID" || kill -USR1 "$SRUN_PID"
    fi
}
trap on_usr1 USR1
trap 'echo "tumorseg: $(date -Is) got TERM: Slurm is stopping the job"' TERM

RDZV_MARKER=$STATE_DIR/rendezvous-failed-$ATTEMPT
rm -f "$RDZV_MARKER"
tumorseg_watch_rendezvous "$TORCHRUN_LOG_DIR" "$NNODES" "$((RDZV_TIMEOUT + 30))" "$SRUN_PID" \
    "$RDZV_MARKER" "$ENDPOINT" &
WATCHDOG_PID=$!

tumorseg_wait "$SRUN_PID"
rc=$?
kill "$WATCHDOG_PID" 2>/dev/null
wait "$WATCHDOG_PID" 2>/dev/null

codes=$(cat "$EXIT_CODE_DIR"/rank* 2>/dev/null | sort -n | uniq | tr '\n' ' ')
echo "tumorseg: $(date -Is) training step ended: srun status $rc, worker statuses: ${codes:-none recorded}"

if [ -e "$RDZV_MARKER" ] || { [ "$rc" -ne 0 ] && [ "$forwarded" = 0 ] \
        && [ "$(tumorseg_started_nodes "$TORCHRUN_LOG_DIR")" = 0 ]; }; then
    [ -e "$RDZV_MARKER" ] || tumorseg_rdzv_error "$ENDPOINT" "$NNODES" "$RDZV_TIMEOUT"
    exit 1
fi

if grep -qx "$REQUEUE_EXIT_CODE" "$EXIT_CODE_DIR"/rank* 2>/dev/null; then
    if [ "$ATTEMPT" -ge "$MAX_REQUEUES" ]; then
        echo "tumorseg: the training saved a checkpoint to be resumed, but job $SLURM_JOB_ID was" \
             "already requeued $ATTEMPT times (MAX_REQUEUES=$MAX_REQUEUES); resume with" \
             "'sbatch slurm/train.sh --out $RUN_DIR ...'" >&2
        exit "$REQUEUE_EXIT_CODE"
    fi
    echo "tumorseg: checkpoint saved in $RUN_DIR/checkpoints/last.pt; requeueing job $SLURM_JOB_ID" \
         "(it resumes with --resume auto)"
    # Slurm ends this script within moments of a successful requeue and queues the job again.
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "tumorseg: error: 'scontrol requeue $SLURM_JOB_ID' failed; resume by hand with" \
         "'sbatch slurm/train.sh --out $RUN_DIR ...'" >&2
    exit "$REQUEUE_EXIT_CODE"
fi

if [ "$rc" -eq 0 ]; then
    echo "tumorseg: done: $RUN_DIR"
    exit 0
fi
echo "tumorseg: error: training failed (srun status $rc, worker statuses: ${codes:-none});" \
     "see the messages above and $TORCHRUN_LOG_DIR" >&2
exit "$rc"
