"""evaluate: metrics equal training's, every sample counted once under 2 ranks, HD95, outputs."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TORCHRUN, run_cli
from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import evaluate
from tumorseg_dist import scoring
from tumorseg_dist.jobs import evaluate as evaluate_job
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine
from tumorseg_dist.inference import load_model
from tumorseg_dist.loop import evaluate as loop_evaluate
from tumorseg_dist.data.loader import build_loader


def square(size: int, y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_hausdorff95_known_distances_and_empty_masks():
    a = square(64, 10, 10, 20)
    assert scoring.hausdorff95(a, a) == 0.0
    assert scoring.hausdorff95(a, square(64, 10, 13, 20)) == pytest.approx(3.0)
    # Undefined when either mask is empty (MONAI alone gives inf or NaN): NaN, left out of means.
    assert math.isnan(scoring.hausdorff95(a, np.zeros_like(a)))
    assert math.isnan(scoring.hausdorff95(np.zeros_like(a), a))
    assert math.isnan(scoring.hausdorff95(np.zeros_like(a), np.zeros_like(a)))


def rect(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((64, 64), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def test_hausdorff95_from_monai_equals_the_old_values():
    """The values our removed scipy version gave (recorded before it went), now from MONAI."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    old = [9.219544457292887, 17.899806088648454, 13.01152144312159]
    for want in old:
        p = ndimage.binary_opening(rng.random((48, 40)) > 0.6, iterations=1)
        t = ndimage.binary_opening(rng.random((48, 40)) > 0.55, iterations=1)
        assert scoring.hausdorff95(p, t) == pytest.approx(want, abs=1e-4)
    assert scoring.hausdorff95(rect(10, 10, 20, 20), rect(30, 25, 8, 30)) == pytest.approx(25.397681696873146, abs=1e-4)
    assert scoring.hausdorff95(rect(0, 0, 12, 64), rect(5, 3, 30, 20)) == pytest.approx(41.0, abs=1e-4)


def test_hausdorff95_in_mm_from_the_pixel_spacing():
    a, b = square(64, 10, 10, 20), square(64, 10, 13, 20)  # 3 px apart along columns
    assert scoring.hausdorff95(a, b, (0.5, 0.8)) == pytest.approx(3 * 0.8)
    assert scoring.hausdorff95(a, square(64, 14, 10, 20), (0.5, 0.8)) == pytest.approx(4 * 0.5)
    # the json's spacing is the original image's: at the model size a pixel is larger
    assert scoring.pixel_spacing({"pixel_spacing": [0.5, 0.8]}, (256, 128), (64, 64)) == (2.0, 1.6)
    assert scoring.pixel_spacing({"pixel_spacing": [0.5, 0.8]}, (64, 64), (64, 64)) == (0.5, 0.8)
    for meta in ({}, {"pixel_spacing": None}, {"pixel_spacing": [0, 1]}, {"pixel_spacing": "x"}):
        assert scoring.pixel_spacing(meta, (64, 64), (64, 64)) is None


def test_score_counts_as_training_counts():
    """evaluate's per-image counts come from the metrics module: at the model resolution they
    equal training's confusion() of the logits, probabilities exactly at the threshold included."""
    from tumorseg_dist.metrics import confusion
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 16, 16, generator=g)
    logits[0, 0, 0, :4] = 0.0  # sigmoid exactly 0.5: not tumour, in both paths
    mask = (torch.rand(16, 16, generator=g) > 0.5).numpy()
    pred, target, counts = scoring.score(torch.sigmoid(logits)[0], mask, 0.5, "model", 16)
    want = confusion(logits, torch.from_numpy(mask)[None, None].float())[0]
    assert counts.dtype == torch.float64 and torch.equal(counts, want)
    assert counts.sum() == 256 and counts[0] == (pred & target).sum()
    big = np.kron(mask, np.ones((2, 2), bool))  # original 32 px: probabilities resized back
    _, _, c32 = scoring.score(torch.sigmoid(logits)[0], big, 0.5, "original", 16)
    assert c32.sum() == 32 * 32


@pytest.fixture(scope="module")
def ckpt_32(tmp_path_factory, synthetic_shards) -> Path:
    """A 32 px model on 64 px data: evaluation must resize exactly as the training loader does."""
    d = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(d / "run" / "checkpoints" / "best.pt", tiny_config(size=32, data=synthetic_shards))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_model_resolution_equals_the_training_loop(tmp_path, ckpt_32, synthetic_shards):
    """`--resolution model` is the training loop's validation metric: same preprocessing, same counts."""
    out = tmp_path / "ev"
    assert evaluate.main(["--checkpoint", str(ckpt_32), "--split", "val", "--resolution", "model",
                          "--out", str(out), "--workers", "0", "--batch-size", "4", "--cases", "0"]) == 0
    got = json.loads((out / "metrics.json").read_text())

    cfg = tiny_config(size=32, data=synthetic_shards)
    cfg.data.loader = "torch"  # evaluate.py preprocesses as the torch loader does, bit for bit
    inf = load_model(ckpt_32)
    d = DistInfo(0, 0, 1, torch.device("cpu"))
    engine = build_engine(cfg, inf.model, d, lambda a, b: a.mean(), 1)
    want = loop_evaluate(engine, build_loader(cfg, synthetic_shards, "val", d, training=False),
                         None, cfg.train.threshold)
    assert got["samples"] == want["samples"] == 12
    for k in ("dice", "iou", "precision", "recall", "accuracy", "mean_image_dice", "mean_image_iou"):
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_outputs_defaults_and_original_resolution(ckpt_32, synthetic_shards):
    # No --data and no --out: both come from the checkpoint (data path, RUN/eval-test).
    assert evaluate.main(["--checkpoint", str(ckpt_32), "--workers", "0"]) == 0
    out = ckpt_32.parent.parent / "eval-test"
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["resolution"] == "original" and m["samples"] == 4
    for k in ("dice", "iou", "precision", "recall", "accuracy", "mean_image_dice", "mean_image_iou"):
        assert 0.0 <= m[k] <= 1.0
    rows = read_rows(out / "per_image.csv")
    assert list(rows[0]) == evaluate_job.CSV_FIELDS
    assert len(rows) == 4 and all(r["source"].startswith("phantom/") and r["group"] for r in rows)
    # areas are at the original 64 x 64 (a 32 px model's output was resized back)
    assert all(0 <= int(r["target_area"]) <= 64 * 64 for r in rows)
    with_both = [r for r in rows if int(r["target_area"]) and int(r["prediction_area"])]
    assert m["hd95_images"] == len(with_both) == sum(1 for r in rows if r["hd95"])
    assert m["hd95_mm_images"] == 0 and all(r["hd95_mm"] == "" for r in rows)  # no pixel_spacing
    assert (out / "cases.png").stat().st_size > 1000
    # the log file has the console's lines, timestamped
    log = (out / "evaluate.log").read_text().splitlines()
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  evaluate: dice \S+ iou .* -> .*", ln)
               for ln in log), log
    assert sum("evaluate: " in ln for ln in log) >= 3  # start, drawing, result


@pytest.mark.slow  # two torchrun processes importing torch: ~20 s of CPU, more on a busy machine
def test_two_ranks_count_every_sample_once(tmp_path, ckpt_32, synthetic_shards):
    """12 val images over 2 ranks with per-rank batch 5: padding must not be counted, and the
    numbers must equal the single-process run."""
    common = ["--checkpoint", str(ckpt_32), "--data", str(synthetic_shards), "--split", "val",
              "--workers", "0", "--batch-size", "5", "--cases", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert evaluate.main(common + ["--out", str(one)]) == 0
    run_cli([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "tumorseg_dist.evaluate",
             *common, "--out", str(two), "--device", "cpu"], cwd=tmp_path, timeout=300)
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert m2["world_size"] == 2 and m2["samples"] == m1["samples"] == 12
    for k in ("dice", "iou", "precision", "recall", "accuracy", "mean_image_dice", "hd95_images"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-9), k
    keys = [r["key"] for r in read_rows(two / "per_image.csv")]
    assert len(keys) == len(set(keys)) == 12
    assert read_rows(two / "per_image.csv") == read_rows(one / "per_image.csv")


def test_bad_inputs_are_clear_errors(tmp_path, ckpt_32, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(ckpt_32), "--data", str(tmp_path)]) == 2
    assert "is not a packed dataset" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(ckpt_32), "--split", "nosuch"]) == 2
    assert "no split 'nosuch'" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(ckpt_32), "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_tiff_dataset_is_evaluated_at_each_image_true_size(tmp_path):
    """Packed from channels-last, planar and grey TIFFs (stacks refused at pack time by the same
    reader): every image is scored against its own 40x56 mask, whatever its channel layout."""
    from inference_testing import TIFF_CASES, TIFF_H, TIFF_W, tiff_folder
    from tumorseg_dist.pack import main as pack
    want = tiff_folder(tmp_path / "tiffs", with_masks=True)
    data = tmp_path / "packed"
    assert pack([str(tmp_path / "tiffs"), "--out", str(data), "--format", "suffix",
                 "--on-error", "skip", "--no-progress"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_config(size=32, in_channels=3, data=data))
    rows = []
    for split, info in manifest["splits"].items():
        if info["samples"]:
            out = tmp_path / f"ev-{split}"
            assert evaluate.main(["--checkpoint", str(ckpt), "--split", split, "--out", str(out),
                                  "--workers", "0", "--cases", "1"]) == 0
            rows += read_rows(out / "per_image.csv")
    area = {name: (10 + i) * 20 for i, (name, *_) in enumerate(TIFF_CASES)}  # tiff_folder's masks
    assert sorted(r["source"] for r in rows) == sorted(f"{n}.tif" for n in want)
    for r in rows:
        name = r["source"][:-4]
        assert int(r["target_area"]) == area[name]
        assert 0 <= int(r["prediction_area"]) <= TIFF_H * TIFF_W
