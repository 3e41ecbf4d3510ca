"""torchrun elastic membership (issue 18): `--nnodes=1:4 --max-restarts` on localhost, real agents.

Two "nodes" (one torchrun agent with one worker each) share a c10d rendezvous on a free local
port. Node B leaves mid-epoch (its agent is SIGTERMed, as a preempted node's would be); node A's
worker stops at the same optimizer step, A's agent restarts it (a failure: one of its restarts)
and it resumes alone on 1 rank. Then node C joins; A's agent sees a waiting node (a membership
change, not a restart), stops its worker, and A and C resume on 2 ranks. The run ends with every
train sample seen once in the epoch and each logged loss equal to the uninterrupted 1-rank run's
(test_elastic.check: rel 1e-4).

No timing guesses: each worker is paused (SIGSTOP, and seen stopped) from the moment it logged
a step until its agent's SIGTERM is pending on it (/proc/PID/status), so the stop lands on the
next optimizer step (samples 12 and 24 of 36); every wait polls a file or a process with a
generous timeout. The agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as our launchers.
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TORCHRUN, run_cli
from test_deepspeed import ENV
from test_elastic import check, command, shards, steps  # noqa: F401 - `shards` is a fixture

pytestmark = pytest.mark.slow
WAIT = 300   # seconds: generous, a loaded 2-core box starts torch slowly
# As launch/common.sh exports it: with the agent's shared TCPStore, a node joining a group whose
# rank 0 is an agent of an earlier round waits forever for a bootstrap address that agent never
# republishes (seen here with torch 2.14: C in store.get(MASTER_ADDR), A in role_info).
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(shards, out):
    """test_elastic's training flags (per-rank batch 2, optimizer batch 12), the 2-rank layout."""
    args = command(shards, out, 2)
    return args[args.index("tumorseg_dist.train"):]


class Node:
    """One torchrun agent (its own process group), its output in a file."""

    def __init__(self, name, port, host, shards, out, tmp):
        self.log = tmp / f"{name}.log"
        conf = (f"is_host={int(host)},last_call_timeout=5,join_timeout={WAIT},"
                f"keep_alive_interval=1,keep_alive_max_attempt=3")
        cmd = [TORCHRUN, "--nnodes", "1:4", "--nproc-per-node", "1", "--max-restarts", "3",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "membership",
               "--rdzv-conf", conf, "--monitor-interval", "0.5", "-m", *train_args(shards, out)]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=tmp, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV, **AGENT_ENV})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker(self) -> int:
        """The pid of the agent's live training worker."""
        def find():
            for pid in descendants(self.proc.pid):
                if "tumorseg_dist.train" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    return pid
            return None
        return wait_for(find, f"a worker of {self.log.name}", self)

    def kill(self) -> None:
        """The agent and its workers (in sessions of their own: its group alone would orphan them)."""
        if self.proc.poll() is None:
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()


def descendants(pid: int) -> list[int]:
    try:
        kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in descendants(k)]


def wait_for(probe, what, *nodes, timeout=WAIT):
    """Poll `probe` until it returns something truthy; fail with the nodes' output if it never does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            got = probe()
        except (FileNotFoundError, ProcessLookupError):
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(f"--- {n.log.name}\n{n.text()[-3000:]}" for n in nodes))


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def stopped(pid: int) -> bool:
    return status(pid)["State"].startswith("T")


def sigterm_pending(pid: int) -> bool:
    fields = status(pid)
    return bool((int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)) & (1 << (signal.SIGTERM - 1)))


def logged_steps(out) -> int:
    return len(steps(out)) if (out / "steps.jsonl").is_file() else 0


def stop_after_next_step(node, out, signal_it, nodes):
    """Pause `node`'s worker once it logged a new step, have `signal_it()` make its agent SIGTERM
    it, and let it go on once the signal is pending: it stops at the next optimizer step."""
    seen = logged_steps(out)
    wait_for(lambda: logged_steps(out) > seen, "a training step", *nodes)
    pid = node.worker()
    os.kill(pid, signal.SIGSTOP)
    try:
        # SIGSTOP takes effect when the process is next scheduled: a SIGTERM that came first
        # would be handled (never seen pending) by a process that then stays stopped.
        wait_for(lambda: stopped(pid), f"{node.log.name}'s worker {pid} to stop", *nodes)
        signal_it()
        wait_for(lambda: sigterm_pending(pid), f"the SIGTERM of {node.log.name}'s agent (to {pid}: "
                 f"{Path(f'/proc/{pid}/cmdline').read_text()!r})", *nodes)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(command(shards, out, 1), cwd=out.parent, env=ENV)
    from test_elastic import chunk_losses
    return chunk_losses(steps(out))


def test_a_node_leaves_and_another_joins(shards, tmp_path, reference):
    out, port = tmp_path / "run", free_port()
    # B first: its agent keeps trying to reach the store until A (its host, who stays) is up,
    # so both are waiting when the first round opens and it starts with 2 nodes.
    b = Node("b", port, False, shards, out, tmp_path)
    a = Node("a", port, True, shards, out, tmp_path)
    nodes = [a, b]
    try:
        wait_for(lambda: "world size" in (out / "train.log").read_text(), "the run to start", *nodes)
        assert "world size 2," in (out / "train.log").read_text(), a.text()[-3000:]
        # B leaves: its agent forwards the SIGTERM to its worker; both ranks save at step 3.
        stop_after_next_step(b, out, lambda: b.proc.send_signal(signal.SIGTERM), nodes)
        b.proc.wait(timeout=WAIT)
        wait_for(lambda: "resumed on 1 ranks (written on 2)" in (out / "train.log").read_text(),
                 "node A alone resuming on 1 rank", *nodes)
        # C joins: A's agent sees a waiting node and SIGTERMs its worker, which saves at step 24.
        c = None

        def join():
            nonlocal c
            c = Node("c", port, False, shards, out, tmp_path)
            nodes.append(c)
        stop_after_next_step(a, out, join, nodes)
        assert a.proc.wait(timeout=WAIT) == 0, a.text()[-3000:]
        assert c.proc.wait(timeout=WAIT) == 0, c.text()[-3000:]
    finally:
        for n in nodes:
            n.kill()
    log = (out / "train.log").read_text()
    stops = [int(p) for p in re.findall(r"stop requested: .* sample (\d+) of 36", log)]
    assert stops == [12, 24], log[-3000:]                     # mid-epoch both times
    assert log.index("resumed on 1 ranks (written on 2)") < log.index("resumed on 2 ranks (written on 1)")
    check(out, shards, reference)
