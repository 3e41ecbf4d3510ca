"""DALI loader on CPU (device_id=None): decoding, resizing, synchronised augmentation, sharding by
global rank, padding/validity, resume-safe epochs, loader parity with --loader torch, errors."""
from __future__ import annotations

import json
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from tumorseg_dist.config import AugmentConfig, ConfigError  # noqa: E402
from tumorseg_dist.data.augment import PRESETS, AugmentParams, resolve  # noqa: E402
from tumorseg_dist.data.dali import DaliLoader  # noqa: E402
from tumorseg_dist.data.batch import LUMA, LoaderSpec  # noqa: E402
from tumorseg_dist.data.shards import decode_image, decode_mask  # noqa: E402
from tumorseg_dist.data.torch_loader import TorchLoader, _augment  # noqa: E402
from tumorseg_dist.data.phantoms import _ellipse  # noqa: E402
from tumorseg_dist.data.shards import Sample, ShardError, shard_paths, write_dataset  # noqa: E402
from tumorseg_dist.dist import DistInfo  # noqa: E402

CPU = torch.device("cpu")


def make_shards(out: Path, counts: dict[str, int], size=(72, 88), codec="png", rgb=False,
                shard_size=256 << 20, seed=0) -> Path:
    """Phantom-like samples with exact split sizes: a bright off-centre ellipse (the tumour, also
    the mask) on a textured darker background. Non-square so resizing is exercised."""
    rng = np.random.default_rng(seed)
    h, w = size

    def gen():
        i = 0
        for split, n in counts.items():
            for _ in range(n):
                m = _ellipse(h, w, h * rng.uniform(0.3, 0.45), w * rng.uniform(0.3, 0.45),
                             h * rng.uniform(0.15, 0.25), w * rng.uniform(0.12, 0.2), rng.uniform(0, np.pi))
                img = rng.uniform(10, 60, (h, w)) + 150 * m
                if rgb:
                    img = np.stack([img, img * 0.7, rng.uniform(0, 255, (h, w))], axis=2)
                yield Sample(key=f"s{i:04d}", image=np.clip(img, 0, 255).astype(np.uint8), mask=m,
                             source=f"{i}.png", split=split)
                i += 1
    write_dataset(gen(), out, fmt="test", input_root="x", codec=codec, shard_size=shard_size)
    return out


def spec_for(shard_dir, split="val", training=False, size=64, channels=1, batch=4, aug=None,
             mean=0.0, std=1.0, cl=False, seed=0) -> LoaderSpec:
    return LoaderSpec(Path(shard_dir), split, training, size, channels, batch, (mean,) * channels,
                      (std,) * channels, aug or PRESETS["none"], seed, 1,
                      torch.channels_last if cl else torch.contiguous_format)


def members(shard_dir: Path, split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for tar in shard_paths(shard_dir, split):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def by_key(loader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for b in loader:
        for i, k in enumerate(b.keys):
            if bool(b.valid[i]):
                assert k not in out, f"{k} seen twice"
                out[k] = (b.image[i], b.mask[i])
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali")
    return {c: make_shards(root / c, {"train": 13, "val": 11, "test": 3}, codec=c)
            for c in ("png", "jp2", "raw", "jpeg")}


# ---------------------------------------------------------------- decoding and resizing

@pytest.mark.parametrize("codec", ["png", "jp2", "raw", "jpeg"])
def test_resized_sample_equals_pil_decode_resized(shards, codec):
    """No augmentation, mean 0 / std 1: DALI's 72×88 -> 72×72 output equals a PIL decode of the
    shard member resized by torch (bilinear antialiased image, pixel-centre nearest mask)."""
    got = by_key(DaliLoader(spec_for(shards[codec], size=72), DistInfo(0, 0, 1, CPU)))
    ref = members(shards[codec], "val")
    assert sorted(got) == sorted(ref)
    tol = 2.5 / 255 if codec == "jpeg" else 1e-5
    for key, (img, mask) in got.items():
        ext = next(e for e in ref[key] if e.startswith("image."))
        pil = torch.from_numpy(decode_image(ref[key][ext], ext)).permute(2, 0, 1)[None]
        want = torch.nn.functional.interpolate(pil, size=(72, 72), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
        # The resamplers differ only at the borders (antialias filter clipping): < 1/255 anywhere.
        assert (img - want).abs().max() < tol + 1 / 255, key
        assert (img - want).abs().mean() < tol + 2e-4, key
        m = torch.from_numpy(decode_mask(ref[key]["mask.png"]))[None, None]
        want_m = torch.nn.functional.interpolate(m, size=(72, 72), mode="nearest-exact")[0]
        assert torch.equal(mask, want_m), key


@pytest.mark.parametrize("codec,rgb,channels", [("png", False, 1), ("jp2", False, 3), ("raw", False, 1),
                                                 ("jpeg", False, 1), ("png", True, 1), ("png", True, 3),
                                                 ("raw", True, 1), ("raw", True, 3)])
def test_native_size_is_exact_pil_decode(tmp_path, codec, rgb, channels):
    """Square shards at the loader size: no resampling, so DALI must reproduce PIL pixel for pixel
    (colour -> grey by BT.601 luma, grey -> repeated)."""
    d = make_shards(tmp_path / "sq", {"train": 1, "val": 5, "test": 1}, size=(64, 64), codec=codec, rgb=rgb)
    got = by_key(DaliLoader(spec_for(d, size=64, channels=channels, cl=True), DistInfo(0, 0, 1, CPU)))
    ref = members(d, "val")
    assert len(got) == 5
    # DALI's GRAY conversion rounds to 8 bit before the float conversion; jpeg decoders may differ by 1.
    tol = 2.5 / 255 if codec == "jpeg" or (rgb and channels == 1 and codec != "raw") else 1e-5
    for key, (img, mask) in got.items():
        ext = next(e for e in ref[key] if e.startswith("image."))
        want = decode_image(ref[key][ext], ext)
        if want.shape[2] == 3 and channels == 1:
            want = want @ np.asarray(LUMA, np.float32)[:, None]
        if want.shape[2] == 1 and channels == 3:
            want = np.repeat(want, 3, axis=2)
        assert img.shape == (channels, 64, 64)
        assert np.abs(img.permute(1, 2, 0).numpy() - want).max() <= tol, key
        assert np.array_equal(mask[0].numpy(), decode_mask(ref[key]["mask.png"])), key


def test_eight_bit_splits_decode_as_uint8_and_sixteen_bit_keeps_full_precision(tmp_path):
    """8-bit PNG/JPEG splits take the uint8 decode (intensities in units of 255 until the
    normalisation); a 16-bit PNG split keeps the float decode, so values that differ below
    1/255 stay apart, exactly as PIL / 65535 gives them, in evaluation and in training."""
    from tumorseg_dist.data.dali import inspect_split
    rng = np.random.default_rng(0)

    def gen():
        for i in range(4):
            m = np.zeros((64, 64), bool)
            m[16:40, 20:44] = True
            img = (rng.integers(0, 256, (64, 64)) * 257 + rng.integers(0, 257, (64, 64))).astype(np.uint16)
            yield Sample(key=f"s{i}", image=img, mask=m, source=f"{i}.png", split="val" if i else "train")
    d16 = tmp_path / "sixteen"
    write_dataset(gen(), d16, fmt="test", input_root="x", codec="png")
    d8 = make_shards(tmp_path / "eight", {"train": 1, "val": 3, "test": 1}, size=(64, 64))
    assert inspect_split(d8, "val").eight_bit and not inspect_split(d16, "val").eight_bit
    got = by_key(DaliLoader(spec_for(d16, size=64), DistInfo(0, 0, 1, CPU)))
    ref = members(d16, "val")
    for key, (img, _) in got.items():
        want = decode_image(ref[key]["image.png"], "image.png")[..., 0]        # / 65535
        assert np.abs(img[0].numpy() - want).max() <= 1e-6, key
        assert len(np.unique(np.round(img[0].numpy() * 255))) < len(np.unique(img[0].numpy()))
    tr = spec_for(d16, "val", True, aug=AugmentParams(brightness_p=1, brightness=0.2), batch=3, size=64)
    for b in DaliLoader(tr, DistInfo(0, 0, 1, CPU)):
        assert torch.isfinite(b.image).all() and b.image.max() <= 1.2 + 1e-5


def test_layout_dtype_and_normalisation(shards):
    s = spec_for(shards["png"], channels=3, mean=0.2, std=0.5, cl=True)
    b = next(iter(DaliLoader(s, DistInfo(0, 0, 1, CPU))))
    plain = next(iter(DaliLoader(replace(s, mean=(0.0,) * 3, std=(1.0,) * 3, memory_format=torch.contiguous_format),
                                 DistInfo(0, 0, 1, CPU))))
    assert b.image.dtype == torch.float32 and b.image.shape == (4, 3, 64, 64)
    assert b.image.is_contiguous(memory_format=torch.channels_last) and not b.image.is_contiguous()
    assert plain.image.is_contiguous()
    assert torch.allclose(b.image, (plain.image - 0.2) / 0.5, atol=1e-5)
    assert set(b.mask.unique().tolist()) <= {0.0, 1.0} and b.mask.shape == (4, 1, 64, 64)


def test_cpu_output_buffers_are_reused_only_when_nothing_holds_them(shards):
    loader = DaliLoader(spec_for(shards["png"], "val", batch=2), DistInfo(0, 0, 1, CPU))  # 6 batches
    kept = list(loader)
    assert len({b.image.data_ptr() for b in kept}) == len(kept)     # held batches: all distinct
    snapshot = [(b.image.clone(), b.mask.clone()) for b in kept]
    views = [b.image[:, 0] for b in kept]                             # a view keeps its batch too
    del kept
    for _ in range(2):
        ptrs = [b.image.data_ptr() for b in loader]                  # each dropped after use
        assert len(set(ptrs)) < len(ptrs)                            # ...so buffers come back
    for v, (img, _) in zip(views, snapshot):
        assert torch.equal(v, img[:, 0])                             # never overwritten


# ---------------------------------------------------------------- augmentation

def _cv2_matrix(m: np.ndarray) -> np.ndarray:
    """DALI's transforms use pixel centres at +0.5; OpenCV at integers."""
    a, t = m[:, :2].astype(np.float64), m[:, 2].astype(np.float64)
    return np.hstack([a, (t + a @ [0.5, 0.5] - 0.5)[:, None]])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_augmentation_is_synchronised_with_the_mask(tmp_path):
    """Every sample: the augmented mask matches the original mask pushed through the same flips +
    affine in OpenCV (Dice >= 0.98), and the augmented image's bright object lines up with it."""
    cv2 = pytest.importorskip("cv2")
    d = make_shards(tmp_path / "ph", {"train": 16, "val": 1, "test": 1}, size=(96, 96))
    # Geometry only (its parameters are the pipeline's only extra outputs); image thresholdable.
    aug = replace(PRESETS["strong"], noise_p=0.0, gamma_p=0.0, brightness_p=0.0, contrast_p=0.0)
    loader = DaliLoader(spec_for(d, "train", True, size=96, aug=aug, batch=8), DistInfo(0, 0, 1, CPU))
    pipe, _ = loader.build_pipeline(epoch=0, with_params=True)
    ref = members(d, "train")
    moved = flipped = 0
    for _ in range(2):
        image, mask, info, affine, fh, fv = pipe.run()
        for i in range(len(info)):
            key = bytes(np.asarray(info.at(i))).decode().rsplit(":", 1)[-1].partition(".")[0]
            src = decode_mask(ref[key]["mask.png"])                     # 96×96, no resize needed
            h, v = int(np.asarray(fh.at(i))), int(np.asarray(fv.at(i)))
            m = np.asarray(affine.at(i))          # flips, scale, rotation, translation in one
            # The flips are part of the matrix (mirror about the centre): exactly one flip
            # reverses orientation, two make a 180° rotation.
            assert (np.linalg.det(m[:, :2]) < 0) == bool(h ^ v)
            want = cv2.warpAffine(np.ascontiguousarray(src), _cv2_matrix(m), (96, 96), flags=cv2.INTER_NEAREST)
            got = np.asarray(mask.at(i))[..., 0]
            assert dice(got, want) >= 0.98, (key, dice(got, want), m, h, v)
            img = np.asarray(image.at(i))[..., 0]
            assert dice(img > 0.45, got) >= 0.95, key   # object is ~0.7, background <= 0.35
            moved += not np.allclose(np.abs(m), [[1, 0, 0], [0, 1, 0]], atol=1e-3)
            flipped += h or v
            # Negative control: the same comparison without the flips/affine must fail, or the
            # check above could not detect a desynchronised mask.
            if h or v or not np.allclose(m, [[1, 0, 0], [0, 1, 0]], atol=0.05):
                assert dice(got, decode_mask(ref[key]["mask.png"])) < 0.98
    assert moved >= 10 and flipped >= 4


def test_flips_alone_move_image_and_mask_exactly(shards):
    """Without the affine (`light`), flips use fn.flip: image and mask are the un-augmented
    sample mirrored exactly as the per-sample coins say, nothing resampled."""
    dist = DistInfo(0, 0, 1, CPU)
    tr = spec_for(shards["png"], "train", True, aug=PRESETS["light"], batch=13)
    pipe, _ = DaliLoader(tr, dist).build_pipeline(epoch=0, with_params=True)
    image, mask, info, fh, fv = pipe.run()
    base = by_key(DaliLoader(replace(tr, augment=PRESETS["none"]), dist))
    seen = set()
    for i in range(len(info)):
        key = bytes(np.asarray(info.at(i))).decode().rsplit(":", 1)[-1].partition(".")[0]
        h, v = bool(np.asarray(fh.at(i))), bool(np.asarray(fv.at(i)))
        dims = [d for d, on in ((2, h), (1, v)) if on]
        for got, want in ((image, base[key][0]), (mask, base[key][1])):
            want = want.flip(dims) if dims else want
            assert torch.equal(torch.from_numpy(np.asarray(got.at(i))[..., 0]).float(), want[0]), (key, h, v)
        seen.add((h, v))
    assert len(seen) >= 3     # the coins went several ways, so a swapped flag would be caught


def test_no_augmentation_on_eval_and_intensity_augmentations_run(shards):
    dist = DistInfo(0, 0, 1, CPU)
    strong = PRESETS["strong"]
    plain = by_key(DaliLoader(spec_for(shards["png"], "val"), dist))
    evald = by_key(DaliLoader(spec_for(shards["png"], "val", aug=strong), dist))  # spec says eval
    assert all(torch.equal(plain[k][0], evald[k][0]) for k in plain)
    only_intensity = AugmentParams(brightness_p=1, brightness=0.3, contrast_p=1, contrast=0.3,
                                   gamma_p=1, gamma=0.3, noise_p=1, noise=0.05)
    tr = spec_for(shards["png"], "train", True, aug=only_intensity, batch=13)
    got = by_key(DaliLoader(tr, dist))
    base = by_key(DaliLoader(replace(tr, augment=PRESETS["none"]), dist))
    for k in got:
        assert torch.equal(got[k][1], base[k][1])                 # geometry untouched
        assert not torch.equal(got[k][0], base[k][0])             # intensities changed


def test_intensity_augmentation_follows_the_documented_formula(shards):
    """gamma on [0, 1], then x*b, then (y - mean(y))*c + mean(y), folded by DALI into the
    normalisation constants: recomputed in numpy from the un-augmented image, per sample."""
    dist = DistInfo(0, 0, 1, CPU)
    aug = AugmentParams(brightness_p=1, brightness=0.3, contrast_p=1, contrast=0.3, gamma_p=0.5, gamma=0.3)
    mean, std = 0.2, 0.5
    tr = spec_for(shards["png"], "train", True, aug=aug, batch=13, mean=mean, std=std)
    pipe, _ = DaliLoader(tr, dist).build_pipeline(epoch=0, with_params=True)
    image, _, info, b, c, g, offset, scale = pipe.run()
    base = by_key(DaliLoader(replace(tr, augment=PRESETS["none"]), dist))
    gammas = []
    for i in range(len(info)):
        key = bytes(np.asarray(info.at(i))).decode().rsplit(":", 1)[-1].partition(".")[0]
        x = base[key][0][0].numpy().astype(np.float64) * std + mean           # [0, 1] units
        bi, ci, gi = (float(np.asarray(t.at(i))) for t in (b, c, g))
        y = np.clip(x, 0, 1) ** gi * bi
        y = (y - y.mean()) * ci + y.mean()
        want = (y - mean) / std
        np.testing.assert_allclose(np.asarray(image.at(i))[..., 0], want, atol=2e-4, err_msg=key)
        assert float(np.asarray(scale.at(i))) == pytest.approx(bi * ci, rel=1e-6)
        assert 0.7 <= bi <= 1.3 and 0.7 <= ci <= 1.3 and 0.7 <= gi <= 1.3
        gammas.append(gi)
    assert 0 < sum(g != 1.0 for g in gammas) < len(gammas)    # the gamma coin went both ways


def test_torch_augment_has_the_same_parameters():
    rng = np.random.default_rng
    img, mask = np.random.default_rng(0).random((32, 32), dtype=np.float32), np.zeros((32, 32), np.float32)
    mask[8:20, 10:24] = 1
    out, m, _, _, _ = _augment(img, mask, 48, PRESETS["strong"], rng(0))
    assert out.shape == m.shape == (48, 48) and set(np.unique(m).tolist()) <= {0.0, 1.0}
    # Brightness then contrast about the image mean: one map x*scale + offset that keeps mean*b.
    bc = AugmentParams(brightness_p=1, brightness=0.3, contrast_p=1, contrast=0.3)
    out, _, _, scale, offset = _augment(img, mask, 32, bc, rng(1))
    assert np.array_equal(out, img)                         # folded into the normalisation
    mu = float(img.mean())
    b = (offset + scale * mu) / mu                          # mean(x*scale + offset) = b*mean(x)
    c = scale / b
    assert 0.7 <= b <= 1.3 and 0.7 <= c <= 1.3 and c != pytest.approx(1.0)
    np.testing.assert_allclose(img * scale + offset, (img * b - b * mu) * c + b * mu, atol=1e-6)
    # Gamma first, on [0, 1]: x ** g.
    out, _, _, scale, offset = _augment(img, mask, 32, AugmentParams(gamma_p=1, gamma=0.3), rng(2))
    gi = float(np.log(out[0, 0]) / np.log(img[0, 0]))
    assert 0.7 <= gi <= 1.3 and np.allclose(out, img ** gi, atol=1e-5) and (scale, offset) == (1.0, 0.0)


def test_torch_augmentation_moves_image_and_mask_together(tmp_path):
    """--loader torch, strong geometry: in every training sample the bright object of the image
    lies on the augmented mask (Dice >= 0.95), and the geometry did move most samples (the same
    comparison against the un-augmented mask fails), so a desynchronised mask would be caught."""
    d = make_shards(tmp_path / "ph", {"train": 16, "val": 1, "test": 1}, size=(72, 88))
    aug = replace(PRESETS["strong"], noise_p=0.0, gamma_p=0.0, brightness_p=0.0, contrast_p=0.0)
    dist = DistInfo(0, 0, 1, CPU)
    got = by_key(TorchLoader(spec_for(d, "train", True, size=80, aug=aug, batch=8), dist))
    base = by_key(TorchLoader(spec_for(d, "train", True, size=80, batch=8), dist))
    moved = 0
    for k, (img, m) in got.items():
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert dice(img[0].numpy() > 0.45, m[0].numpy()) >= 0.95, k
        moved += dice(m[0].numpy(), base[k][1][0].numpy()) < 0.98
    assert moved >= 10


def test_torch_flips_alone_move_image_and_mask_exactly(shards):
    dist = DistInfo(0, 0, 1, CPU)
    tr = spec_for(shards["png"], "train", True, aug=PRESETS["light"], batch=13)
    got = by_key(TorchLoader(tr, dist))
    base = by_key(TorchLoader(replace(tr, augment=PRESETS["none"]), dist))
    seen = set()
    for k, (img, m) in got.items():
        bi, bm = base[k]
        for dims in ([], [2], [1], [1, 2]):
            want = (bi.flip(dims), bm.flip(dims)) if dims else (bi, bm)
            if torch.equal(img, want[0]):
                assert torch.equal(m, want[1]), k
                seen.add(tuple(dims))
                break
        else:
            raise AssertionError(f"{k}: not a flip of the un-augmented sample")
    assert len(seen) >= 3


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_dali_and_torch_training_batches_have_the_same_draws_and_pixels(shards, preset):
    """Both loaders draw every per-sample parameter on the host from the global position
    (data/draws.py): for the same plan the training batches match, masks exactly, images to
    the loaders' resampling tolerance (2/255 in [0, 1] units), noise and intensities included.
    Negative control: another --seed moves the masks, so a draw that differed would be caught."""
    dist = DistInfo(0, 0, 1, CPU)
    tr = spec_for(shards["png"], "train", True, aug=PRESETS[preset], batch=13, mean=0.2, std=0.5)
    dali, torch_ = by_key(DaliLoader(tr, dist)), by_key(TorchLoader(tr, dist))
    other = by_key(TorchLoader(replace(tr, seed=1), dist))
    assert dali.keys() == torch_.keys() and len(dali) == 13
    for k in dali:
        assert torch.equal(dali[k][1], torch_[k][1]), k
        diff = (dali[k][0] - torch_[k][0]).abs() * 0.5          # [0, 1] units
        assert diff.max() < 2 / 255 and diff.mean() < 1e-3, (k, float(diff.max()))
    assert sum(not torch.equal(dali[k][1], other[k][1]) for k in dali) >= 4


def test_dali_recorded_params_are_the_host_draws_of_the_position(shards):
    """The DALI graph's per-sample parameters (with_params) are `draws.sample_draws` of the
    sample's global position, and its matrix is the torch loader's OpenCV matrix moved to
    half-pixel centres."""
    from tumorseg_dist.data.draws import position_seed, sample_draws
    from tumorseg_dist.data.torch_loader import _geometry_matrix
    dist = DistInfo(0, 0, 1, CPU)
    aug = PRESETS["strong"]
    tr = spec_for(shards["png"], "train", True, aug=aug, batch=13, seed=5)
    loader = DaliLoader(tr, dist)
    pipe, _ = loader.build_pipeline(epoch=2, with_params=True)
    _, _, info, affine, b, c, fh, fv, g, _, _ = pipe.run()
    keys = loader.layout.keys
    for i, (pos, idx) in enumerate(loader.plan(2)[0]):
        assert bytes(np.asarray(info.at(i))).decode().endswith(f":{keys[idx]}.image.png")
        d = sample_draws(aug, np.random.default_rng(position_seed(5, 2, pos)), 64, 1)
        assert (bool(np.asarray(fh.at(i))), bool(np.asarray(fv.at(i)))) == (d["hflip"], d["vflip"])
        assert float(np.asarray(b.at(i))) == pytest.approx(d["brightness"], rel=1e-6)
        assert float(np.asarray(c.at(i))) == pytest.approx(d["contrast"], rel=1e-6)
        assert float(np.asarray(g.at(i))) == pytest.approx(d["gamma"] or 1.0, rel=1e-6)
        if d["affine"] is None:
            d["affine"] = (0.0, 1.0, 0.0, 0.0)
        np.testing.assert_allclose(_cv2_matrix(np.asarray(affine.at(i))), _geometry_matrix((64, 64), 64, d),
                                   atol=1e-4)


def test_dali_augmentation_follows_the_position_not_the_world_size(shards):
    """Two ranks (batch 6 each) and one rank (batch 12) put the same augmented pixels at every
    position: the draws no longer come from the rank's pipeline stream."""
    tr = spec_for(shards["png"], "train", True, aug=PRESETS["standard"], batch=12)
    one = by_key(DaliLoader(tr, DistInfo(0, 0, 1, CPU)))
    two = {}
    for r in range(2):
        two.update(by_key(DaliLoader(replace(tr, batch_size=6), DistInfo(r, r, 2, CPU))))
    assert one.keys() == two.keys() and len(one) == 12
    for k in one:
        assert torch.equal(one[k][0], two[k][0]) and torch.equal(one[k][1], two[k][1]), k


def test_augment_overrides_are_checked():
    assert resolve(AugmentConfig(augment="light", gamma=0.25, gamma_p=1.0)).gamma == 0.25
    with pytest.raises(ConfigError, match="--gamma-p"):
        resolve(AugmentConfig(gamma_p=1.5))
    with pytest.raises(ConfigError, match="--scale"):
        resolve(AugmentConfig(scale=1.0))


# ---------------------------------------------------------------- sharding, padding, epochs

@pytest.mark.parametrize("n,world,batch", [(11, 2, 4), (11, 3, 2), (7, 4, 3), (9, 3, 3)])
def test_eval_counts_every_sample_once_across_ranks(tmp_path, n, world, batch):
    d = make_shards(tmp_path / "e", {"train": 1, "val": n, "test": 1}, size=(32, 32), shard_size=3000)
    assert len(shard_paths(d, "val")) > 1      # several tars: DALI's split spans files
    seen, lens = [], set()
    for r in range(world):
        loader = DaliLoader(spec_for(d, size=32, batch=batch), DistInfo(r, r, world, CPU))
        batches = list(loader)
        lens.add(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            assert len(b.keys) == b.image.shape[0] == b.valid.shape[0]
            seen += [k for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert len(lens) == 1
    assert sorted(seen) == [f"s{i:04d}" for i in range(1, 1 + n)]


def test_training_ranks_are_disjoint_and_equal_length(tmp_path):
    d = make_shards(tmp_path / "t", {"train": 19, "val": 1, "test": 1}, size=(32, 32), shard_size=4000)
    epochs = []
    for epoch in (0, 1):
        per_rank = []
        for r in range(3):
            spec = spec_for(d, "train", True, size=32, batch=2, aug=PRESETS["light"])
            loader = DaliLoader(spec, DistInfo(r, r, 3, CPU))
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 19 // 3 // 2
            # Selection by global position: the torch loader puts the same samples there.
            torch_loader = TorchLoader(spec, DistInfo(r, r, 3, CPU))
            torch_loader.set_epoch(epoch)
            assert [b.keys for b in batches] == [b.keys for b in torch_loader]
            per_rank.append({k for b in batches for k in b.keys})
        assert not (per_rank[0] & per_rank[1]) and not (per_rank[0] & per_rank[2]) and not (per_rank[1] & per_rank[2])
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]      # each epoch is another permutation of the whole split


def test_epoch_order_depends_only_on_seed_and_epoch(shards):
    s = spec_for(shards["png"], "train", True, batch=4, aug=PRESETS["standard"], seed=5)

    def epoch_of(loader, e):
        loader.set_epoch(e)
        return [(b.keys, b.image) for b in loader]

    a = DaliLoader(s, DistInfo(0, 0, 1, CPU))
    run = [epoch_of(a, e) for e in range(3)]                       # an uninterrupted run
    resumed = epoch_of(DaliLoader(s, DistInfo(0, 0, 1, CPU)), 2)   # a fresh process resuming at 2
    assert [k for k, _ in run[2]] == [k for k, _ in resumed]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(run[2], resumed))
    assert [k for k, _ in run[0]] != [k for k, _ in run[1]]
    other = epoch_of(DaliLoader(replace(s, seed=6), DistInfo(0, 0, 1, CPU)), 2)
    assert [k for k, _ in other] != [k for k, _ in run[2]]


# ---------------------------------------------------------------- parity with --loader torch

@pytest.mark.parametrize("codec", ["png", "raw"])
def test_dali_and_torch_give_the_same_val_samples_and_metrics(shards, codec):
    s = spec_for(shards[codec], size=64, channels=3, mean=0.3, std=0.2, batch=4)
    metrics = {}
    for name, cls in (("dali", DaliLoader), ("torch", TorchLoader)):
        samples = by_key(cls(s, DistInfo(0, 0, 1, CPU)))
        metrics[name] = samples
    assert sorted(metrics["dali"]) == sorted(metrics["torch"])
    for k in metrics["dali"]:
        (di, dm), (ti, tm) = metrics["dali"][k], metrics["torch"][k]
        diff = (di - ti).abs() * 0.2                 # back to [0, 1] image units
        assert diff.max() < 1.5 / 255 and diff.mean() < 2e-4, k   # resamplers differ at borders only
        assert torch.equal(dm, tm), k
    # Same "weights" (a fixed threshold model) -> the same summed Dice on both loaders.
    def summed_dice(samples):
        tp = fp = fn = 0.0
        for img, m in samples.values():
            pred = (img[0] * 0.2 + 0.3 > 0.45).float()
            tp += float((pred * m[0]).sum()); fp += float((pred * (1 - m[0])).sum())
            fn += float(((1 - pred) * m[0]).sum())
        return 2 * tp / (2 * tp + fp + fn)
    assert abs(summed_dice(metrics["dali"]) - summed_dice(metrics["torch"])) < 1e-3


# ---------------------------------------------------------------- errors

def test_missing_or_truncated_shard_or_index_is_a_clear_error(tmp_path):
    d = make_shards(tmp_path / "bad", {"train": 3, "val": 3, "test": 3}, size=(32, 32))
    dist = DistInfo(0, 0, 1, CPU)
    tar = d / "val-000000.tar"
    idx = tar.with_suffix(".idx")
    good_idx = idx.read_bytes()
    idx.unlink()
    with pytest.raises(ShardError, match=r"val-000000\.idx is missing.*wds2idx"):
        DaliLoader(spec_for(d), dist)
    idx.write_bytes(good_idx.splitlines(keepends=True)[0] + good_idx.splitlines(keepends=True)[1])
    with pytest.raises(ShardError, match=r"val-000000\.idx.*re-run pack"):
        DaliLoader(spec_for(d), dist)
    idx.write_bytes(good_idx)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"val-000000\.tar is truncated.*re-run pack"):
        DaliLoader(spec_for(d), dist)
    tar.unlink()
    with pytest.raises(ShardError, match=r"val-000000\.tar is listed in manifest.json but missing: copy "
                                         r"the dataset again.*python -m tumorseg_dist\.pack .* --overwrite"):
        DaliLoader(spec_for(d), dist)
    with pytest.raises(ShardError, match="fewer than the 4 ranks"):
        DaliLoader(spec_for(d, "test"), DistInfo(0, 0, 4, CPU))


def test_build_loader_selects_dali(shards):
    from tumorseg_dist.config import Config
    from tumorseg_dist.data.loader import build_loader
    cfg = Config()
    cfg.data.loader, cfg.data.size, cfg.data.in_channels, cfg.train.batch_size = "dali", 64, 1, 4
    loader = build_loader(cfg, shards["png"], "val", DistInfo(0, 0, 1, CPU), training=False)
    assert isinstance(loader, DaliLoader) and len(loader) == 3
    manifest = json.loads((shards["png"] / "manifest.json").read_text())
    assert loader.spec.mean == pytest.approx(tuple(manifest["mean"]))


def test_throughput_data_stage_reports_rows_with_provenance(tmp_path, monkeypatch):
    import importlib.util
    bench = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location("throughput", bench / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", mod)  # its flags dataclass is looked up by module
    spec.loader.exec_module(mod)
    doc = mod.main(["--stage", "data", "--loader", "dali,torch,naive", "--codec", "raw", "--size", "32",
                    "--source-size", "32", "--samples", "12", "--batches", "2", "--warmup", "1",
                    "--batch-size", "4", "--workers", "0", "--device", "cpu", "--data-dir", str(tmp_path),
                    "--repeats", "3"])
    assert {"device", "date", "git_commit", "command", "versions"} <= set(doc)
    assert [(r["loader"], r["codec"]) for r in doc["results"]] == [("dali", "raw"), ("torch", "raw"),
                                                                     ("naive", "png-files")]
    assert all(r["images_per_run"] == 8 and r["images_per_s"] > 0 for r in doc["results"])
    for r in doc["results"]:   # best and median of the three repeats, each kept
        assert len(r["runs_images_per_s"]) == 3 and r["images_per_s"] == max(r["runs_images_per_s"])
        assert r["median_images_per_s"] == pytest.approx(sorted(r["runs_images_per_s"])[1], abs=1e-3)
        assert r["image_dtype"] == "float32"


@pytest.mark.slow
def test_loop_evaluate_gives_the_same_metrics_with_dali_and_torch(shards):
    """The training loop's evaluate() on the same weights: --loader dali == --loader torch."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from inference_testing import tiny_config
    from tumorseg_dist.data.loader import build_loader
    from tumorseg_dist.engines import build_engine
    from tumorseg_dist.loop import evaluate
    from tumorseg_dist.losses import DiceBCELoss
    from tumorseg_dist.models import build_model
    cfg = tiny_config(size=64, data=shards["png"])
    d = DistInfo(0, 0, 1, CPU)
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg.model, 1), d, lambda a, b: a.mean(), 1)
    got = {}
    for name in ("dali", "torch"):
        cfg.data.loader = name
        got[name] = evaluate(engine, build_loader(cfg, shards["png"], "val", d, training=False),
                             DiceBCELoss(dice_weight=0.0), cfg.train.threshold)
    assert got["dali"]["samples"] == got["torch"]["samples"] == 11
    assert got["dali"]["loss"] == pytest.approx(got["torch"]["loss"], abs=1e-4)
    for k in ("dice", "iou", "precision", "recall", "accuracy"):
        assert got["dali"][k] == pytest.approx(got["torch"][k], abs=2e-3), k


@pytest.mark.parametrize("loader_cls", [DaliLoader, TorchLoader])
@pytest.mark.parametrize("cl", [False, True])
def test_image_dtype_follows_amp_and_equals_the_float32_batch_rounded(shards, loader_cls, cl):
    """--amp bf16 delivers bf16 images (the masks stay float32 {0, 1}) in the requested layout,
    equal to the float32 batch rounded once."""
    dist = DistInfo(0, 0, 1, CPU)
    spec = replace(spec_for(shards["png"], "val", channels=3, cl=cl, mean=0.3, std=0.2), num_workers=0
                   if loader_cls is TorchLoader else 1)
    ref = by_key(loader_cls(spec, dist))
    got = list(loader_cls(replace(spec, image_dtype=torch.bfloat16), dist))
    fmt = torch.channels_last if cl else torch.contiguous_format
    for b in got:
        assert b.image.dtype == torch.bfloat16 and b.mask.dtype == torch.float32
        assert b.image.is_contiguous(memory_format=fmt)
        for i, k in enumerate(b.keys):
            if bool(b.valid[i]):
                assert torch.equal(b.image[i], ref[k][0].to(torch.bfloat16)), k
                assert torch.equal(b.mask[i], ref[k][1]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_gpu_pipeline_matches_the_cpu_pipeline(shards, codec):
    """The same definition with device arguments only: mixed decoding and GPU operators give the
    CPU pipeline's validation samples (resamplers and the JPEG decoder round differently, so a
    small tolerance), and a bf16 channels-last training epoch with the affine (resize folded into
    the warp, contrast mean read back to the CPU) delivers sane batches on the device."""
    gpu = DistInfo(0, 0, 1, torch.device("cuda", 0))
    spec = spec_for(shards[codec], "val", channels=3, mean=0.3, std=0.2, size=64)
    ref, got = by_key(DaliLoader(spec, DistInfo(0, 0, 1, CPU))), by_key(DaliLoader(spec, gpu))
    assert sorted(ref) == sorted(got)
    tol = 0.1 if codec == "jpeg" else 0.02        # normalised units (std 0.2): 0.02 = 1/250 of range
    for k in ref:
        assert got[k][0].device.type == "cuda"
        assert (got[k][0].cpu() - ref[k][0]).abs().max() < tol, k
        assert (got[k][1].cpu() != ref[k][1]).float().mean() < 0.005, k
    train = replace(spec_for(shards[codec], "train", True, aug=PRESETS["standard"], batch=4, channels=3,
                             mean=0.3, std=0.2, cl=True), image_dtype=torch.bfloat16)
    batches = list(DaliLoader(train, gpu))
    assert len(batches) == 3
    for b in batches:
        assert b.image.device.type == b.mask.device.type == "cuda" and b.image.dtype == torch.bfloat16
        assert b.image.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(b.image.float()).all() and set(b.mask.unique().tolist()) <= {0.0, 1.0}
