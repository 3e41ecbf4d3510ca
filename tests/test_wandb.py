"""wandb: `auto` picks offline without a key (no network), an offline run directory holds the
config and the metrics, and a wandb failure never stops training."""

import pytest

from conftest import PY, TINY, run_cli
from tumorseg_dist import tracking


def test_auto_mode_is_offline_without_a_key_and_online_with_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("disabled") == "disabled"


NO_NETWORK = r"""
import socket, sys, runpy
real = socket.socket.connect
def guard(self, addr):
    host = addr[0] if isinstance(addr, tuple) else addr
    if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        raise OSError(f"network access attempted: {addr}")
    return real(self, addr)
socket.socket.connect = guard
sys.argv = ["tumorseg_dist.train", *sys.argv[1:]]
runpy.run_module("tumorseg_dist.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_offline_run_writes_config_and_metrics_without_network(tmp_path, synthetic_shards):
    out = tmp_path / "run"
    env = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "WANDB_MODE": "offline",
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    p = run_cli([PY, "-c", NO_NETWORK, *TINY, "--data", str(synthetic_shards), "--out", str(out),
                 "--epochs", "2", "--batch-size", "8", "--wandb", "auto"], cwd=tmp_path, env=env)
    assert "wandb: offline run" in p.stdout and "auto -> offline" in p.stdout, p.stdout[-2000:]
    assert "network access attempted" not in p.stdout + p.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {f.name for f in runs[0].rglob("*")}
    assert any(n.endswith(".wandb") for n in files), files
    # the transaction log holds the resolved config and the per-step and per-epoch metrics
    blob = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
    for needle in (b"train/loss", b"train/lr", b"epoch/val_dice", b"epoch/images_per_s", b"val/overlays",
                   b"batch_size", b"encoder_weights"):
        assert needle in blob, needle
    assert (out / "wandb" / "run_id").read_text().strip() in runs[0].name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


class BrokenRun:
    id, url = "broken", None

    def __init__(self):
        self.calls = 0

    def log(self, *a, **k):
        self.calls += 1
        raise ConnectionError("wandb backend went away")

    def finish(self, exit_code=0):
        pass


def test_a_wandb_failure_is_reported_once_and_tracking_stops(tmp_path):
    said = []
    run = BrokenRun()
    t = tracking.Tracker(run, tmp_path, "online", said.append)
    t.log_step(1, 0.5, 1e-3)
    t.log_step(2, 0.4, 1e-3)
    t.log_epoch({"epoch": 1, "step": 2, "train_loss": 0.4}, None)
    t.finish()
    assert run.calls == 1 and len(said) == 1
    assert "wandb backend went away" in said[0] and "training continues" in said[0]
