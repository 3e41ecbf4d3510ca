"""A private single-host Slurm cluster for tests: munged + slurmctld + slurmd as our own processes.

Nothing system-wide is touched: the munge key, sockets, slurm.conf, state and spool directories
all live in one temporary directory, the ports are free ones picked at start, and the clients
(`sbatch`, `squeue`, `scontrol`) find this cluster through `SLURM_CONF`. `stop()` ends exactly
the three daemons this object started, by pid.

    with LocalSlurm(tmp_path) as cluster:
        job = cluster.sbatch(["slurm/train.sh", "--epochs", "1"], env={...})
        info = cluster.wait(job, timeout=180)

Requirements: `munged`, `slurmctld` and `slurmd` on PATH (Debian: `apt-get install slurm-wlm
munge`) and root (slurmd launches job steps through setuid/setgid). `unavailable()` says why a
machine cannot run it, for a pytest skip message.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
# Job states after which a job will not run again by itself.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    """The local cluster did not start or a client command failed; the message has the logs."""


def unavailable() -> str | None:
    """None when this machine can run a LocalSlurm, else the reason (for pytest.skip)."""
    missing = [p for p in DAEMONS + CLIENTS if shutil.which(p) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); "
                f"install with `apt-get install slurm-wlm munge` (CI's .ci/run does)")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch job steps; run the Slurm tests as root (CI does)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """What slurmd detects on this host (`slurmd -C`), so the node config always matches it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(kv.split("=", 1) for kv in first.split() if "=" in kv)


class LocalSlurm:
    """One-node Slurm cluster (this host, loopback) running as child processes of the test."""

    def __init__(self, root: Path, node_name: str | None = None):
        self.root = Path(root)
        self.node = node_name or socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for k in list(self.env):
            # Never talk to (or inherit a job context from) some other cluster.
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    # ------------------------------------------------------------------ set-up

    def _write_munge_key(self) -> Path:
        keydir = self.root / "munge-key"
        keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = keydir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        return key

    def write_conf(self) -> None:
        hw = node_hardware()
        for d in ("etc", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged checks that every directory on the socket path is not writable by others.
        (self.root / "munge").mkdir(mode=0o755, exist_ok=True)
        self.root.chmod(0o755)
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True,
                                                        text=True).stdout.strip()
        hw_keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        node_hw = " ".join(f"{k}={hw[k]}" for k in hw_keys if k in hw)
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/slurm_harness.py: a private one-node cluster for tests.
ClusterName=tumorsegtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} {node_hw} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.root, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self.write_conf()
        key = self._write_munge_key()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={m}/munged.pid",
                               f"--seed-file={m}/munged.seed", f"--log-file={m}/munged.log"])
        self._until(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._until(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0
                    and "UP" in self.run(["scontrol", "ping"], check=False).stdout,
                    timeout, "slurmctld did not answer `scontrol ping`")
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._until(lambda: self.node_state() == "idle",
                    timeout, "the node did not become idle")
        return self

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace: float = 15) -> None:
        """End the daemons this object started (slurmd first), by pid; SIGKILL after `grace`."""
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()

    # ------------------------------------------------------------------ queries

    def _until(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited during start-up\n{self.logs()}")
            if cond():
                return
            time.sleep(0.5)
        raise SlurmError(f"{what} within {timeout:.0f} s\n{self.logs()}")

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, capture_output=True, text=True, env=kw.pop("env", self.env),
                             timeout=kw.pop("timeout", 60), **kw)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def node_state(self) -> str:
        res = self.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False)
        return res.stdout.strip()

    def sbatch(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit; returns the job id. `env` adds to the cluster's environment (exported to the job)."""
        res = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env={**self.env, **(env or {})})
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job is in a final state (or `until(info)` is true); its last info."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if (until(info) if until else info.get("JobState") in FINAL_STATES):
                return info
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{', '.join(dead)} died while job {job_id} ran\n{self.logs()}")
            time.sleep(1)
        raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s\n"
                         f"{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)


# ---------------------------------------------------------------------- shared by the launcher tests

REPO = Path(__file__).resolve().parents[1]


def python_bin() -> str:
    """The interpreter running the tests (the project's .venv under `make test`)."""
    import sys
    return sys.executable


def torchrun_bin() -> str:
    cand = Path(python_bin()).with_name("torchrun")
    return str(cand) if cand.exists() else (shutil.which("torchrun") or "torchrun")


def pack_tiny_shards(out: Path, samples: int = 40, size: int = 64) -> Path:
    """A small packed synthetic set (train 28, val 8, test 4 with the default split)."""
    subprocess.run([python_bin(), "-m", "tumorseg_dist.pack", "--out", str(out), "--samples",
                    str(samples), "--size", str(size)], check=True, capture_output=True, cwd=REPO)
    return out


# The smallest training that still runs every part of the loop on CPU in a few seconds an epoch.
TINY_TRAIN_FLAGS = ["--device", "cpu", "--size", "64", "--batch-size", "4", "--encoder", "resnet18",
                    "--encoder-weights", "none", "--num-workers", "0", "--augment", "none"]


def launcher_env(**extra: str) -> dict[str, str]:
    """Environment for running launch/*.sh: the test's venv first on PATH, no Slurm context."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = f"{Path(python_bin()).parent}:{env.get('PATH', '')}"
    env["TORCHRUN"] = torchrun_bin()
    env["OMP_NUM_THREADS"] = "1"  # several ranks share 2 cores: oversubscribed OpenMP crawls
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a launcher started with start_new_session=True and everything it started."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_metrics(run_dir: Path) -> list[dict]:
    import json
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
