"""launch/k8s/pytorchjob.yaml (Kubeflow PyTorchJob) and launch/skypilot.yaml: what our launch needs.

Neither is applied to a cluster here (docs/cluster.md, "Kubernetes and SkyPilot"). These tests load
each YAML and check its fields, then run its container / run script with a stand-in torchrun that
records its arguments and plays the workers' exit statuses: the training flags are parsed by
tumorseg_dist.config.parse, torchrun's flags by torch's own torchrun parser (with the environment
the operator would set), SkyPilot's torchrun flags are compared with launch/multinode.sh's, and
the exit-75 mapping is exercised, including a SIGTERM passed on by the pod's PID-1 shell.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from tumorseg_dist import config as tconfig
from tumorseg_dist.dist import REQUEUE_EXIT_CODE

yaml = pytest.importorskip("yaml", reason="PyYAML reads the launch YAMLs (pip install pyyaml)")

K8S = REPO / "launch" / "k8s" / "pytorchjob.yaml"
SKY = REPO / "launch" / "skypilot.yaml"

# Records its arguments (one per line) and environment, writes the workers' statuses the way
# launch/record_exit.py does, and exits like torchrun (1 when a worker failed). With FAKE_WAIT_TERM
# it runs until SIGTERM, then the workers "save" and exit 75.
FAKE_TORCHRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_OUT/argv"
env > "$FAKE_OUT/env"
statuses() { i=0; for s in $1; do echo "$s" > "$EXIT_CODE_DIR/rank$i"; i=$((i + 1)); done; }
if [ -n "${FAKE_WAIT_TERM:-}" ]; then
    trap 'statuses "75 75"; exit 1' TERM
    touch "$FAKE_OUT/ready"
    for _ in $(seq 300); do sleep 0.1; done   # not forever: 30 s, then fail
    exit 1
fi
statuses "${FAKE_STATUSES:-}"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_torchrun(tmp_path) -> Path:
    out = tmp_path / "fake"
    out.mkdir()
    exe = out / "torchrun"
    exe.write_text(FAKE_TORCHRUN)
    exe.chmod(0o755)
    return exe


def recorded(fake: Path) -> tuple[list[str], dict[str, str]]:
    argv = (fake.parent / "argv").read_text().splitlines()
    env = dict(ln.split("=", 1) for ln in (fake.parent / "env").read_text().splitlines() if "=" in ln)
    return argv, env


def mounted_under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def flag(argv: list[str], name: str) -> str:
    """The value of `--name V` / `--name=V` (the last one wins, as in argparse)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    assert value is not None, f"{name} not in {argv}"
    return value


def torchrun_options(argv: list[str], entry: str) -> tuple[dict[str, str], list[str]]:
    """torchrun's `--opt=value` options before the entry point, and what follows the entry point."""
    i = argv.index(entry)
    opts = dict(a.split("=", 1) for a in argv[:i])
    return opts, argv[i + 1:]


def splits_everywhere(batch: int, accum: int, worlds: list[int]) -> list[str]:
    """The layouts a resume cannot take (tumorseg_dist/resume_guard.py relayout's rule): a fresh
    run on w0 ranks has per-rank batch batch / w0 and optimizer batch batch x accum, both kept
    when it resumes on w1 ranks."""
    bad = []
    for w0 in worlds:
        if batch % w0:
            bad.append(f"--batch-size {batch} does not divide over {w0} ranks")
            continue
        per_rank, total = batch // w0, batch * accum
        bad += [f"started on {w0} ranks, optimizer batch {total} does not split on {w1} ranks of "
                f"{per_rank}" for w1 in worlds if total % (per_rank * w1)]
    return bad


# ---------------------------------------------------------------- Kubernetes (Kubeflow PyTorchJob)

@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(K8S.read_text())


def worker(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]


def container(job: dict) -> dict:
    (c,) = [c for c in worker(job)["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    return c


def container_env(job: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container(job).get("env", [])}


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args (unknown references stay as they are)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), s)


def train_args(job: dict, env: dict[str, str] | None = None) -> list[str]:
    return [expand(str(a), container_env(job) if env is None else env) for a in container(job)["args"]]


def operator_env(job: dict) -> dict[str, str]:
    """What the training operator adds for an elasticPolicy (pkg/controller.v1/pytorch/elastic.go)."""
    ep = job["spec"]["elasticPolicy"]
    (port,) = [p["containerPort"] for p in container(job)["ports"] if p["name"] == "pytorchjob-port"]
    env = {"PET_RDZV_ENDPOINT": f"{job['metadata']['name']}-worker-0:{port}",
           "PET_RDZV_BACKEND": ep["rdzvBackend"], "PET_NNODES": f"{ep['minReplicas']}:{ep['maxReplicas']}",
           "PET_MAX_RESTARTS": str(ep["maxRestarts"])}
    if ep.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in ep["rdzvConf"])
    return env


def run_pod_script(job: dict, tmp_path: Path, fake: Path, **fake_env) -> subprocess.Popen:
    c = container(job)
    assert c["command"][:2] == ["bash", "-c"], "the container runs its script with bash -c"
    script, name = c["command"][2], c["command"][3]
    env = {**os.environ, **container_env(job), **operator_env(job), "RUN_DIR": str(tmp_path / "run"),
           "HOSTNAME": f"{job['metadata']['name']}-worker-0", "TORCHRUN": str(fake),
           "FAKE_OUT": str(fake.parent), **fake_env}
    args = train_args(job, env)
    return subprocess.Popen(["bash", "-c", script, name, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_k8s_is_an_elastic_pytorchjob_of_workers(job):
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    ep = job["spec"]["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d"
    assert 1 <= ep["minReplicas"] <= worker(job)["replicas"] <= ep["maxReplicas"]
    assert ep["maxRestarts"] >= 1, "membership changes restart the worker group: allow some"
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}, "elastic jobs have workers only"
    assert [p["name"] for p in container(job)["ports"]] == ["pytorchjob-port"]
    # 75 is not retryable under ExitCode (1-127 are permanent): the script maps it (tested below).
    assert worker(job)["restartPolicy"] == "ExitCode"


def test_k8s_volumes_gpus_and_shm(job):
    spec = worker(job)["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    args = train_args(job)

    data = flag(args, "--data")
    (m,) = [m for p, m in mounts.items() if mounted_under(data, p)]
    assert m.get("readOnly") is True, "the shards are mounted read-only"
    assert volumes[m["name"]]["persistentVolumeClaim"]["readOnly"] is True

    out = flag(args, "--out")
    assert out == container_env(job)["RUN_DIR"]
    (m,) = [m for p, m in mounts.items() if mounted_under(out, p)]
    assert not m.get("readOnly"), "the run directory is written"
    assert "persistentVolumeClaim" in volumes[m["name"]], "the run directory outlives the pod"

    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"

    assert int(container(job)["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["terminationGracePeriodSeconds"] > int(container_env(job)["SHUTDOWN_TIMEOUT"]), \
        "the kubelet must wait longer than the training takes to save"


def test_k8s_training_flags_parse_and_fit_every_world_size(job):
    args = train_args(job)
    assert "$(" not in " ".join(args), "every $(VAR) in args is defined in env"
    cfg, preset = tconfig.parse(args)   # exits 2 on an unknown flag; the paths need not exist
    assert preset is None and str(cfg.data.path) == flag(args, "--data")
    assert cfg.train.resume == "auto", "a restarted pod continues from the run directory"
    w = cfg.model.encoder_weights
    assert w != "imagenet", "nothing is downloaded at run time"
    if w != "none":
        assert any(mounted_under(w, m["mountPath"]) for m in container(job)["volumeMounts"])
    assert cfg.data.loader == "torch", "the elastic data order needs the torch loader"
    assert container_env(job).get("HF_HUB_OFFLINE") == "1"

    ep = job["spec"]["elasticPolicy"]
    gpus = int(container(job)["resources"]["limits"]["nvidia.com/gpu"])
    worlds = [n * gpus for n in range(ep["minReplicas"], ep["maxReplicas"] + 1)]
    assert splits_everywhere(cfg.train.batch_size, cfg.engine.grad_accum, worlds) == []


def test_k8s_script_uses_the_operators_torchrun_contract(job, tmp_path, fake_torchrun, monkeypatch):
    script = container(job)["command"][2]
    names = set(container_env(job)) | set(operator_env(job))
    assert not [m for m in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", script) if m in names], \
        "Kubernetes would expand $(NAME) in the script itself: write $$(NAME)"
    p = run_pod_script(job, tmp_path, fake_torchrun, FAKE_STATUSES="0 0", FAKE_RC="0")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    argv, env = recorded(fake_torchrun)
    assert not [a for a in argv[:argv.index("launch/record_exit.py")]
                if re.match(r"--(nnodes|nproc|rdzv|master|node-rank|max-restarts|standalone)", a)], \
        "nodes, rendezvous and restarts come from the operator's PET_* environment"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env["EXIT_CODE_DIR"].startswith(str(tmp_path / "run" / "k8s"))

    # torchrun's own parser, with the environment the operator and the container set.
    for k, v in {**operator_env(job), "PET_NPROC_PER_NODE": container_env(job)["PET_NPROC_PER_NODE"]}.items():
        monkeypatch.setenv(k, v)
    from torch.distributed.run import get_args_parser
    a = get_args_parser().parse_args(argv)
    ep = job["spec"]["elasticPolicy"]
    assert a.nnodes == f"{ep['minReplicas']}:{ep['maxReplicas']}" and a.rdzv_backend == "c10d"
    assert a.rdzv_endpoint == f"{job['metadata']['name']}-worker-0:29400"
    assert a.max_restarts == ep["maxRestarts"] and a.nproc_per_node == "gpu"
    assert "SIGTERM" in a.signals_to_handle.split(",")
    assert a.shutdown_timeout == int(container_env(job)["SHUTDOWN_TIMEOUT"])
    assert a.training_script == "launch/record_exit.py" and (REPO / a.training_script).is_file()
    assert a.training_script_args[0] == "tumorseg_dist.train"
    assert a.training_script_args[1:] == train_args(job, {**container_env(job), "RUN_DIR": str(tmp_path / "run")})


@pytest.mark.parametrize("statuses, rc, expected", [
    ("0 0", 0, 0),                                   # done
    (f"{REQUEUE_EXIT_CODE} {REQUEUE_EXIT_CODE}", 1, 143),  # saved: retryable under ExitCode
    ("1 0", 1, 1),                                   # a crash: permanent
    ("2 2", 1, 1),                                   # a bad flag: permanent
])
def test_k8s_maps_exit_75_to_a_retryable_status(job, tmp_path, fake_torchrun, statuses, rc, expected):
    p = run_pod_script(job, tmp_path, fake_torchrun, FAKE_STATUSES=statuses, FAKE_RC=str(rc))
    _, err = p.communicate(timeout=60)
    assert p.returncode == expected, err


def test_k8s_pid1_shell_passes_sigterm_on_and_exits_retryable(job, tmp_path, fake_torchrun):
    p = run_pod_script(job, tmp_path, fake_torchrun, FAKE_WAIT_TERM="1")
    try:
        deadline = time.monotonic() + 30
        while not (fake_torchrun.parent / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1]
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)   # what the kubelet sends on eviction or preemption
        _, err = p.communicate(timeout=30)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)   # the script's session: the stand-in torchrun too
        except ProcessLookupError:
            pass
    assert p.returncode == 143, err
    assert "checkpoint saved" in err


# ---------------------------------------------------------------- SkyPilot

@pytest.fixture(scope="module")
def sky() -> dict:
    return yaml.safe_load(SKY.read_text())


def sky_env(sky: dict, rank: int, tmp_path: Path, fake: Path, **extra) -> dict[str, str]:
    return {**os.environ, **{k: str(v) for k, v in sky["envs"].items()},
            "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n", "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_GPUS_PER_NODE": "8",
            "TORCHRUN": str(fake), "FAKE_OUT": str(fake.parent), "TMPDIR": str(tmp_path), **extra}


def run_sky(sky: dict, rank: int, tmp_path: Path, fake: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", sky["run"]], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=sky_env(sky, rank, tmp_path, fake, **extra))


def test_skypilot_resources_and_mounts(sky):
    assert sky["num_nodes"] >= 1
    gpu, count = sky["resources"]["accelerators"].split(":")
    assert gpu and int(count) >= 1
    recovery = sky["resources"]["job_recovery"]
    assert REQUEUE_EXIT_CODE in recovery["recover_on_exit_codes"]
    mounts = sky["file_mounts"]
    data = mounts["/data/shards"]
    assert re.match(r"^[a-z0-9]+://", data["source"]) and data["mode"] == "MOUNT"
    assert data["config"]["mount"]["read_only"] is True
    runs = mounts["/runs"]
    assert re.match(r"^[a-z0-9]+://", runs["source"]), "the run directory is a bucket: it outlives the nodes"
    assert runs["mode"] == "MOUNT_CACHED" and runs.get("persistent", True) is not False
    assert "make setup" in sky["setup"]
    assert sky["envs"]["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("rank", [0, 1])
def test_skypilot_feeds_skypilot_variables_into_multinode_sh_contract(sky, tmp_path, fake_torchrun, rank):
    p = run_sky(sky, rank, tmp_path, fake_torchrun, FAKE_STATUSES="0", FAKE_RC="0")
    assert p.returncode == 0, p.stderr
    argv, env = recorded(fake_torchrun)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    sky_opts, sky_rest = torchrun_options(argv, "launch/record_exit.py")
    assert sky_rest[0] == "tumorseg_dist.train"

    # launch/multinode.sh given the same node, with the same stand-in torchrun.
    e = sky["envs"]
    m = subprocess.run(["bash", "launch/multinode.sh", "--epochs", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={
                           **os.environ, "MASTER_ADDR": "10.0.0.1", "NNODES": "2", "NODE_RANK": str(rank),
                           "NPROC_PER_NODE": "8", "MASTER_PORT": str(e["MASTER_PORT"]),
                           "RDZV_TIMEOUT": str(e["RDZV_TIMEOUT"]), "MAX_RESTARTS": str(e["MAX_RESTARTS"]),
                           "TORCHRUN": str(fake_torchrun), "FAKE_OUT": str(fake_torchrun.parent),
                           "TORCHRUN_LOG_DIR": str(tmp_path / "mn-logs")})
    assert m.returncode == 0, m.stderr
    mn_opts, mn_rest = torchrun_options(recorded(fake_torchrun)[0], "-m")
    assert mn_rest[0] == "tumorseg_dist.train"
    mn_opts.pop("--log-dir"), sky_opts.pop("--log-dir")
    assert sky_opts == mn_opts
    assert sky_opts["--rdzv-endpoint"] == f"10.0.0.1:{e['MASTER_PORT']}"
    assert f"is_host={int(rank == 0)}" in sky_opts["--rdzv-conf"]
    assert sky_opts["--nnodes"] == "2" and sky_opts["--nproc-per-node"] == "8"

    args = sky_rest[1:]
    cfg, _ = tconfig.parse(args)
    assert mounted_under(flag(args, "--data"), "/data/shards")
    assert flag(args, "--out") == f"/runs/{e['RUN_NAME']}" and mounted_under(flag(args, "--out"), "/runs")
    assert cfg.train.resume == "auto" and cfg.model.encoder_weights != "imagenet"


@pytest.mark.parametrize("statuses, rc, expected", [
    ("0", 0, 0), (f"{REQUEUE_EXIT_CODE} {REQUEUE_EXIT_CODE}", 1, REQUEUE_EXIT_CODE), ("1", 1, 1),
])
def test_skypilot_exits_75_when_a_checkpoint_was_saved(sky, tmp_path, fake_torchrun, statuses, rc, expected):
    p = run_sky(sky, 0, tmp_path, fake_torchrun, FAKE_STATUSES=statuses, FAKE_RC=str(rc))
    assert p.returncode == expected, p.stderr
