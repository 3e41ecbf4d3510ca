"""Progress and logs: bars only on a terminal with log lines whole above them, log files with
the console's lines, training's figure picks, run names."""
from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import termios
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PY, run_cli
from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import log as logmod
from tumorseg_dist.config import Config
from tumorseg_dist.loop import _FigurePicker
from tumorseg_dist.jobs.train import resolve_run_dir

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "


def test_log_file_gets_the_lines_shown_before_and_after_it_opens(tmp_path, capsys):
    con = logmod.Console()
    con.info("before the folder exists")
    con.warning("a warning")
    path = tmp_path / "run" / "train.log"
    path.parent.mkdir()
    con.open_file(path)
    con.info("after")
    con.close()
    out = capsys.readouterr()
    assert out.out == "before the folder exists\nafter\n" and out.err == "a warning\n"
    lines = path.read_text().splitlines()
    assert [re.sub(STAMP, "", ln) for ln in lines] == ["before the folder exists", "a warning", "after"]
    assert all(re.match(STAMP, ln) for ln in lines)
    logmod.Console().open_file(path)  # a resumed run appends: nothing written before is lost
    logmod.LOGGER.info("resumed")
    assert path.read_text().splitlines()[:3] == lines and path.read_text().endswith("resumed\n")


def test_other_ranks_write_nothing(tmp_path, capsys):
    con = logmod.Console(enabled=False)
    con.info("x")
    con.open_file(tmp_path / "a.log")
    assert capsys.readouterr().out == "" and not (tmp_path / "a.log").exists()
    assert list(con.progress([1, 2], 2, "d")) == [1, 2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_shards) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(d / "run" / "checkpoints" / "best.pt", tiny_config(size=32, data=synthetic_shards))


def images_with_a_broken_one(folder: Path) -> Path:
    """Six images, the fourth unreadable: its warning comes while the bar is on screen."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        if i == 3:
            (folder / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def predict_cmd(ckpt: Path, src: Path, out: Path) -> list[str]:
    return [PY, "-m", "tumorseg_dist.predict", str(src), "--checkpoint", str(ckpt), "--out", str(out),
            "--batch-size", "1", "--workers", "0", "--device", "cpu"]


def run_on_a_terminal(cmd: list[str], cwd: Path) -> tuple[int, str]:
    """Run with stdin/stdout/stderr on a pseudo-terminal (120 columns); its whole output."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_a_bar_shows_and_log_lines_stay_whole(tmp_path, ckpt):
    src = images_with_a_broken_one(tmp_path / "in")
    rc, out = run_on_a_terminal(predict_cmd(ckpt, src, tmp_path / "pred"), tmp_path)
    assert rc == 1, out[-3000:]  # one input skipped
    assert re.search(r"predict:\s+\d+%\|", out), out[-3000:]  # the bar, drawn on the terminal
    # Every piece of output between carriage returns / newlines that holds a log line is that
    # line alone: no bar drawn into it, no line drawn into the bar.
    pieces = [p for p in re.split(r"[\r\n]+", out) if p.strip()]
    logged = [p for p in pieces if "predict: " in p and "%|" not in p]
    assert any(re.fullmatch(r"predict: skipped .*img3\.png.*", p) for p in logged), pieces
    assert any(re.fullmatch(r"predict: wrote 5 mask\(s\) to .*", p) for p in logged), pieces
    for p in pieces:
        if "predict: " in p and "%|" in p:  # a bar piece: only the bar (desc "predict")
            assert re.fullmatch(r"\s*predict:\s+\d+%\|.*", p) and "skipped" not in p, p


def test_without_a_terminal_no_bar_and_the_log_file(tmp_path, ckpt):
    src = images_with_a_broken_one(tmp_path / "in")
    p = run_cli(predict_cmd(ckpt, src, tmp_path / "pred"), cwd=tmp_path, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    for stream in (p.stdout, p.stderr):
        assert "\r" not in stream and "%|" not in stream and "batch/s" not in stream
    assert "predict: skipped" in p.stderr and "predict: wrote 5 mask(s)" in p.stdout
    lines = (tmp_path / "pred" / "predict.log").read_text().splitlines()
    assert all(re.match(STAMP, ln) for ln in lines)
    text = [re.sub(STAMP, "", ln) for ln in lines]
    assert set(p.stdout.splitlines()) <= set(text) and set(p.stderr.splitlines()) <= set(text)


def test_figure_picks_lesion_images_first_and_counts_the_empty_ones():
    picker = _FigurePicker(3, 0.5)
    masks = torch.zeros(4, 1, 8, 8)
    masks[2, :, 2:6, 2:6] = 1  # one lesion image in the first batch
    logits = torch.full((4, 1, 8, 8), -5.0)
    logits[2, :, 2:6, 2:4] = 5.0  # half of it found: Dice 2*8/(8+16)
    picker.add(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8), masks, logits)
    masks2 = torch.ones(2, 1, 8, 8)
    picker.add(torch.full((2, 1, 8, 8), 9.0), masks2, torch.full((2, 1, 8, 8), 5.0))
    shown = picker.result(6, torch.device("cpu"))
    assert [float(i[0, 0, 0]) for i in shown.images] == [2.0, 9.0, 9.0]  # lesions, then none empty
    assert shown.dice == pytest.approx([16 / 24, 1.0, 1.0])
    assert shown.without_lesion == 3 and shown.split_images == 6
    only_empty = _FigurePicker(2, 0.5)
    only_empty.add(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8), torch.full((3, 1, 8, 8), -5.0))
    got = only_empty.result(3, torch.device("cpu"))
    assert got.images.shape[0] == 2 and got.dice == [1.0, 1.0] and got.without_lesion == 3


def test_overlay_titles_carry_each_dice_and_the_split_count(tmp_path):
    from tumorseg_dist.figures import OverlayBatch, plot_overlays
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 4:8, 4:8] = 1
    shown = OverlayBatch(torch.zeros(2, 1, 16, 16), masks, torch.zeros(2, 1, 16, 16), [0.25, 1.0], 7, 20)
    captions = plot_overlays(shown, tmp_path / "o.png", (0.0,), (1.0,))
    assert captions == ["Dice 0.250", "Dice 1.000 (no lesion)"]
    assert (tmp_path / "o.png").stat().st_size > 1000


def test_run_names_say_what_ran():
    cfg = Config()
    cfg.model.arch, cfg.model.encoder = "unet-classic", "resnet34"
    assert resolve_run_dir(cfg, Path("shards/busi")) == Path("runs/busi-unet-classic")
    cfg.model.arch = "unetplusplus"
    assert resolve_run_dir(cfg, Path("shards/busi")) == Path("runs/busi-unetplusplus-resnet34")


@pytest.mark.slow  # a real training run on a pseudo-terminal: ~30 s on a busy 2-core box
def test_training_on_a_terminal_shows_epoch_and_validation_bars_and_whole_step_lines(tmp_path, synthetic_shards):
    from conftest import TEST_EVAL, TINY
    run = tmp_path / "run"
    rc, out = run_on_a_terminal([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(synthetic_shards),
                                 "--out", str(run), "--epochs", "1", "--batch-size", "4",
                                 "--log-every", "1", "--loader", "torch", *TEST_EVAL], tmp_path)
    assert rc == 0, out[-3000:]
    assert re.search(r"epoch 1/1:\s+\d+%\|", out) and re.search(r"val:\s+\d+%\|", out), out[-3000:]
    assert re.search(r"test:\s+\d+%\|", out), out[-3000:]
    pieces = [p for p in re.split(r"[\r\n]+", out) if p.strip()]
    steps = [p for p in pieces if "loss" in p and "%|" not in p and "epoch" not in p]
    assert len(steps) == len((run / "steps.jsonl").read_text().splitlines()) >= 2, steps
    assert all(re.fullmatch(r"  step \d+ loss \d+\.\d{4} lr \S+", p) for p in steps), steps
    assert not [p for p in pieces if "%|" in p and ("step " in p or "train_loss" in p)]
    logged = [re.sub(STAMP, "", ln) for ln in (run / "train.log").read_text().splitlines()]
    assert all("%|" not in ln and "\r" not in ln for ln in logged) and set(steps) <= set(logged)
