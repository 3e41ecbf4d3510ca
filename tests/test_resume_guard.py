"""Resume trusts nothing silently (issue 20 points 3, 12, 15): a changed setting that decides
what the run computes is one error listing every difference, a setting that may change is
applied and logged, config.toml records what runs, a checkpoint of another model is one line,
and the interrupted epoch's train_loss equals the uninterrupted run's."""
import json
import re
import shutil

import pytest

from conftest import PY, TINY, run_cli
from test_deepspeed import preempt  # the SIGTERM-mid-epoch harness
from tumorseg_dist.config import Config, ConfigError, to_dict
from tumorseg_dist.resume_guard import check, differences


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(shards, out, *extra, epochs=1):
    return [PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(shards), "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "8", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_shards):
    """A finished one-epoch run; each test works on its own copy."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run_cli(train(synthetic_shards, run), cwd=run.parent)
    return run


@pytest.fixture
def run(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "run")


# ---------------------------------------------------------------- the comparison itself

def test_frozen_and_allowed_differences_are_told_apart():
    old, new = Config(), Config()
    new.data.size, new.optim.lr, new.train.epochs, new.engine.wandb = 128, 0.5, 9, "offline"
    new.train.resume, new.train.weights_only = "/x/last.pt", True  # how, not what: never compared
    frozen, allowed = differences(new, old)
    assert frozen == ["--size 640 -> 128", "--lr 0.001 -> 0.5"]
    assert allowed == ["--epochs 50 -> 9", "--wandb disabled -> offline"]


def test_a_checkpoint_without_newer_keys_compares_by_their_defaults(tmp_path):
    """A checkpoint written before a field existed (and with one since removed) still resumes."""
    cfg = Config()
    saved = to_dict(cfg)
    del saved["train"]["weights_only"], saved["data"]["verify_shards"]
    saved["train"]["retired_setting"] = 1
    assert check(cfg, {"config": saved}, tmp_path / "last.pt", weights_only=False) == []


def test_another_model_is_named_even_for_weights_only(tmp_path):
    saved = Config()
    saved.model.arch, saved.model.encoder = "unet", "resnet18"
    cfg = Config()
    cfg.model.arch, cfg.model.encoder = "fpn", "resnet18"
    for weights_only in (False, True):
        with pytest.raises(ConfigError) as e:
            check(cfg, {"config": to_dict(saved)}, tmp_path / "last.pt", weights_only)
        msg = str(e.value)
        assert "unet/resnet18 with 3 input channels" in msg and "fpn/resnet18" in msg
        assert str(tmp_path / "last.pt") in msg


# ---------------------------------------------------------------- the CLI, on real runs

def test_resume_with_a_changed_size_is_one_error_and_keeps_config_toml(run, synthetic_shards, tmp_path):
    before = (run / "config.toml").read_bytes()
    p = run_cli(train(synthetic_shards, run, "--size", "96", "--lr", "0.01", epochs=2), cwd=tmp_path,
                check=False)
    assert p.returncode == 2, p.stdout[-2000:]
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "--size 64 -> 96" in err and "--lr 0.003 -> 0.01" in err and "--epochs" not in err
    assert "--out NEW_DIR" in err and "--resume never" in err and "--weights-only" in err
    assert (run / "config.toml").read_bytes() == before
    assert [r["epoch"] for r in records(run)] == [1]


def test_resume_with_more_epochs_applies_and_logs_them(run, synthetic_shards, tmp_path):
    p = run_cli(train(synthetic_shards, run, epochs=2), cwd=tmp_path)
    assert "changed on resume: --epochs 1 -> 2" in p.stdout
    assert "resumed from" in p.stdout
    assert [r["epoch"] for r in records(run)] == [1, 2]
    assert "epochs = 2" in (run / "config.toml").read_text()  # what actually ran


@pytest.mark.slow
def test_config_toml_of_the_run_continues_it(synthetic_shards, tmp_path):
    """Every resolved value in config.toml (device, AMP, normalisation, absolute data path)
    reads back equal to the checkpoint's: no difference, no error, the same run goes on.
    (Its own run: a copied directory's config.toml names the original as --out.)"""
    run = tmp_path / "run"
    run_cli(train(synthetic_shards, run), cwd=tmp_path)
    p = run_cli([PY, "-m", "tumorseg_dist.train", "--config", str(run / "config.toml"), "--epochs", "2"],
                cwd=tmp_path)
    assert [line for line in p.stdout.splitlines() if "changed on resume" in line] == \
        ["changed on resume: --epochs 1 -> 2"]
    assert f"resumed from {run / 'checkpoints' / 'last.pt'}: epoch 1" in p.stdout
    assert [r["epoch"] for r in records(run)] == [1, 2]


def test_another_architecture_is_one_line_naming_both(run, synthetic_shards, tmp_path):
    last = run / "checkpoints" / "last.pt"
    for extra in (["--arch", "fpn"], ["--out", str(tmp_path / "ft"), "--resume", str(last), "--weights-only",
                                     "--arch", "fpn"]):
        cmd = train(synthetic_shards, run, *extra)
        p = run_cli(cmd, cwd=tmp_path, check=False)
        assert p.returncode == 2, p.stdout[-2000:]
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and len(err) < 600, err
        assert str(last) in err and "unet/resnet18" in err and "fpn/resnet18" in err, err
        assert "Missing key" not in err
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_weights_only_fine_tunes_and_a_rerun_continues_the_fine_tune(run, synthetic_shards, tmp_path):
    """--weights-only: another size, data order and length are fine, progress starts at 0; the
    same command again (a requeued job) continues the fine-tune's own last.pt."""
    ft = tmp_path / "ft"
    cmd = train(synthetic_shards, ft, "--resume", str(run / "checkpoints" / "last.pt"), "--weights-only",
                "--size", "96", "--seed", "4", epochs=1)
    p = run_cli(cmd, cwd=tmp_path)
    assert f"loaded weights only from {run / 'checkpoints' / 'last.pt'}" in p.stdout
    assert [r["epoch"] for r in records(ft)] == [1]
    assert records(ft)[0]["step"] == records(run)[0]["step"]  # progress started fresh
    again = run_cli(cmd + ["--epochs", "2"], cwd=tmp_path)
    assert f"resumed from {ft / 'checkpoints' / 'last.pt'}: epoch 1" in again.stdout
    assert [r["epoch"] for r in records(ft)] == [1, 2]


def test_weights_only_into_another_runs_directory_is_refused(run, synthetic_shards, tmp_path):
    other = shutil.copytree(run, tmp_path / "other")
    p = run_cli(train(synthetic_shards, other, "--resume", str(run / "checkpoints" / "last.pt"),
                      "--weights-only"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "already holds another run" in p.stderr and "--out" in p.stderr
    assert records(other) == records(run)


@pytest.mark.slow
def test_interrupted_epoch_train_loss_equals_the_uninterrupted_runs(finished, synthetic_shards, tmp_path):
    """SIGTERM mid-epoch 1, resume: epoch 1's train_loss averages every batch of the epoch, as
    the uninterrupted run's does, not only the batches after the resume."""
    run = tmp_path / "run"
    cmd = train(synthetic_shards, run, "--log-every", "1")  # a stop check after every step
    rc, out = preempt(cmd, tmp_path, {"OMP_NUM_THREADS": "1"}, after_step=1)
    assert rc == 75 and "stop requested: saved" in out, out[-2000:]
    saved = int(re.search(r"saved \S+ at step (\d+)", out).group(1))
    reference = records(finished)[0]
    assert 1 <= saved < reference["step"], out[-2000:]
    p = run_cli(cmd, cwd=tmp_path)
    # The position is global samples (--batch-size 8 per step), whatever the world size.
    assert f", sample {saved * 8} of the next epoch" in p.stdout, p.stdout[-2000:]
    resumed = records(run)[0]
    assert resumed["step"] == reference["step"]
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
