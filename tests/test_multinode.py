"""launch/: single-node and multi-host launchers, on one machine (2 CPU cores, gloo).

Two "nodes" are two torchrun agents on localhost (`--nnodes=2`, one process each). What a
wrong rank would break shows up here: with the local rank picking the data, both nodes would
read the same samples.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_harness import (REPO, TINY_TRAIN_FLAGS, free_port, launcher_env, pack_tiny_shards,  # noqa: E402
                           python_bin, read_metrics, stop_group, torchrun_bin)

LAUNCH = REPO / "launch"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return pack_tiny_shards(tmp_path_factory.mktemp("multinode") / "shards")


def nproc(**env: str) -> str:
    cmd = f"source {LAUNCH / 'common.sh'}; tumorseg_nproc"
    clean = launcher_env(PATH="/usr/bin:/bin")  # no nvidia-smi on this PATH
    clean.pop("TORCHRUN")
    return subprocess.run(["bash", "-c", cmd], env={**clean, **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_processes_per_node_from_override_slurm_or_visible_gpus():
    assert nproc() == "1"                                   # no GPU: one CPU process
    assert nproc(NPROC_PER_NODE="3", SLURM_GPUS_ON_NODE="8") == "3"
    assert nproc(SLURM_GPUS_ON_NODE="4") == "4"
    assert nproc(SLURM_GPUS_PER_NODE="a100:2") == "2"
    assert nproc(SLURM_GPUS_PER_NODE="0") == "1"            # CPU job with --gpus-per-node=0
    assert nproc(CUDA_VISIBLE_DEVICES="0,1,2") == "3"


def test_record_exit_passes_and_records_the_workers_status(tmp_path):
    (tmp_path / "stopper.py").write_text("import sys\nprint('saved')\nsys.exit(75)\n")
    (tmp_path / "crasher.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "fine.py").write_text("print('ok')\n")
    # how every tumorseg_dist command ends (os._exit after the atexit handlers)
    (tmp_path / "fast.py").write_text("from tumorseg_dist.cli import exit_with\nexit_with(75)\n")
    codes = tmp_path / "codes"
    for module, rank, want in (("stopper", "3", 75), ("crasher", "1", 1), ("fine", "0", 0), ("fast", "2", 75)):
        res = subprocess.run([python_bin(), str(LAUNCH / "record_exit.py"), module],
                             cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "EXIT_CODE_DIR": str(codes), "RANK": rank})
        assert res.returncode == want, res.stderr
        assert (codes / f"rank{rank}").read_text().strip() == str(want)
    assert "boom" in res.stderr or (codes / "rank1").exists()


def fake_torchrun(tmp_path: Path) -> Path:
    fake = tmp_path / "torchrun"
    fake.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    return fake


def test_multinode_arguments_from_env_and_hostfile(tmp_path):
    script = str(LAUNCH / "multinode.sh")
    env = launcher_env(TORCHRUN=str(fake_torchrun(tmp_path)), NPROC_PER_NODE="2")
    res = subprocess.run([script, "--epochs", "1"], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "set MASTER_ADDR, NNODES and NODE_RANK" in res.stderr

    res = subprocess.run([script, "--epochs", "1"], capture_output=True, text=True,
                         env={**env, "MASTER_ADDR": "10.1.2.3", "NNODES": "2", "NODE_RANK": "0"})
    args = res.stdout.split()
    assert res.returncode == 0, res.stderr
    assert {"--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=10.1.2.3:29500", "--rdzv-conf=join_timeout=300,is_host=1"} <= set(args)
    assert args[-4:] == ["-m", "tumorseg_dist.train", "--epochs", "1"]

    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"# the master first\nfirst-host slots=8\n{socket.gethostname()}\n")
    res = subprocess.run([script], capture_output=True, text=True,
                         env={**env, "HOSTFILE": str(hostfile), "MASTER_PORT": "4242"})
    assert res.returncode == 0, res.stderr
    assert "node 1 of 2" in res.stderr
    assert {"--nnodes=2", "--rdzv-endpoint=first-host:4242", "--rdzv-conf=join_timeout=300,is_host=0"} \
        <= set(res.stdout.split())

    hostfile.write_text("first-host\nsecond-host\n")
    res = subprocess.run([script], capture_output=True, text=True,
                         env={**env, "HOSTFILE": str(hostfile)})
    assert res.returncode == 2 and "is not in" in res.stderr


# A rank's view of the data: the loader the trainer builds, for a given global rank/world size.
KEYS_SCRIPT = """
import json, os, sys
from pathlib import Path
from tumorseg_dist import dist as distmod
from tumorseg_dist.config import parse
from tumorseg_dist.data.loader import build_loader

cfg, _ = parse(["--data", sys.argv[1], "--device", "cpu", "--size", "64", "--batch-size", "2",
                "--num-workers", "0", "--augment", "none"])
info = distmod.init("cpu")
out = {"rank": info.rank, "local_rank": info.local_rank, "world": info.world_size,
       "node": int(os.environ["GROUP_RANK"]), "train": {}, "val": []}
train = build_loader(cfg, Path(sys.argv[1]), "train", info, training=True)
for epoch in range(2):
    train.set_epoch(epoch)
    out["train"][epoch] = [k for b in train for k in b.keys]
out["steps"] = len(train)
out["val"] = [k for b in build_loader(cfg, Path(sys.argv[1]), "val", info, training=False)
              for k, v in zip(b.keys, b.valid.tolist()) if v]
Path(sys.argv[2], f"rank{info.rank}.json").write_text(json.dumps(out))
distmod.barrier()
distmod.cleanup()
"""


def test_two_nodes_read_disjoint_shard_subsets(tmp_path, shards):
    script = tmp_path / "keys.py"
    script.write_text(KEYS_SCRIPT)
    port = free_port()
    env = launcher_env()
    procs = [subprocess.Popen(
        [torchrun_bin(), "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=keys",
         f"--rdzv-conf=join_timeout=60,is_host={int(node == 0)}", str(script), str(shards), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            stop_group(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert {r["node"] for r in ranks} == {0, 1}
    assert [r["local_rank"] for r in ranks] == [0, 0]   # same local rank on both nodes...
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0   # ...equal steps, so no rank waits forever
    for epoch in ("0", "1"):
        a, b = set(ranks[0]["train"][epoch]), set(ranks[1]["train"][epoch])
        assert a and b and not a & b, f"epoch {epoch}: both nodes read {sorted(a & b)}"
        assert len(a | b) == manifest["splits"]["train"]["samples"]
    assert ranks[0]["train"]["0"] != ranks[0]["train"]["1"]  # reshuffled per epoch
    va, vb = ranks[0]["val"], ranks[1]["val"]
    assert not set(va) & set(vb)
    assert len(va) + len(vb) == manifest["splits"]["val"]["samples"]


def test_rendezvous_failure_is_a_clear_error_not_a_hang(tmp_path):
    # A node that never comes: node 0 of 2 gives up after RDZV_TIMEOUT.
    t0 = time.monotonic()
    res = subprocess.run([str(LAUNCH / "multinode.sh"), "--device", "cpu"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path,
                         env=launcher_env(MASTER_ADDR="127.0.0.1", NNODES="2", NODE_RANK="0",
                                          MASTER_PORT=str(free_port()), RDZV_TIMEOUT="5"))
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "rendezvous failed: the 2 node(s) did not all meet at 127.0.0.1" in res.stderr
    assert "RDZV_TIMEOUT=5" in res.stderr

    # The rendezvous port is held by something else: fails at once, naming the port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        res = subprocess.run([str(LAUNCH / "multinode.sh"), "--device", "cpu"], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path,
                             env=launcher_env(MASTER_ADDR="127.0.0.1", NNODES="1", NODE_RANK="0",
                                              MASTER_PORT=str(port), RDZV_TIMEOUT="30"))
    assert res.returncode != 0
    assert time.monotonic() - t0 < 45
    assert "address already in use" in res.stderr.lower() or "EADDRINUSE" in res.stderr
    assert f"port {port} is free on the first node" in res.stderr


@pytest.mark.slow
def test_two_hosts_train_together(tmp_path, shards):
    run = tmp_path / "run"
    env = launcher_env(MASTER_ADDR="127.0.0.1", NNODES="2", MASTER_PORT=str(free_port()),
                       NPROC_PER_NODE="1", RDZV_TIMEOUT="60")
    procs = [subprocess.Popen(
        [str(LAUNCH / "multinode.sh"), "--data", str(shards), *TINY_TRAIN_FLAGS, "--epochs", "2",
         "--out", str(run)], env={**env, "NODE_RANK": str(node)}, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            stop_group(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "world size 2" in "".join(outs)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "test_metrics.json").is_file()


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{global rank: pid} of the training processes started by the torchrun agent."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_resumes_from_last_checkpoint(tmp_path, shards):
    run = tmp_path / "run"
    # launch/train.sh execs torchrun: its pid is the agent's.
    agent = subprocess.Popen(
        [str(LAUNCH / "train.sh"), "--data", str(shards), *TINY_TRAIN_FLAGS, "--epochs", "2",
         "--log-every", "1", "--out", str(run)],
        env=launcher_env(NPROC_PER_NODE="2", MAX_RESTARTS="1"), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and read_metrics(run)):
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() < deadline, "the first epoch never finished"
            time.sleep(0.3)
        time.sleep(1.0)  # into epoch 2
        pids = worker_pids(agent.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        out = agent.communicate(timeout=400)[0]
    finally:
        stop_group(agent)
    assert agent.returncode == 0, out
    assert "resumed from" in out and "last.pt: epoch 1" in out, out
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert (run / "test_metrics.json").is_file()
