"""Checkpoint safety (issue 20 points 1, 4, 11), with real files and real processes:

* no code from a checkpoint: a real malicious pickle (its __reduce__ writes a marker file) as
  each file DeepSpeed reads on resume, and as the --checkpoint of evaluate/predict/export;
* nothing non-finite is written: --lr 1e6 with AdamW on both engines;
* a full disk (a real small tmpfs where `mount` is allowed, else RLIMIT_FSIZE's EFBIG) is one
  line, the previous checkpoint stays intact and no temp file stays behind.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PY, REPO, SHARED_DATA, TINY, run_cli
from tumorseg_dist import checkpoint

ENV = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
FAST = [*TINY, "--batch-size", "8", "--verify-shards", "off"]
DS = ["--engine", "deepspeed", "--zero-stage", "2"]


class Evil:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant(path: Path, marker: Path, raw: bool = False) -> None:
    """Replace `path` by a malicious file: torch.save's zip format, or a bare pickle."""
    path.unlink(missing_ok=True)
    if raw:
        path.write_bytes(pickle.dumps({"module": Evil(marker)}))
    else:
        torch.save({"format_version": 1, "module": Evil(marker)}, path)


def one_line_error(p: subprocess.CompletedProcess, prog: str, names: Path) -> str:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{prog}: error:")]
    assert p.returncode == 2 and len(errors) == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert str(names) in errors[0], errors[0]
    return errors[0]


def train(shards: Path, out: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli([PY, "-m", "tumorseg_dist.train", *FAST, "--data", str(shards), "--out", str(out), *flags],
                   cwd=out.parent, env=ENV, check=check)


# ---------------------------------------------------------------- point 1: no code from a checkpoint


def test_every_torch_load_in_the_repo_is_weights_only():
    call = "torch." + "load("  # spelled apart so this file does not match itself
    sites = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or path.name == Path(__file__).name:
            continue
        text = path.read_text(errors="replace")
        for m in re.finditer(re.escape(call), text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            sites.append((path, text[m.start():i]))
    assert sites, "the scan found no torch.load at all"
    unsafe = [(str(p), c) for p, c in sites if "weights_only=True" not in c]
    assert not unsafe, unsafe


def test_refuse_code_makes_deepspeeds_own_load_weights_only(tmp_path):
    """DeepSpeed's checkpoint engine asks for weights_only=False; inside refuse_code it gets True."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from tumorseg_dist.engines.deepspeed_io import shard_globals
    marker, shard = tmp_path / "MARKER", tmp_path / "mp_rank_00_model_states.pt"
    for raw in (False, True):
        plant(shard, marker, raw=raw)
        with checkpoint.refuse_code(shard_globals()):
            with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(shard))):
                TorchCheckpointEngine().load(str(shard), map_location="cpu")
        assert not marker.exists()
    assert torch.load is checkpoint._TORCH_LOAD  # put back after the block


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory, synthetic_shards) -> Path:
    """A finished 1-epoch DeepSpeed ZeRO-2 run (one process): last.pt, best.pt and their shards."""
    out = tmp_path_factory.mktemp("ds") / "run"
    train(synthetic_shards, out, *DS, "--epochs", "1")
    return out


def ds_files(run: Path) -> dict[str, Path]:
    """Every file a DeepSpeed resume reads: our metadata and the shards of the tag it names."""
    tag = checkpoint.load(run / "checkpoints" / "last.pt")["deepspeed"]["tag"]
    shards = run / "checkpoints" / "deepspeed" / tag
    return {"last.pt": run / "checkpoints" / "last.pt",
            "model_states": shards / "mp_rank_00_model_states.pt",
            "optim_states": shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt"}


@pytest.mark.slow
@pytest.mark.parametrize("which,raw", [("last.pt", False), ("model_states", False), ("optim_states", False),
                                       ("optim_states", True)])
def test_deepspeed_resume_runs_no_code_from_any_file(ds_run, tmp_path, synthetic_shards, which, raw):
    run = tmp_path / "run"
    shutil.copytree(ds_run, run)
    target, marker = ds_files(run)[which], tmp_path / "MARKER"
    plant(target, marker, raw=raw)
    p = train(synthetic_shards, run, *DS, "--epochs", "2", check=False)
    assert not marker.exists(), "the checkpoint ran code"
    assert "refusing to load" in one_line_error(p, "train", target)


def _entry_points(ckpt: Path, tmp_path: Path, shards: Path) -> dict[str, list[str]]:
    image = next((SHARED_DATA / "busi").rglob("*.png"))
    return {"evaluate": ["-m", "tumorseg_dist.evaluate", "--checkpoint", str(ckpt), "--data", str(shards),
                         "--device", "cpu", "--out", str(tmp_path / "eval")],
            "predict": ["-m", "tumorseg_dist.predict", "--checkpoint", str(ckpt), str(image),
                        "--out", str(tmp_path / "pred"), "--device", "cpu"],
            "export": ["-m", "tumorseg_dist.export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "m.onnx")]}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["best.pt", "model_states", "optim_states"])
def test_evaluate_predict_export_run_no_code_from_a_deepspeed_run(ds_run, tmp_path, synthetic_shards, which):
    run = tmp_path / "run"
    shutil.copytree(ds_run, run)
    files = {**ds_files(run), "best.pt": run / "checkpoints" / "best.pt"}
    target, marker = files[which], tmp_path / "MARKER"
    plant(target, marker)
    for prog, args in _entry_points(target, tmp_path, synthetic_shards).items():
        p = run_cli([PY, *args], cwd=tmp_path, env=ENV, check=False)
        assert not marker.exists(), f"{prog} ran code from {target}"
        assert "refusing to load" in one_line_error(p, prog, target)


# ---------------------------------------------------------------- point 4: nothing non-finite is written


def test_nonfinite_names_buffers_optimizer_state_and_ema():
    state = {"model": {"bn.weight": torch.ones(3), "bn.running_var": torch.tensor([1.0, float("nan")]),
                       "bn.num_batches_tracked": torch.tensor(3)},
             "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")]), "step": torch.tensor(2.0)}}},
             "ema": {"bn.running_mean": torch.zeros(2)}, "best": float("inf")}  # a float inf is a value, kept
    bad = checkpoint.nonfinite(checkpoint.named_tensors(state))
    assert bad == ["model.bn.running_var", "optimizer.state.0.exp_avg"]
    state["ema"]["bn.running_mean"][0] = float("-inf")
    assert "ema.bn.running_mean" in checkpoint.nonfinite(checkpoint.named_tensors(state))


def all_finite(path: Path) -> bool:
    allowed = []
    if path.parent.parent.name == "deepspeed":  # a shard: DeepSpeed's loss scaler etc. (data only)
        from tumorseg_dist.engines.deepspeed_io import shard_globals
        allowed = shard_globals()
    return not checkpoint.nonfinite(checkpoint.named_tensors(checkpoint.load_file(path, "cpu", allowed)))


def checkpoint_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "checkpoints").rglob("*.pt"))}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_absurd_lr_never_writes_nonfinite_and_names_the_last_good_file(engine, tmp_path, synthetic_shards):
    flags = [*(DS if engine == "deepspeed" else []), "--optimizer", "adamw", "--lr", "1e6",
             "--max-bad-steps", "2", "--scheduler", "none", "--warmup-steps", "0"]
    # From scratch: the first save already holds NaN BatchNorm statistics, so none is written.
    fresh = tmp_path / "fresh"
    p = train(synthetic_shards, fresh, *flags, "--epochs", "3", check=False)
    assert "No checkpoint exists" in one_line_error(p, "train", fresh / "checkpoints")
    assert not list(fresh.rglob("*.pt"))
    # One good step saved (--max-steps 1: the weights are huge but finite), then the run continues.
    run = tmp_path / "run"
    train(synthetic_shards, run, *flags, "--epochs", "3", "--max-steps", "1")
    good = checkpoint.load(run / "checkpoints" / "last.pt")["train_state"]
    before = checkpoint_files(run)
    p = train(synthetic_shards, run, *flags, "--epochs", "3", check=False)
    line = one_line_error(p, "train", run / "checkpoints" / "last.pt")
    assert f"last.pt (epoch {good['epoch']}, step {good['step']}" in line, line
    assert checkpoint_files(run) == before, "a checkpoint file was replaced after the values went bad"
    assert all(all_finite(run / f) for f in before), "a checkpoint holds NaN/inf"


# ---------------------------------------------------------------- point 11: a full disk


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    return p.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB filesystem (tmpfs), or a skip where this user may not mount one."""
    where = tmp_path / "small"
    if not _mount_tmpfs(where, 8 * 2**20):
        pytest.skip("mount -t tmpfs is not allowed here; test_file_size_limit_is_named covers EFBIG")
    yield where
    subprocess.run(["umount", str(where)], check=True)


WRITE_TWICE = r"""
import resource, signal, sys, torch
from pathlib import Path
from tumorseg_dist import checkpoint
path, limit = Path(sys.argv[1]), int(sys.argv[2])
if limit:  # RLIMIT_FSIZE with SIGXFSZ ignored: the write fails with EFBIG instead of killing us
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
checkpoint.atomic_save({"format_version": 1, "w": torch.ones(2**18)}, path)  # 1 MiB: fits
try:
    checkpoint.atomic_save({"format_version": 1, "w": torch.zeros(2**21)}, path)  # 8 MiB: does not
except checkpoint.CheckpointError as e:
    print("ERROR:", e)
"""


def _write_twice(path: Path, limit: int) -> str:
    p = subprocess.run([PY, "-c", WRITE_TWICE, str(path), str(limit)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1, p.stdout
    assert torch.equal(checkpoint.load(path)["w"], torch.ones(2**18)), "the previous checkpoint changed"
    assert [q.name for q in path.parent.iterdir()] == [path.name], "a temp file was left behind"
    return lines[0]


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(small_fs):
    line = _write_twice(small_fs / "last.pt", 0)
    assert "disk full writing checkpoint" in line and str(small_fs / "last.pt") in line, line
    assert "needs about 8.0 MiB" in line and "previous checkpoint" in line and "is intact" in line, line


def test_file_size_limit_is_named(tmp_path):
    line = _write_twice(tmp_path / "last.pt", 4 * 2**20)
    assert "file size limit reached (EFBIG)" in line and "needs about 8.0 MiB" in line, line
    assert "is intact" in line, line


DS_FULL = r"""
import os, shutil, sys, torch, torch.nn as nn, torch.nn.functional as F
from pathlib import Path
from tumorseg_dist import checkpoint
from tumorseg_dist.config import Config
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine
ckpt_dir = Path(sys.argv[1])
cfg = Config(); cfg.train.amp = "off"; cfg.train.channels_last = False; cfg.train.batch_size = 4
cfg.engine.engine, cfg.engine.zero_stage = "deepspeed", 2
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Conv2d(64, 1, 1))
e = build_engine(cfg, net, DistInfo(0, 0, 1, torch.device("cpu")), F.binary_cross_entropy_with_logits, 10)
x, y = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
e.train(); e.train_step(x, y)
meta = {"format_version": 1, "train_state": {"epoch": 1, "step": 1}}
e.save_checkpoint(ckpt_dir / "last.pt", meta)
first = checkpoint.load(ckpt_dir / "last.pt")["deepspeed"]["tag"]
filler = ckpt_dir.parent / "filler"
with open(filler, "wb") as f:  # leave 4 KiB free: the next shard cannot be written
    f.write(b"x" * (shutil.disk_usage(ckpt_dir).free - 4096))
e.train_step(x, y)
try:
    e.save_checkpoint(ckpt_dir / "last.pt", {**meta, "train_state": {"epoch": 2, "step": 2}})
except checkpoint.CheckpointError as err:
    print("ERROR:", err)
print("TAG:", checkpoint.load(ckpt_dir / "last.pt")["deepspeed"]["tag"] == first)
print("FILES:", sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file()
                       and p.suffix == ".pt" or ".tmp-" in p.name))
"""


@pytest.mark.slow
def test_deepspeed_disk_full_keeps_the_previous_tag(tmp_path):
    where = tmp_path / "small"
    if not _mount_tmpfs(where, 32 * 2**20):
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        ckpt_dir = where / "checkpoints"
        p = subprocess.run([PY, "-c", DS_FULL, str(ckpt_dir)], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env={**os.environ, **ENV})
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout
        err = [ln for ln in out.splitlines() if ln.startswith("ERROR:")]
        assert len(err) == 1 and "disk full writing checkpoint" in err[0], out[-3000:]
        assert f"previous checkpoint {ckpt_dir / 'last.pt'} is intact" in err[0], err[0]
        assert "TAG: True" in out, out[-2000:]
        files = eval(out.split("FILES:")[1].strip().splitlines()[0])
        assert not [f for f in files if ".tmp-" in f], files
        assert len([f for f in files if f.startswith("deepspeed/")]) == 2, files  # the old tag only
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.slow
def test_stale_temp_files_are_removed_at_the_next_start(tmp_path, synthetic_shards):
    run = tmp_path / "run"
    train(synthetic_shards, run, "--epochs", "1")
    stale = [run / "checkpoints" / ".last.pt.tmp-99999", run / "checkpoints" / ".best.pt.tmp-4242"]
    for s in stale:
        s.write_bytes(b"half a checkpoint")
    p = train(synthetic_shards, run, "--epochs", "1")
    assert not any(s.exists() for s in stale)
    assert all(f"removed {s}" in p.stdout + p.stderr for s in stale)
