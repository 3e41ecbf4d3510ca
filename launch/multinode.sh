#!/usr/bin/env bash
# Train on several hosts without a scheduler: run this once on every host, with the same flags.
#
#   # on host gpu-a (10.0.0.1), the rendezvous host:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 launch/multinode.sh --data shards/lgg --epochs 50
#   # on host gpu-b:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 launch/multinode.sh --data shards/lgg --epochs 50
#
#   # or, with the same hostfile on both hosts (one host per line, the first is the master;
#   # NODE_RANK is this host's line, found by name or address):
#   HOSTFILE=hosts.txt launch/multinode.sh --data shards/lgg --epochs 50
#
# Each host runs one torchrun with one process per visible GPU (or NPROC_PER_NODE CPU
# processes); the c10d rendezvous is hosted by NODE_RANK 0 on MASTER_ADDR:MASTER_PORT. Global
# ranks are assigned at the rendezvous. The data path and --out must be the same shared
# directory on every host. Knobs (environment variables):
#   MASTER_ADDR, NNODES, NODE_RANK   required unless HOSTFILE gives them
#   MASTER_PORT     rendezvous port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE  processes per host (default: visible GPUs, else 1)
#   RDZV_ID         rendezvous name, the same on every host (default tumorseg-MASTER_PORT)
#   RDZV_TIMEOUT    seconds for all hosts to join before failing with an error (default 300)
#   MAX_RESTARTS    restarts of the worker group after a failure (default 0)
#   TORCHRUN, TORCHRUN_ARGS, TORCHRUN_LOG_DIR (per-worker error files; default: a temp dir)
# See docs/cluster.md.
set -uo pipefail
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$REPO_DIR/launch/common.sh"

die() { echo "tumorseg: error: $*" >&2; exit 2; }

if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || die "HOSTFILE $HOSTFILE does not exist"
    mapfile -t hosts < <(sed -e 's/#.*//' -e 's/[[:space:]].*//' -e '/^$/d' "$HOSTFILE")
    [ "${#hosts[@]}" -gt 0 ] || die "HOSTFILE $HOSTFILE lists no hosts"
    NNODES=${NNODES:-${#hosts[@]}}
    MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
    if [ -z "${NODE_RANK:-}" ]; then
        me=" $(hostname) $(hostname -s 2>/dev/null) $(hostname -f 2>/dev/null) $(hostname -I 2>/dev/null) "
        for i in "${!hosts[@]}"; do
            case "$me" in *" ${hosts[$i]} "*) NODE_RANK=$i; break ;; esac
        done
        [ -n "${NODE_RANK:-}" ] || die "this host ($(hostname)) is not in $HOSTFILE; add it or set NODE_RANK"
    fi
fi
[ -n "${MASTER_ADDR:-}" ] && [ -n "${NNODES:-}" ] && [ -n "${NODE_RANK:-}" ] || die \
    "set MASTER_ADDR, NNODES and NODE_RANK (or HOSTFILE), e.g. on the first of two hosts:
  MASTER_ADDR=\$(hostname -i) NNODES=2 NODE_RANK=0 launch/multinode.sh --data shards/NAME"
case "$NNODES$NODE_RANK" in *[!0-9]*) die "NNODES ($NNODES) and NODE_RANK ($NODE_RANK) must be integers" ;; esac
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK $NODE_RANK must be below NNODES $NNODES"

MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-tumorseg-$MASTER_PORT}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
NPROC=$(tumorseg_nproc)
TORCHRUN=${TORCHRUN:-$(tumorseg_torchrun "$REPO_DIR")} || exit 2
ENDPOINT=$MASTER_ADDR:$MASTER_PORT
# NODE_RANK 0 hosts the rendezvous store: no guessing from host names, and a port that is
# already taken there fails at once instead of connecting to whatever holds it.
IS_HOST=0; [ "$NODE_RANK" = 0 ] && IS_HOST=1
own_log_dir=0
if [ -z "${TORCHRUN_LOG_DIR:-}" ]; then
    TORCHRUN_LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tumorseg-torchrun.XXXXXX")
    own_log_dir=1
fi
mkdir -p "$TORCHRUN_LOG_DIR"

echo "tumorseg: $(hostname): node $NODE_RANK of $NNODES, $NPROC process(es), rendezvous" \
     "$ENDPOINT (id $RDZV_ID, timeout ${RDZV_TIMEOUT}s)" >&2
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of words on purpose
"$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="$RDZV_ID" \
    --rdzv-conf="join_timeout=$RDZV_TIMEOUT,is_host=$IS_HOST" \
    --max-restarts="${MAX_RESTARTS:-0}" --log-dir="$TORCHRUN_LOG_DIR" \
    ${TORCHRUN_ARGS:-} \
    -m tumorseg_dist.train "$@" &
PID=$!
# Ctrl-C reaches torchrun directly (same process group): do not send it twice. A TERM or HUP
# sent to this script alone (kill, a supervisor) is passed on once.
trap ':' INT
trap 'kill -TERM "$PID" 2>/dev/null' TERM HUP

MARKER=$TORCHRUN_LOG_DIR/rendezvous-failed
tumorseg_watch_rendezvous "$TORCHRUN_LOG_DIR" "$NNODES" "$((RDZV_TIMEOUT + 30))" "$PID" "$MARKER" \
    "$ENDPOINT" &
WATCHDOG=$!
tumorseg_wait "$PID"
rc=$?
kill "$WATCHDOG" 2>/dev/null
wait "$WATCHDOG" 2>/dev/null

if [ -e "$MARKER" ]; then
    exit 1
fi
if [ "$rc" -ne 0 ] && [ "$(tumorseg_started_nodes "$TORCHRUN_LOG_DIR")" = 0 ]; then
    tumorseg_rdzv_error "$ENDPOINT" "$NNODES" "$RDZV_TIMEOUT"
    exit "$rc"
fi
[ "$own_log_dir" = 1 ] && [ "$rc" -eq 0 ] && rm -rf "$TORCHRUN_LOG_DIR"
exit "$rc"
