"""A write that does not fit, outside checkpoints (tests/test_checkpoint_safety.py) and pack
(tests/test_pack_errors.py): export, predict, and any write no command caught. Each is a real
process under a real file-size limit (RLIMIT_FSIZE, what `ulimit -f` sets; Python ignores
SIGXFSZ, so the write fails with EFBIG as on a full quota): one line naming the file, what was
kept and what to do; no traceback, no temp file, nothing earlier lost."""
from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import cli, outputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", tiny_config(size=64))


def limited(command: list, kib: int) -> subprocess.CompletedProcess:
    """`python -m tumorseg_dist.COMMAND ...` with files limited to `kib` KiB."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib << 10, kib << 10))
    return subprocess.run([sys.executable, "-m", *map(str, command)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def one_error_line(p: subprocess.CompletedProcess, prog: str) -> str:
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, p.stderr
    return errors[0]


def files_under(root: Path) -> list[str]:
    return sorted(str(q.relative_to(root)) for q in root.rglob("*") if q.is_file())


def test_export_past_a_file_size_limit_writes_nothing_and_keeps_an_earlier_file(tmp_path, ckpt):
    out = tmp_path / "onnx" / "model.onnx"   # a 14 M-parameter network: ~55 MB, the limit 1 MiB
    export = ["tumorseg_dist.export", "--checkpoint", ckpt, "--onnx", out, "--graph", "network"]
    line = one_error_line(limited(export, 1024), "export")
    assert f"file size limit reached (EFBIG) writing {out}, the limit is 1024 KiB: nothing was written" in line
    assert "no temp file was left" in line and "raise the limit (ulimit -f)" in line, line
    assert files_under(out.parent) == []
    out.write_bytes(b"an earlier export")
    line = one_error_line(limited(export, 1024), "export")
    assert f"the earlier {out} is unchanged" in line, line
    assert out.read_bytes() == b"an earlier export" and files_under(out.parent) == ["model.onnx"]


def test_export_that_fails_its_check_writes_nothing(tmp_path, ckpt):
    """The file is checked after it is written (to its temp name): a failed check renames nothing."""
    out = tmp_path / "model.onnx"
    p = subprocess.run([sys.executable, "-m", "tumorseg_dist.export", "--checkpoint", str(ckpt), "--onnx",
                        str(out), "--graph", "network", "--atol", "1e-15"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and f"{out} was not written" in p.stderr, p.stderr[-3000:]
    assert files_under(tmp_path) == []


def test_predict_past_a_file_size_limit_keeps_the_masks_written_so_far(tmp_path, ckpt):
    """Small masks fit, the first overlay (a noisy RGB image) does not: the one line says which
    file, that the mask before it is complete, and that areas.csv is not written yet."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (128, 160), dtype=np.uint8)).save(imgs / name)
    out = tmp_path / "preds"
    # A threshold no random network reaches: empty masks, ~100-byte PNGs; each overlay ~60 KB.
    line = one_error_line(limited(["tumorseg_dist.predict", "--checkpoint", ckpt, imgs, "--out", out,
                                   "--overlay", "--workers", "0", "--threshold", "0.999999"], 8), "predict")
    assert f"file size limit reached (EFBIG) writing {out / 'overlays' / 'a.png'}" in line, line
    assert f"the 1 mask(s) written so far are complete in {out / 'masks'}" in line, line
    assert "areas.csv (written last) was not written" in line, line
    assert files_under(out) == ["masks/a.png", "predict.log"]
    mask = np.asarray(Image.open(out / "masks" / "a.png"))
    assert mask.shape == (128, 160) and mask.max() == 0


def test_a_full_disk_no_command_caught_is_one_line(tmp_path, capsys):
    """The net in cli.guarded: a real ENOSPC (/dev/full) from a write no command wraps."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this machine")

    def write_to_full_device():
        with open("/dev/full", "w") as f:
            f.write("x" * 10000)
        return 0

    assert cli.guarded("train", write_to_full_device) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: disk full: the files written before it are complete; free space "
                          "or choose another --out"), err
    named = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "run" / "metrics.jsonl"))
    assert cli.guarded("train", lambda: (_ for _ in ()).throw(named)) == 2
    err = capsys.readouterr().err
    assert f"disk quota exceeded writing {tmp_path / 'run' / 'metrics.jsonl'}" in err, err

    def not_a_full_disk():
        raise PermissionError(errno.EACCES, "Permission denied", "/root/x")

    with pytest.raises(PermissionError):   # not a full disk: a real bug keeps its traceback
        cli.guarded("train", not_a_full_disk)


def test_atomic_leaves_the_old_file_and_no_temp_on_a_real_enospc(tmp_path):
    path = tmp_path / "areas.csv"
    path.write_text("old")
    with pytest.raises(outputs.OutputError) as e:
        with outputs.atomic(path, "the old areas.csv is unchanged") as tmp:
            tmp.write_text("half")
            with open("/dev/full", "w") as f:   # the write that does not fit
                f.write("x" * 10000)
    assert str(e.value).startswith(f"disk full writing {path}") and "the old areas.csv is unchanged" in str(e.value)
    assert os.listdir(tmp_path) == ["areas.csv"] and path.read_text() == "old"


MASK_VOLUME = r"""
import resource, sys
import nibabel as nib, numpy as np
from pathlib import Path
from tumorseg_dist import outputs
from tumorseg_dist.data.formats.volumes import read_for_prediction, save_mask_volume
src, out = Path(sys.argv[1]), Path(sys.argv[2])
nib.save(nib.Nifti1Image(np.zeros((48, 40, 24), np.int16), np.eye(4)), str(src))
vol = read_for_prediction(src)
noise = (np.random.default_rng(0).random(vol.data.shape[:3]) > 0.5).astype(np.uint8)  # ~6 KB gzipped
out.write_bytes(b"an earlier mask volume")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_mask_volume(noise, vol, src, out, "the earlier volume is unchanged")
except outputs.OutputError as e:
    print("ERROR:", e)
"""


def test_a_mask_volume_that_does_not_fit_leaves_the_earlier_one(tmp_path):
    out = tmp_path / "volumes" / "case.nii.gz"
    out.parent.mkdir()
    p = subprocess.run([sys.executable, "-c", MASK_VOLUME, str(tmp_path / "case_src.nii.gz"), str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"ERROR: file size limit reached (EFBIG) writing {out}, the limit is 4 KiB: the earlier volume " \
           f"is unchanged" in p.stdout, p.stdout
    assert out.read_bytes() == b"an earlier mask volume" and files_under(out.parent) == ["case.nii.gz"]
