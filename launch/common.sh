# Shell helpers shared by launch/train.sh, launch/multinode.sh and slurm/train.sh (sourced, not run).

# Processes per node: NPROC_PER_NODE if set, else the GPUs Slurm gave this node, else the visible
# GPUs (CUDA_VISIBLE_DEVICES, then nvidia-smi), else 1 (one CPU process).
tumorseg_nproc() {
    local n=""
    if [ -n "${NPROC_PER_NODE:-}" ]; then
        n=$NPROC_PER_NODE
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        n=$SLURM_GPUS_ON_NODE
    elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        n=${SLURM_GPUS_PER_NODE##*:}          # "a100:4" -> 4
        n=${n%%(*}                            # "4(x2)" -> 4
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
    fi
    case "$n" in ''|0|*[!0-9]*) n=1 ;; esac
    echo "$n"
}

# How many torchrun agents (nodes) have started their workers: each agent creates
# LOG_DIR/<rdzv id>_<random>/attempt_0 once the rendezvous has completed.
tumorseg_started_nodes() {
    local d n=0
    for d in "$1"/*/attempt_0; do [ -d "$d" ] && n=$((n + 1)); done
    echo "$n"
}

# Troubleshooting text for a rendezvous that did not complete.
tumorseg_rdzv_error() {   # ENDPOINT NNODES TIMEOUT
    cat >&2 <<EOF
tumorseg: error: rendezvous failed: the $2 node(s) did not all meet at $1 within $3 s
  (RDZV_TIMEOUT=$3; torchrun's own error, if any, is above). The training never started.
  Check that:
  * every node started (launch/multinode.sh on each host, NODE_RANK 0..$(($2 - 1)), same NNODES);
  * $1 is the address of the first node and is reachable from every node
    (ping / 'nc -zv ${1%:*} ${1##*:}'; pick the right interface with MASTER_ADDR);
  * port ${1##*:} is free on the first node (another job or a stale torchrun may hold it:
    'ss -ltnp | grep ${1##*:}'; choose another with MASTER_PORT / RDZV_PORT);
  * no firewall blocks that port, or the ports the process group opens after it.
  See docs/cluster.md, "Troubleshooting the rendezvous".
EOF
}

# Background watchdog: if fewer than NNODES agents started workers within TIMEOUT seconds, print
# the rendezvous error, touch MARKER and stop PID (TERM, then KILL). Catches what torchrun's own
# join_timeout does not, such as a foreign process holding the port and never answering.
# One started agent is enough: the rendezvous completes for all nodes at once.
tumorseg_watch_rendezvous() {   # LOG_DIR NNODES TIMEOUT PID MARKER ENDPOINT
    local log_dir=$1 nnodes=$2 timeout=$3 pid=$4 marker=$5 endpoint=$6
    local waited=0
    while [ "$waited" -lt "$timeout" ]; do
        kill -0 "$pid" 2>/dev/null || return 0
        [ "$(tumorseg_started_nodes "$log_dir")" -ge 1 ] && return 0
        sleep 2; waited=$((waited + 2))
    done
    tumorseg_rdzv_error "$endpoint" "$nnodes" "$timeout"
    touch "$marker"
    kill -TERM "$pid" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    kill -KILL "$pid" 2>/dev/null
    return 0
}

# The torchrun to use: this checkout's .venv (what `make setup` builds), else the one on PATH.
tumorseg_torchrun() {   # REPO_DIR
    if [ -x "$1/.venv/bin/torchrun" ]; then
        echo "$1/.venv/bin/torchrun"
    elif command -v torchrun >/dev/null 2>&1; then
        command -v torchrun
    else
        echo "tumorseg: error: torchrun not found: run 'make setup' in $1 or activate your environment" >&2
        return 1
    fi
}

# Workers open their own store for the process group on every (re)start instead of sharing
# the rendezvous store: with the shared one, a group restarted after a worker died (torchrun
# --max-restarts) failed to connect ("Gloo connectFullMesh failed ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

tumorseg_wait() {   # PID -> returns its exit status
    # `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until the
    # process has really ended, so its own exit status is what we act on.
    local rc
    while :; do
        wait "$1"
        rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$1" 2>/dev/null; then continue; fi
        return "$rc"
    done
}
