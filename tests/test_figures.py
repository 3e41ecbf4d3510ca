"""figures: one overlay drawer (green truth, red prediction) for predict, evaluate and training."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tumorseg_dist import figures


def test_overlay_draws_prediction_red_and_ground_truth_green():
    img = np.zeros((20, 20), np.float32)
    pred = np.zeros((20, 20), bool)
    pred[2:8, 2:8] = True
    gt = np.zeros((20, 20), bool)
    gt[10:16, 10:16] = True
    o = figures.overlay_image(img, pred, gt)
    assert o.shape == (20, 20, 3) and o.dtype == np.uint8
    assert tuple(o[2, 2]) == figures.RED and tuple(o[5, 5]) == (0, 0, 0)   # contour, not filled
    assert tuple(o[10, 12]) == figures.GREEN


def colours(path) -> set[tuple[int, int, int]]:
    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(rgb, axis=0)}


def test_training_figure_is_drawn_by_the_same_drawer(tmp_path):
    """overlays.png (training, and its wandb copy) shows normalised batch images un-normalised,
    ground truth in the drawer's green and the thresholded prediction in its red."""
    mean, std = (0.3,), (0.2,)
    images = (torch.full((2, 1, 32, 32), 0.5) - mean[0]) / std[0]
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 4:12, 4:12] = 1
    probs = torch.zeros(2, 1, 32, 32)
    probs[:, :, 18:28, 18:28] = 0.9
    path = tmp_path / "overlays.png"
    figures.plot_overlays(figures.OverlayBatch(images, masks, probs, [0.0, 0.0], 0, 2), path,
                          mean, std, threshold=0.5)
    seen = colours(path)
    assert figures.GREEN in seen and figures.RED in seen
    assert (128, 128, 128) in seen  # the image itself: 0.5 grey, un-normalised
    probs[:] = 0.4  # below the threshold: no prediction contour at all
    figures.plot_overlays(figures.OverlayBatch(images, masks, probs, [0.0, 0.0], 0, 2), path,
                          mean, std, threshold=0.5)
    assert figures.RED not in colours(path) and figures.GREEN in colours(path)


def test_curves_have_integer_epoch_ticks_the_best_epoch_and_the_lr(tmp_path):
    records = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_dice": d, "val_iou": d / 2,
                "lr": 1e-3 * 0.5 ** e} for e, d in zip(range(1, 8), (.1, .3, .5, .45, .6, .58, .55))]
    path = tmp_path / "curves.png"
    drawn = figures.plot_curves(records, path, best_epoch=5)
    assert path.stat().st_size > 1000
    assert drawn.epochs == list(range(1, 8)) and drawn.best_epoch == 5
    assert drawn.xticks and all(t == int(t) for t in drawn.xticks)  # no epoch 2.5
    assert drawn.lr == [r["lr"] for r in records]
    # a best epoch that is not among the records (a fresh log after fine-tuning) is not drawn
    assert figures.plot_curves(records[:2], path, best_epoch=5).best_epoch is None


def test_cases_names_are_wrapped_not_cut():
    key = "TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12_slice-0042"
    wrapped = figures.wrap_name(key)
    assert wrapped.replace("\n", "") == key and "\n" in wrapped
    assert all(len(line) <= 28 for line in wrapped.splitlines())
    assert figures.wrap_name("short") == "short"

