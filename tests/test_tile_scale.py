"""The sliding window tiles an image at the scale the model trained at (issue 15): a
`--geometry crop --crop-scale resize` checkpoint's tiles come from the image with its short side
resized to the size, the stitched map resized back; every other checkpoint is tiled at the
image's own resolution. Both predictors (PyTorch and onnxruntime) do the same, and the ONNX file
records the scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import export
from tumorseg_dist.checkpoint import CheckpointError
from tumorseg_dist.data.geometry import scaled_size
from tumorseg_dist.inference import Predictor, load_model
from tumorseg_dist.onnx_predictor import (OnnxModelError, at_tile_scale, load_onnx, map_back, resize_weights,
                                          tiled_shape)

MEAN, STD, SIZE = 0.3, 0.2, 64


@pytest.mark.parametrize("hw", [(120, 200), (200, 90), (50, 30), (64, 64), (7, 300), (526, 701)])
def test_the_short_side_shape_is_the_crop_loaders_scaled_size(hw):
    assert tiled_shape(*hw, SIZE, "short-side") == scaled_size(*hw, SIZE, "crop", "resize")
    assert tiled_shape(*hw, SIZE, "native") == hw
    with pytest.raises(ValueError, match="tile scale must be one of native, short-side"):
        tiled_shape(*hw, SIZE, "long-side")


@pytest.mark.parametrize("n,m", [(701, 64), (100, 37), (37, 100), (64, 64), (5, 128)])
def test_resize_weights_are_torchs_antialiased_bilinear(n, m):
    """The numpy resize both predictors share is F.interpolate(bilinear, antialias=True)."""
    x = np.random.default_rng(0).random((n, 9), dtype=np.float32)
    ours = resize_weights(n, m) @ x
    theirs = F.interpolate(torch.from_numpy(x.T.copy())[None, None], size=(9, m), mode="bilinear",
                           align_corners=False, antialias=True)[0, 0].numpy().T
    np.testing.assert_allclose(ours, theirs, atol=1e-5)   # float32 sums in another order


def test_the_rescaled_image_stays_on_its_pixel_grid():
    rng = np.random.default_rng(1)
    img8 = rng.integers(0, 256, (90, 150)).astype(np.float32) / 255
    img16 = rng.integers(0, 65536, (90, 150, 3)).astype(np.float32) / 65535
    for img, grid in ((img8, 255), (img16, 65535)):
        out = at_tile_scale(img, SIZE, "short-side")
        assert out.shape[:2] == (64, 107) and out.shape[2:] == img.shape[2:]
        np.testing.assert_allclose(out * grid, np.rint(out * grid), atol=1e-3)
    assert at_tile_scale(img8, SIZE, "native") is img8


class Identity(nn.Module):
    """The logit is the normalised input: the stitched map shows what the tiles were cut from."""

    def forward(self, x):
        return x[:, :1]


def identity_predictor(geometry: str, crop_scale: str | None) -> Predictor:
    data = {"geometry": geometry} if crop_scale is None else {"geometry": geometry, "crop_scale": crop_scale}
    return Predictor(model=Identity(), arch="unet", encoder="test", in_channels=1, size=SIZE, mean=(MEAN,),
                     std=(STD,), threshold=0.5, device=torch.device("cpu"), config={"data": data})


@pytest.mark.parametrize("geometry,crop_scale,scale", [
    ("crop", "resize", "short-side"), ("crop", None, "short-side"), ("crop", "native", "native"),
    ("squash", "resize", "native"), ("letterbox", "resize", "native")])
def test_the_checkpoint_decides_the_tile_scale(geometry, crop_scale, scale):
    assert identity_predictor(geometry, crop_scale).tile_scale == scale


def test_an_unknown_crop_scale_in_a_checkpoint_is_a_clear_error():
    with pytest.raises(CheckpointError, match="data.crop_scale 'half' is unknown.*upgrade"):
        identity_predictor("crop", "half").tile_scale  # noqa: B018


def test_a_short_side_model_is_tiled_from_the_image_at_its_training_scale():
    """An identity model's stitched map is sigmoid((x - mean) / std) of the image its tiles came
    from (every tile agrees where they overlap): at the short-side scale and resized back, not
    the native image's."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (150, 260)).astype(np.float32) / 255
    crop = identity_predictor("crop", "resize")
    got = crop.probability_map(img, inference="sliding", overlap=0.5).numpy()
    scaled = at_tile_scale(img, SIZE, "short-side")
    assert scaled.shape == (64, 111)
    want = map_back(1 / (1 + np.exp(-(scaled - MEAN) / STD)), 150, 260)
    assert got.shape == (150, 260)
    np.testing.assert_allclose(got, want, atol=1e-5)
    native = identity_predictor("crop", "native").probability_map(img, inference="sliding").numpy()
    np.testing.assert_allclose(native, 1 / (1 + np.exp(-(img - MEAN) / STD)), atol=1e-5)
    assert np.abs(got - native).max() > 0.05   # the scale changes what the model sees


@pytest.fixture(scope="module")
def crop_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("tile-scale")
    cfg = tiny_config(size=SIZE)
    cfg.data.geometry, cfg.data.crop_scale = "crop", "resize"
    ckpt = make_checkpoint(d / "crop.pt", cfg)
    onnx_path = d / "crop.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(onnx_path)]) == 0
    return ckpt, onnx_path


def test_the_onnx_predictor_tiles_a_short_side_model_as_pytorch_does(crop_export):
    ckpt, onnx_path = crop_export
    model, onnx_model = load_model(ckpt), load_onnx(onnx_path)
    assert model.tile_scale == onnx_model.tile_scale == "short-side"
    rng = np.random.default_rng(3)
    for shape in ((150, 260), (40, 50, 3)):   # shrunk to 64 × 111; enlarged to 64 × 80
        img = rng.integers(0, 256, shape).astype(np.float32) / 255
        for tta in (False, True):
            want = model.probability_map(img, tta, "sliding", 0.5).numpy()
            got = onnx_model.probability_map(img, tta, "sliding", 0.5)
            assert got.shape == want.shape == shape[:2]
            assert np.abs(got - want).max() < 1e-5, (shape, tta)


def test_an_onnx_file_with_an_unknown_tile_scale_is_refused(crop_export, tmp_path):
    import onnx
    proto = onnx.load(str(crop_export[1]))
    for p in proto.metadata_props:
        if p.key == "tumorseg_dist.tile_scale":
            p.value = "quarter"
    bad = tmp_path / "edited.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(OnnxModelError, match=r"edited.onnx: its tumorseg_dist.tile_scale metadata 'quarter'"):
        load_onnx(bad)
