"""--geometry squash|letterbox|crop (issue 15): the placement numbers, both loaders (DALI's CPU
pipeline and torch) giving the same crops for the same seed, image/mask/pad in sync, the pad mask
of a letterbox, and the foreground-biased crop fraction."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tumorseg_dist.config import Config, ConfigError, validate
from tumorseg_dist.data.augment import PRESETS
from tumorseg_dist.data.draws import crop_draws
from tumorseg_dist.data.geometry import origin, place, scaled_size
from tumorseg_dist.data.torch_loader import TorchLoader
from tumorseg_dist.dist import DistInfo

CPU = torch.device("cpu")
DIST = DistInfo(0, 0, 1, CPU)
MEAN, STD = 0.2, 0.5


def test_placement_numbers():
    # letterbox: the long side to size, centred, whole-pixel offsets (72x88 -> 52x64, 6 rows above)
    assert scaled_size(72, 88, 64, "letterbox") == (52, 64)
    shrink, m = place(72, 88, 64, "letterbox")
    assert shrink == (52, 64) and np.allclose(m, [[1, 0, 0], [0, 1, 6], [0, 0, 1]])
    # crop, resize: the short side to size; native: the source's pixels, never resampled
    assert scaled_size(72, 88, 64, "crop", "resize") == (64, 78)
    shrink, m = place(100, 80, 64, "crop", "native", {"hflip": False, "vflip": False, "affine": None,
                                                      "crop": {"u": (0.0, 1.0), "centre": None}})
    assert shrink is None and np.allclose(m, [[1, 0, -16], [0, 1, 0], [0, 0, 1]])
    # a window centred on a lesion pixel is clamped to the image; a short side is centred
    assert origin(100, 64, centre=0.99) == 36 and origin(100, 64, centre=0.5) == 18
    assert origin(100, 64, centre=0.01) == 0 and origin(40, 64) == -12


def test_foreground_fraction_is_honoured():
    mask = np.zeros((50, 60), np.float32)
    mask[10:14, 40:45] = 1
    rng = np.random.default_rng(0)
    draws = [crop_draws(rng, 0.33, lambda: mask) for _ in range(4000)]
    centred = [d["centre"] for d in draws if d["centre"] is not None]
    assert 0.31 < len(centred) / len(draws) < 0.35
    ys, xs = np.array(centred).T * [[50], [60]] - 0.5      # back to pixel indices: lesion pixels only
    assert mask[np.round(ys).astype(int), np.round(xs).astype(int)].all()
    assert all(crop_draws(rng, 1.0, lambda: np.zeros((5, 5)))["centre"] is None for _ in range(20))


def test_crop_foreground_is_checked():
    cfg = Config()
    cfg.data.crop_foreground = 1.5
    with pytest.raises(ConfigError, match="--crop-foreground"):
        validate(cfg)


# ---------------------------------------------------------------- both loaders

dali = pytest.importorskip("nvidia.dali")
from test_dali import dice, make_shards, spec_for  # noqa: E402
from tumorseg_dist.data.dali import DaliLoader  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("geom") / "d", {"train": 13, "val": 5, "test": 1}, size=(72, 88))


def samples(loader) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = {}
    for b in loader:
        for i, k in enumerate(b.keys):
            if bool(b.valid[i]):
                out[k] = (b.image[i], b.mask[i], b.pad[i])
    return out


def spec(d, geometry, training=True, aug="none", crop_scale="resize", fg=0.33, size=64, batch=13, **kw):
    s = spec_for(d, "train" if training else "val", training, size=size, aug=PRESETS[aug], batch=batch,
                 mean=MEAN, std=STD, **kw)
    return replace(s, geometry=geometry, crop_scale=crop_scale, crop_foreground=fg)


def assert_same(a, b):
    """The loaders' tolerance: images within 2/255 (resampling rounding), pad masks equal, masks
    equal but for nearest-neighbour ties (a source coordinate exactly between two pixels)."""
    assert a.keys() == b.keys() and a
    for k in a:
        diff = (a[k][0] - b[k][0]).abs() * STD
        assert diff.max() < 2 / 255 and diff.mean() < 1e-3, (k, float(diff.max()))
        assert float((a[k][1] - b[k][1]).abs().mean()) < 1e-3, k
        assert torch.equal(a[k][2], b[k][2]), k


@pytest.mark.parametrize("geometry,crop_scale,aug", [
    ("letterbox", "resize", "none"), ("letterbox", "resize", "standard"),
    ("crop", "resize", "light"), ("crop", "native", "standard"), ("crop", "resize", "strong")])
def test_dali_and_torch_give_the_same_training_samples(shards, geometry, crop_scale, aug):
    s = spec(shards, geometry, aug=aug, crop_scale=crop_scale)
    a, b = samples(DaliLoader(s, DIST)), samples(TorchLoader(s, DIST))
    assert_same(a, b)
    if geometry == "crop":   # negative control: another seed moves the windows
        other = samples(TorchLoader(replace(s, seed=7), DIST))
        assert sum(not torch.equal(a[k][1], other[k][1]) for k in a) >= 4


@pytest.mark.parametrize("geometry", ["letterbox", "crop"])
def test_evaluation_is_letterbox_in_both_loaders(shards, geometry):
    a = samples(DaliLoader(spec(shards, geometry, training=False, batch=2), DIST))
    b = samples(TorchLoader(spec(shards, geometry, training=False, batch=2), DIST))
    assert_same(a, b)
    assert len(a) == 5


@pytest.mark.parametrize("loader", [DaliLoader, TorchLoader])
def test_letterbox_pad_mask(shards, loader):
    """72x88 at 64: the image is 52 rows, 6 padding rows above and below; image and mask are 0
    (the normalised 0) there; the real rows hold the whole source, resized."""
    for training in (True, False):
        got = samples(loader(spec(shards, "letterbox", training=training, batch=5), DIST))
        want = torch.zeros(1, 64, 64)
        want[:, 6:58] = 1
        for k, (img, m, pad) in got.items():
            assert torch.equal(pad, want), k
            assert torch.equal(m * (1 - pad), torch.zeros_like(m)), k
            assert torch.allclose(img[:, :6], torch.full_like(img[:, :6], (0 - MEAN) / STD), atol=1e-5), k
            assert float(img[:, 6:58].std()) > 0.1


@pytest.mark.parametrize("loader", [DaliLoader, TorchLoader])
def test_squash_has_no_pad_mask(shards, loader):
    b = next(iter(loader(spec(shards, "squash", batch=4), DIST)))
    assert b.pad is None


@pytest.mark.parametrize("loader", [DaliLoader, TorchLoader])
def test_crops_keep_image_mask_and_pad_in_sync(tmp_path, loader):
    """Native-scale 64 px crops of 160x200 phantoms, strong geometry: the bright object lies on
    the mask (Dice >= 0.95), nothing of either falls outside the pad mask; with every crop
    centred on a lesion pixel every crop holds lesion, with none some crops miss it."""
    d = make_shards(tmp_path / "big", {"train": 24, "val": 1, "test": 1}, size=(160, 200), seed=3)
    aug = replace(PRESETS["strong"], noise_p=0.0, gamma_p=0.0, brightness_p=0.0, contrast_p=0.0)
    lesion = {}
    for fg in (0.0, 1.0):
        got = samples(loader(replace(spec(d, "crop", crop_scale="native", fg=fg, batch=12), augment=aug), DIST))
        assert len(got) == 24
        for k, (img, m, pad) in got.items():
            assert torch.equal(m * (1 - pad), torch.zeros_like(m))
            x = img[0] * STD + MEAN
            if m.sum() > 20:
                assert dice((x > 0.45).numpy() & (pad[0] > 0).numpy(), m[0].numpy()) >= 0.95, (fg, k)
        lesion[fg] = sum(float(m.sum()) > 0 for _, m, _ in got.values())
    assert lesion[1.0] == 24 and lesion[0.0] < 24


@pytest.mark.parametrize("loader", [DaliLoader, TorchLoader])
def test_crops_follow_the_position_not_the_world_size(shards, loader):
    """The window is a draw of the global position: two ranks (batch 6 each) and one rank
    (batch 12) crop every sample the same way."""
    s = spec(shards, "crop", aug="standard", batch=12)
    one = samples(loader(s, DIST))
    two = {}
    for r in range(2):
        two.update(samples(loader(replace(s, batch_size=6), DistInfo(r, r, 2, CPU))))
    assert one.keys() == two.keys() and len(one) == 12
    for k in one:
        assert all(torch.equal(a, b) for a, b in zip(one[k], two[k])), k
