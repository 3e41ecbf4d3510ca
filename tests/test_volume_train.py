"""16-bit CT slices from NIfTI volumes through training and evaluation: a CT-like phantom (int16
HU, a known anisotropic spacing) packed with --intensity raw into 16-bit PNG, JPEG 2000 and raw
shards; both loaders deliver the same normalised pixels (the normalisation is the manifest's),
train on a fold, and evaluate reports HD95 and ASSD in mm from each slice's spacing_mm."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PY, TINY, run_cli
from test_volumes import nnunet_set, run as pack
from tumorseg_dist import dist as distmod
from tumorseg_dist.config import Config
from tumorseg_dist.data.loader import build_loader
from tumorseg_dist.data.shards import IndexedShards, read_manifest, shard_paths
from tumorseg_dist.scoring import average_surface_distance, hausdorff95

SPACING = (0.8, 0.9, 2.5)   # x, y, z mm: axial slices have rows along y (0.9) and columns along x (0.8)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ct16")
    root = nnunet_set(tmp / "raw", n=6, shape=(48, 40, 10), spacing=SPACING)
    out = {}
    for codec in ("png", "jp2", "raw"):
        out[codec] = tmp / f"shards-{codec}"
        assert pack(root, "--out", out[codec], "--intensity", "raw", "--codec", codec, "--folds", "2",
                    "--split", "0.7,0,0.3") == 0
    return out


def test_raw_intensities_are_16_bit_shards(ct):
    m = read_manifest(ct["png"])
    assert m["volumes"]["intensity"]["mode"] == "raw" and m["volumes"]["intensity"]["offsets"] == {"32768": 6}
    ds = IndexedShards(shard_paths(ct["png"], "test"))
    member = ds.read_member(0)
    assert Image.open(io.BytesIO(member["image.png"])).mode.startswith("I;16")
    assert json.loads(member["json"])["spacing_mm"] == [0.9, 0.8]
    # HU -1000..~140 + 32768 in [0, 1] units is a narrow band: the manifest's train mean/std
    # bring it to a usable range
    assert 0.48 < m["mean"][0] < 0.51 and m["std"][0] < 0.01


@pytest.mark.parametrize("codec", ["png", "jp2", "raw"])
def test_both_loaders_give_the_same_normalised_16_bit_pixels(ct, codec):
    info = distmod.init("cpu")
    got = {}
    for loader in ("torch", "dali"):
        cfg = Config()
        cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = 64, 1, 1
        cfg.data.loader, cfg.train.batch_size, cfg.data.fold = loader, 4, 0
        ld = build_loader(cfg, ct[codec], "val", info, training=False)
        ld.set_epoch(0)
        b = next(iter(ld))
        got[loader] = (list(b.keys), b.image.float().numpy())
    (kt, t), (kd, d) = got["torch"], got["dali"]
    assert kt == kd
    assert np.abs(t - d).max() < 1e-4                  # 16 bits kept by both decoders
    assert 0.3 < t.std() < 3 and abs(t.mean()) < 1     # normalised, not a flat 8-bit band
    assert len(np.unique(np.round(t, 3))) > 200        # many grey levels survive the window-free path


@pytest.mark.slow
def test_train_two_steps_on_each_loader_then_hd95_in_mm(ct, tmp_path):
    runs = {}
    for loader in ("torch", "dali"):
        runs[loader] = tmp_path / f"run-{loader}"
        run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(ct["png"]), "--fold", "0",
                 "--loader", loader, "--num-workers", "1", "--batch-size", "4", "--max-steps", "2",
                 "--out", str(runs[loader])], cwd=tmp_path)
        rec = [json.loads(x) for x in (runs[loader] / "metrics.jsonl").read_text().splitlines()]
        assert rec[-1]["step"] == 2 and np.isfinite(rec[-1]["train_loss"])
        m = read_manifest(ct["png"])
        assert "mean = [" in (runs[loader] / "config.toml").read_text()
        cfg_text = (runs[loader] / "config.toml").read_text()
        assert f"{m['mean'][0]}" in cfg_text and "fold = 0" in cfg_text
    # a near-zero threshold makes every prediction non-empty, so every lesion slice has an HD95
    out = tmp_path / "eval"
    run_cli([PY, "-m", "tumorseg_dist.evaluate", "--checkpoint", str(runs["torch"] / "checkpoints" / "last.pt"),
             "--split", "test", "--device", "cpu", "--workers", "0", "--cases", "0", "--threshold", "0.001",
             "--out", str(out)], cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hd95_images"] > 0 and metrics["hd95_mm_images"] == metrics["hd95_images"]
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    for r in rows:
        if r["hd95"]:
            for k in ("hd95", "assd"):   # between the column (0.8 mm) and the row (0.9 mm) spacing
                assert 0.8 - 1e-6 <= float(r[f"{k}_mm"]) / float(r[k]) <= 0.9 + 1e-6, (k, r)
    assert metrics["assd_mm_mean"] is not None


def test_surface_distances_in_mm_follow_the_spacing():
    """Two 20×20 squares 3 pixels apart: along the rows HD95 is 3 row spacings, along the
    columns 3 column spacings; ASSD scales with an isotropic spacing. NaN with an empty mask."""
    a = np.zeros((64, 64), bool)
    a[20:40, 20:40] = True
    down, right = np.roll(a, 3, axis=0), np.roll(a, 3, axis=1)
    spacing = (0.5, 2.0)
    assert hausdorff95(a, down) == pytest.approx(3.0)
    assert hausdorff95(a, down, spacing) == pytest.approx(1.5)
    assert hausdorff95(a, right, spacing) == pytest.approx(6.0)
    px = average_surface_distance(a, down)
    assert 0 < px < 3 and average_surface_distance(a, down, (0.7, 0.7)) == pytest.approx(0.7 * px)
    # anisotropic: a nearest boundary point may change, so only bounds by the two spacings
    assert 0.5 * px <= average_surface_distance(a, down, spacing) <= 2.0 * px
    assert average_surface_distance(a, down, spacing) < average_surface_distance(a, right, spacing)
    assert np.isnan(hausdorff95(a, np.zeros_like(a), spacing)) and np.isnan(average_surface_distance(a, ~a & False))


# ---------------------------------------------------------------- predict: a volume in, a mask volume out

def _checkpoint(ct, tmp_path) -> Path:
    from inference_testing import make_checkpoint, tiny_config
    m = read_manifest(ct["png"])
    return make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                           tiny_config(data=ct["png"], mean=tuple(m["mean"]), std=tuple(m["std"])))


def _shard_slices(shards: Path, case: str) -> dict[int, np.ndarray]:
    from tumorseg_dist.data.shards import read_sample
    out = {}
    for split in ("train", "test"):
        ds = IndexedShards(shard_paths(shards, split))
        for i, ref in enumerate(ds.refs):
            if ref.key.startswith(case + "_z"):
                out[int(ref.key.rsplit("_z", 1)[1])] = read_sample(ds, i).image
    return out


def test_predict_nifti_writes_the_mask_volume_in_the_inputs_geometry(ct, tmp_path):
    import nibabel as nib
    from test_volumes import view
    from tumorseg_dist import predict
    from tumorseg_dist.inference import load_model
    ckpt = _checkpoint(ct, tmp_path)
    # case_000 as the scanner might have written it: x and z reversed (a LAI-like voxel order)
    src = nib.load(str(ct["png"].parent / "raw" / "imagesTr" / "case_000_0000.nii.gz"))
    flip = np.diag([-1.0, 1, -1, 1])
    flip[0, 3], flip[2, 3] = src.shape[0] - 1, src.shape[2] - 1
    data = np.asanyarray(src.dataobj)[::-1, :, ::-1]
    vol = tmp_path / "in" / "ct_case.nii.gz"
    vol.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), src.affine @ flip), str(vol))
    out = tmp_path / "out"
    assert predict.main([str(vol), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu",
                         "--workers", "0", "--threshold", "0.5"]) == 0
    got = nib.load(str(out / "volumes" / "ct_case.nii.gz"))
    np.testing.assert_allclose(got.affine, nib.load(str(vol)).affine, atol=1e-6)
    assert got.shape == data.shape and got.get_data_dtype() == np.uint8
    mask = np.asanyarray(got.dataobj)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    # each slice of the volume (nibabel's RAS view) is the 2D mask written beside it, and the
    # model's prediction on the packed slice of the same case: the intensities were converted
    # exactly as pack converted them
    ras = np.asanyarray(nib.as_closest_canonical(got).dataobj)
    model = load_model(ckpt)
    packed = _shard_slices(ct["png"], "case_000")
    assert len(packed) == data.shape[2]
    for k in range(data.shape[2]):
        png = np.asarray(Image.open(out / "masks" / "ct_case" / f"ct_case_z{k:04d}.png")) > 0
        np.testing.assert_array_equal(view(ras, 2, k) > 0, png)
        np.testing.assert_array_equal(png, model.predict_image(packed[k], threshold=0.5))
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert len(rows) == data.shape[2] and rows[0]["input"] == f"{vol}#z0"


def test_predict_dicom_series_writes_nifti_with_its_affine(ct, tmp_path):
    import nibabel as nib
    from test_volumes import dicom_affine, dicom_case
    from tumorseg_dist import predict
    ckpt = _checkpoint(ct, tmp_path)
    spacing, origin = (0.7, 0.6, 3.0), (-10.0, -12.0, 40.0)
    dicom_case(tmp_path / "series" / "P1", tmp_path / "P1_label.nii.gz", shape=(32, 30, 8), spacing=spacing,
               origin=origin)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "series" / "P1"), "--checkpoint", str(ckpt), "--out", str(out),
                         "--device", "cpu", "--workers", "0"]) == 0
    got = nib.load(str(out / "volumes" / "P1.nii.gz"))
    assert got.shape == (30, 32, 8)                      # (columns, rows, slices), as dcm2niix writes
    np.testing.assert_allclose(got.affine, dicom_affine(spacing, origin), atol=1e-5)
    assert np.asarray(Image.open(out / "masks" / "P1" / "P1_z0000.png")).shape == (32, 30)


def test_predict_volume_refuses_what_it_cannot_write_before_writing(ct, tmp_path, capsys):
    """A volume with an ONNX model (no training manifest to slice by) or a K-class checkpoint
    (the mask volume is binary): one line naming the volume and the fix, nothing written."""
    from inference_testing import make_checkpoint, tiny_config
    from tumorseg_dist import export, predict
    vol = ct["png"].parent / "raw" / "imagesTr" / "case_000_0000.nii.gz"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(images / "a.png")
    ckpt = _checkpoint(ct, tmp_path)
    onnx = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(onnx), "--pixels", "uint16"]) == 0
    cfg = tiny_config(data=ct["png"])
    cfg.model.classes, cfg.model.class_names = 3, ("background", "a", "b")
    k3 = make_checkpoint(tmp_path / "k3" / "checkpoints" / "best.pt", cfg)
    for model, why in ((["--onnx", str(onnx)], "needs --checkpoint"), (["--checkpoint", str(k3)], "3 classes")):
        out = tmp_path / f"out-{why[:4]}"
        capsys.readouterr()
        assert predict.main([str(images), str(vol), *model, "--out", str(out), "--device", "cpu",
                             "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert why in err and str(vol) in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "masks" / "a.png").exists() and not (out / "areas.csv").exists()
