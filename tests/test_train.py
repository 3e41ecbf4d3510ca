"""End-to-end training on CPU: one process, two torchrun ranks, kill + resume, the README command."""
import json
import signal
import subprocess
import time

import pytest

from conftest import PY, TEST_EVAL, TINY, TORCHRUN, run_cli
from tumorseg_dist.data.shards import read_manifest


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [[], ["--amp", "bf16", "--channels-last", "--in-channels", "3"]],
                         ids=["fp32", "bf16-nhwc-rgb"])
def test_single_process_writes_the_run_directory(tmp_path, synthetic_shards, extra):
    run = tmp_path / "run"
    p = run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(synthetic_shards),
                 "--out", str(run), "--epochs", "2", "--batch-size", "4", *extra, *TEST_EVAL], cwd=tmp_path)
    for name in ("config.toml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                 "test_metrics.json", "curves.png", "overlays.png"):
        assert (run / name).is_file(), name
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for key in ("epoch", "step", "train_loss", "val_loss", "val_dice", "val_iou", "val_precision",
                "val_recall", "val_accuracy", "lr", "images_per_s", "seconds"):
        assert key in recs[0], key
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["samples"] == read_manifest(synthetic_shards)["splits"]["test"]["samples"]
    assert "test (" in p.stdout
    # train.log: every console line, timestamped; no progress bar without a terminal
    logged = [ln.split("  ", 1)[1] for ln in (run / "train.log").read_text().splitlines()]
    assert logged == p.stdout.splitlines()
    assert "\r" not in p.stderr and "batch/s" not in p.stderr and "it/s" not in p.stderr


def test_bad_data_dir_is_a_clear_error(tmp_path):
    p = run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(tmp_path), "--out",
                 str(tmp_path / "r")], cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert "manifest.json not found" in p.stderr and "tumorseg_dist.pack" in p.stderr


LOADER_PROBE = """
import json, sys, torch
from tumorseg_dist import dist as d
from tumorseg_dist.config import Config
from tumorseg_dist.data.loader import build_loader
info = d.init("cpu")
cfg = Config(); cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = 64, 1, 0
cfg.train.batch_size = 4
out = {}
for split, training in (("train", True), ("val", False)):
    ld = build_loader(cfg, sys.argv[1], split, info, training)
    ld.set_epoch(0)
    out[split] = [k for b in ld for k, v in zip(b.keys, b.valid.tolist()) if v]
    out[split + "_batches"] = len(ld)
json.dump(out, open(f"{sys.argv[2]}/rank{info.rank}.json", "w"))
d.cleanup()
"""


@pytest.mark.slow
def test_two_ranks_disjoint_samples_and_exact_eval(tmp_path, synthetic_shards):
    probe = tmp_path / "probe.py"
    probe.write_text(LOADER_PROBE)
    run_cli([TORCHRUN, "--nproc_per_node=2", "--standalone", str(probe),
             str(synthetic_shards), str(tmp_path)], cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    m = read_manifest(synthetic_shards)["splits"]
    assert not set(r0["train"]) & set(r1["train"])                 # disjoint training samples
    assert r0["train_batches"] == r1["train_batches"]
    assert r0["val_batches"] == r1["val_batches"]
    val = r0["val"] + r1["val"]
    assert len(val) == len(set(val)) == m["val"]["samples"]        # each val sample exactly once

    run = tmp_path / "run"
    run_cli([TORCHRUN, "--nproc_per_node=2", "--standalone", "-m", "tumorseg_dist.train",
             *TINY, "--data", str(synthetic_shards), "--out", str(run), "--epochs", "3",
             "--batch-size", "4", *TEST_EVAL], cwd=tmp_path)
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert all(r["val_samples"] == m["val"]["samples"] for r in recs)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert json.loads((run / "test_metrics.json").read_text())["samples"] == m["test"]["samples"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_requested_epochs(tmp_path, synthetic_shards):
    run = tmp_path / "run"
    cmd = [PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(synthetic_shards), "--out",
           str(run), "--epochs", "3", "--batch-size", "4", "--resume", "auto"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    first = records(run)
    assert 1 <= len(first) < 3
    p = run_cli(cmd, cwd=tmp_path)
    assert "resumed from" in p.stdout
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    steps = [r["step"] for r in recs]
    assert steps == sorted(steps) and steps[1] - steps[0] == steps[2] - steps[1]


def test_readme_main_command(tmp_path):
    """`make run` = `python -m tumorseg_dist.train` on the built-in set (fewer steps here)."""
    p = run_cli([PY, "-m", "tumorseg_dist.train", "--max-steps", "3", "--out", str(tmp_path / "run")],
                cwd=tmp_path)
    preset = [line for line in p.stdout.splitlines() if "built-in synthetic set" in line]
    assert len(preset) == 1 and ("CPU-sized" in preset[0] or "cuda" in preset[0]), p.stdout[:2000]
    assert (tmp_path / "shards").is_dir()
    assert (tmp_path / "run" / "test_metrics.json").is_file()


@pytest.mark.slow
def test_compile_trains_like_eager_on_both_engines(tmp_path, synthetic_shards):
    """--compile (torch.compile, inductor on CPU) with DDP and with DeepSpeed (engine.compile)
    gives the eager run's first-step loss and, after that one update, nearly its validation
    loss; the checkpoint keeps the plain model's keys, so evaluate/predict/export load it."""
    out = {}
    for name, extra in (("eager", []), ("ddp", ["--compile"]),
                        ("deepspeed", ["--compile", "--engine", "deepspeed", "--zero-stage", "1"])):
        run = tmp_path / name
        p = run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(synthetic_shards), "--out", str(run),
                     "--epochs", "1", "--max-steps", "1", "--batch-size", "4", *extra], cwd=tmp_path,
                    env={"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"})
        out[name] = records(run)[-1]
        assert ("torch.compile: on" in p.stdout or "torch.compile on" in p.stdout) == (name != "eager"), p.stdout
        # TINY's --no-test-eval: no test pass, no test_metrics.json, and the log says how to score it
        assert not (run / "test_metrics.json").exists() and not (run / "overlays.png").exists()
        assert f"--no-test-eval: the test split was not scored (evaluate --checkpoint {run}/checkpoints/best.pt" \
            in p.stdout, p.stdout[-2000:]
        from tumorseg_dist.checkpoint import load
        from tumorseg_dist.checkpoint import weights_of
        assert not any("_orig_mod" in k for k in weights_of(load(run / "checkpoints/best.pt")))
    for name in ("ddp", "deepspeed"):
        assert out[name]["train_loss"] == pytest.approx(out["eager"]["train_loss"], rel=1e-4), name
        assert out[name]["val_loss"] == pytest.approx(out["eager"]["val_loss"], rel=2e-2), name
