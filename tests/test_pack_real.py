"""Pack every real subset in ../shared/data with --format auto and check the shards with plain
`tarfile` + PIL/numpy/tifffile/pycocotools only (no project code reads the output here)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg_dist.pack import main as pack

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA} "
                                                         f"(expected ../shared/data beside the repo)")


# ---------------------------------------------------------------- independent readers

def read_out(out: Path) -> tuple[dict, dict[str, dict]]:
    """manifest, key -> {ext: bytes, "split": split}; checks manifest counts and sha256 vs tars."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict] = {}
    for split, info in manifest["splits"].items():
        n = 0
        for sh in info["shards"]:
            path = out / sh["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sh["sha256"], path
            assert (out / sh["name"]).with_suffix(".idx").is_file()
            keys = []
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    key, _, ext = m.name.partition(".")
                    if key not in samples:
                        samples[key] = {"split": split}
                        keys.append(key)
                    assert ext not in samples[key], f"duplicate member {m.name}"
                    samples[key][ext] = tf.extractfile(m).read()
            assert len(keys) == sh["samples"], path
            n += len(keys)
        assert n == info["samples"], split
        pos = sum(np.asarray(Image.open(io.BytesIO(samples[k]["mask.png"]))).any()
                  for k, v in samples.items() if v["split"] == split)
        assert pos == info["positive_samples"]
    for key, s in samples.items():
        assert key.isascii() and " " not in key and "." not in key
        assert {"json", "mask.png"} <= set(s), key
    return manifest, samples


def decode_image(s: dict) -> np.ndarray:
    if "image.npy" in s:
        return np.load(io.BytesIO(s["image.npy"]), allow_pickle=False)
    ext = next(e for e in s if e.startswith("image."))
    return np.asarray(Image.open(io.BytesIO(s[ext])))


def decode_mask(s: dict) -> np.ndarray:
    im = Image.open(io.BytesIO(s["mask.png"]))
    assert im.mode == "L"
    m = np.asarray(im)
    assert set(np.unique(m)) <= {0, 255}
    return m


def meta(s: dict) -> dict:
    return json.loads(s["json"])


def src_image(path: Path) -> np.ndarray:
    if path.suffix == ".tif":
        import tifffile
        return tifffile.imread(path)
    return np.asarray(Image.open(path))


def src_mask(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    return a.any(axis=2) if a.ndim == 3 else a != 0


def check_groups(samples: dict) -> None:
    split_of: dict = {}
    for s in samples.values():
        g = meta(s)["group"]
        if g is not None:
            assert split_of.setdefault(g, s["split"]) == s["split"], f"group {g} in two splits"


def run_pack(*args) -> None:
    assert pack([*map(str, args), "--no-progress"]) == 0


# ---------------------------------------------------------------- one test per subset

def test_folders_subset(tmp_path, capsys):
    root = DATA / "images_masks_folders"
    out = tmp_path / "brain"
    run_pack(root, "--out", out, "--workers", "2")
    assert "format: folders" in capsys.readouterr().out
    manifest, samples = read_out(out)
    assert len(samples) == 120 and manifest["format"] == "folders"
    for s in samples.values():
        m = meta(s)
        img = src_image(root / m["source"])
        assert np.array_equal(decode_image(s), img)
        assert m["mask_sources"] == [m["source"].replace("data/", "mask/", 1)]
        assert np.array_equal(decode_mask(s) > 0, src_mask(root / m["mask_sources"][0]))
        assert (m["height"], m["width"], m["channels"]) == (512, 512, 1)
        assert m["dataset"] == "brain"
    assert {s["split"] for s in samples.values()} == {"train", "val", "test"}
    assert abs(manifest["splits"]["train"]["samples"] - 84) <= 1


def test_lgg_suffix_tiff_subset(tmp_path, capsys):
    root = DATA / "lgg_kaggle_3m"
    out = tmp_path / "lgg"
    run_pack(root, "--out", out, "--codec", "raw")
    assert "format: suffix" in capsys.readouterr().out
    manifest, samples = read_out(out)
    assert len(samples) == 67
    pos = 0
    for s in samples.values():
        m = meta(s)
        img = src_image(root / m["source"])
        assert img.shape == (256, 256, 3)
        got = decode_image(s)
        assert got.dtype == img.dtype and np.array_equal(got, img)
        assert m["mask_sources"] == [m["source"][:-4] + "_mask.tif"]
        mask = src_mask(root / m["mask_sources"][0])
        assert np.array_equal(decode_mask(s) > 0, mask)
        pos += mask.any()
        assert m["group"] == Path(m["source"]).parent.name and m["group"].startswith("TCGA_")
    assert pos == 21 == sum(v["positive_samples"] for v in manifest["splits"].values())
    check_groups(samples)
    assert len({meta(s)["group"] for s in samples.values()}) == 3
    assert len(manifest["mean"]) == 3 and len(manifest["std"]) == 3


def test_busi_suffix_subset(tmp_path, capsys):
    root = DATA / "busi"
    out = tmp_path / "busi"
    run_pack(root, "--out", out, "--workers", "2")
    assert "format: suffix" in capsys.readouterr().out
    manifest, samples = read_out(out)
    assert len(samples) == 63
    by_source = {meta(s)["source"]: s for s in samples.values()}
    assert len(by_source) == 63
    for src, s in by_source.items():
        m = meta(s)
        assert np.array_equal(decode_image(s), src_image(root / src))
        union = np.logical_or.reduce([src_mask(root / ms) for ms in m["mask_sources"]])
        assert np.array_equal(decode_mask(s) > 0, union)
        assert m["group"] is None
    multi = by_source["dataset/benign/benign (25).png"]
    ms = meta(multi)["mask_sources"]
    assert ms == ["dataset/benign/benign (25)_mask.png", "dataset/benign/benign (25)_mask_1.png"]
    a, b = (src_mask(root / p) for p in ms)
    assert (decode_mask(multi) > 0).sum() == (a | b).sum() > max(a.sum(), b.sum())
    normal = [s for src, s in by_source.items() if "/normal/" in src]
    assert len(normal) == 12 and not any(decode_mask(s).any() for s in normal)


def test_coco_subset(tmp_path, capsys):
    from pycocotools.coco import COCO
    root = DATA / "brain_tumor_coco"
    out = tmp_path / "coco"
    run_pack(root, "--out", out, "--codec", "raw", "--workers", "2", "--split", "0.5,0.25,0.25")
    assert "format: coco" in capsys.readouterr().out
    manifest, samples = read_out(out)
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 150, "val": 45, "test": 30}
    folder = {"train": "train", "val": "valid", "test": "test"}
    cocos = {sp: COCO(str(root / "archive" / d / "_annotations.coco.json")) for sp, d in folder.items()}
    seen = 0
    for s in samples.values():
        m = meta(s)
        coco = cocos[s["split"]]
        assert m["source"].startswith(f"archive/{folder[s['split']]}/")
        name = Path(m["source"]).name
        img_id = next(i for i, im in coco.imgs.items() if im["file_name"] == name)
        expect = np.zeros((640, 640), bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            expect |= coco.annToMask(ann).astype(bool)
        assert np.array_equal(decode_mask(s) > 0, expect), name
        assert np.array_equal(decode_image(s), src_image(root / m["source"]))
        seen += 1
        if name.startswith("2369_jpg"):
            assert not expect.any()
        if name.startswith("176_jpg"):
            assert len(m["mask_sources"]) == 2
    assert seen == 225


@pytest.mark.parametrize("fusion", ["any", "majority", "reader:2"])
def test_lidc_subset(tmp_path, capsys, fusion):
    root = DATA / "lung_nodule_ct_slices"
    out = tmp_path / "lidc"
    codec = "jp2" if fusion == "any" else "raw"
    run_pack(root, "--out", out, "--mask-fusion", fusion, "--codec", codec)
    assert "format: lidc" in capsys.readouterr().out
    manifest, samples = read_out(out)
    assert len(samples) == 139 and manifest["mask_fusion"] == fusion
    for s in samples.values():
        m = meta(s)
        src = Path(m["source"])
        assert src.parts[-3].startswith("nodule-") and src.parts[-2] == "images"
        assert m["group"] == src.parts[-4] and m["group"].startswith("LIDC-IDRI-")
        assert np.array_equal(decode_image(s), src_image(root / src))
        readers = [src_mask(root / src.parent.parent / f"mask-{r}" / src.name) for r in range(4)]
        expect = {"any": np.logical_or.reduce(readers), "majority": np.sum(readers, axis=0) >= 3,
                  "reader:2": readers[2]}[fusion]
        assert np.array_equal(decode_mask(s) > 0, expect)
        assert len(m["mask_sources"]) == (1 if fusion.startswith("reader") else 4)
    check_groups(samples)


def test_workers_1_and_2_byte_identical(tmp_path):
    root = DATA / "lung_nodule_ct_slices"
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}" / "lidc"
        run_pack(root, "--out", out, "--workers", str(w), "--shard-size", "200KB")
        outs.append(out)
    a, b = (sorted(p.name for p in o.iterdir()) for o in outs)
    assert a == b and len([n for n in a if n.endswith(".tar")]) > 2
    for name in a:
        if name != "manifest.json":
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    ma, mb = (json.loads((o / "manifest.json").read_text()) for o in outs)
    for m in (ma, mb):
        m.pop("created")
    assert ma == mb


# ---------------------------------------------------------------- multi-channel and stacked TIFFs

def test_tiff_channels_and_stacks_follow_the_one_reader_rule(tmp_path, capsys):
    """pack reads grey, RGB(A), channels-last and planar TIFFs at their true size and refuses
    stacks and 5-channel files (and a stacked mask) by name, shape and what is supported."""
    import tifffile
    from inference_testing import TIFF_BAD, TIFF_H, TIFF_W, tiff_folder
    root = tmp_path / "tiffs"
    want = tiff_folder(root, with_masks=True)
    tifffile.imwrite(root / "mask-stack.tif", np.zeros((TIFF_H, TIFF_W), np.uint8), photometric="minisblack")
    tifffile.imwrite(root / "mask-stack_mask.tif", np.ones((2, TIFF_H, TIFF_W), np.uint8) * 255,
                     photometric="minisblack")
    out = tmp_path / "out"
    run_pack(root, "--out", out, "--format", "suffix", "--on-error", "skip", "--codec", "raw")
    manifest, samples = read_out(out)
    by_source = {meta(s)["source"]: s for s in samples.values()}
    assert set(by_source) == {f"{n}.tif" for n in want}
    for name, img in want.items():
        m = meta(by_source[f"{name}.tif"])
        assert (m["height"], m["width"]) == (TIFF_H, TIFF_W), name
        assert m["channels"] == (img.shape[2] if img.ndim == 3 else 1), name
        assert np.array_equal(decode_image(by_source[f"{name}.tif"]), img), name
    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {f"{n}.tif" for n, *_ in TIFF_BAD} | {"mask-stack_mask.tif"}
    for name, shape, _, expect in TIFF_BAD:
        assert skipped[f"{name}.tif"].startswith(expect) and str(shape) in skipped[f"{name}.tif"]
    assert skipped["mask-stack_mask.tif"].startswith("is a stack of 2 images")


def test_a_several_frame_png_image_or_mask_is_skipped_as_a_stack(tmp_path):
    """The reader's stack rule reaches pack for every format, not only TIFF."""
    from test_predict import frames_png
    root = tmp_path / "pngs"
    root.mkdir()
    plain = np.zeros((24, 30), np.uint8)
    Image.fromarray(plain).save(root / "ok.png")
    Image.fromarray(plain).save(root / "ok_mask.png")
    frames_png(root / "anim.png", 3)
    Image.fromarray(plain).save(root / "anim_mask.png")
    Image.fromarray(plain).save(root / "animmask.png")
    frames_png(root / "animmask_mask.png", 2)
    out = tmp_path / "out"
    run_pack(root, "--out", out, "--format", "suffix", "--on-error", "skip", "--split", "1,0,0")
    manifest, samples = read_out(out)
    assert {meta(s)["source"] for s in samples.values()} == {"ok.png"}
    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["anim.png"].startswith("is a stack of 3 frames (PNG"), skipped
    assert skipped["animmask_mask.png"].startswith("is a stack of 2 frames (PNG"), skipped
