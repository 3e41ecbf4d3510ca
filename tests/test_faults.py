"""Faults: a process killed while writing a checkpoint never leaves an unloadable last.pt; a
run whose loss stays non-finite stops with a clear error (DeepSpeed path, one rank)."""
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import PY, REPO
from tumorseg_dist import checkpoint

WRITER = r"""
import sys, torch
from tumorseg_dist import checkpoint
path, n = sys.argv[1], 0
while True:  # rewrite last.pt forever; each version is a big tensor filled with its number
    n += 1
    checkpoint.atomic_save({"format_version": 1, "n": n, "w": torch.full((4_000_000,), float(n))}, path)
    print(n, flush=True)
"""


def test_kill_during_save_leaves_a_loadable_last_pt(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    for delay in (0.05, 0.23, 0.41, 0.67):  # land at different points of a ~16 MB write
        proc = subprocess.Popen([PY, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1" or path.is_file()  # one complete version exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = checkpoint.load(path)
        assert ck["w"].shape == (4_000_000,) and torch.all(ck["w"] == float(ck["n"]))
    # the temp files of killed writers are the only leftovers, and never named last.pt
    assert {p.name for p in path.parent.iterdir() if not p.name.startswith(".last.pt.tmp-")} == {"last.pt"}


NAN_DS = r"""
import os, sys, torch, torch.nn as nn, torch.nn.functional as F
from tumorseg_dist.config import Config
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine
from tumorseg_dist.engines import NonFiniteLossError
cfg = Config(); cfg.train.amp = "off"; cfg.train.channels_last = False; cfg.train.batch_size = 4
cfg.engine.engine, cfg.engine.zero_stage, cfg.engine.max_bad_steps = "deepspeed", int(sys.argv[1]), 3
cfg.optim.scheduler = "none"
calls = {"n": 0}
def loss_fn(logits, y):
    calls["n"] += 1
    loss = F.binary_cross_entropy_with_logits(logits, y)
    return loss if calls["n"] == 1 else loss * float("nan")
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
e = build_engine(cfg, net, DistInfo(0, 0, 1, torch.device("cpu")), loss_fn, 10)
x, y = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
e.train(); e.train_step(x, y)
good = [p.detach().clone() for p in e.model.parameters()]
e.train_step(x, y); e.train_step(x, y)
assert all(torch.equal(a, b) for a, b in zip(good, e.model.parameters())), "a NaN step changed the weights"
assert e.check_health() == 2
e.train_step(x, y)
try:
    e.check_health()
except NonFiniteLossError as err:
    print("STOPPED:", err)
"""


@pytest.mark.slow
def test_deepspeed_skips_nonfinite_steps_and_stops(tmp_path):
    for stage in ("0", "1"):
        p = subprocess.run([PY, "-c", NAN_DS, stage], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        assert "STOPPED: 3 consecutive optimizer steps had a non-finite loss" in p.stdout, (stage, p.stdout[-2000:])
