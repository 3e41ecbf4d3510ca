"""Bad input: a clear error naming the file and the fix, nothing partial left, existing output
never damaged; with --on-error skip the pair is listed in manifest.json's `skipped`."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg_dist.data import shards
from tumorseg_dist.data.verify import verify_local
from tumorseg_dist.pack import main as pack

REPO = Path(__file__).resolve().parents[1]


def png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def folders_set(root: Path, n: int = 12, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        png(root / "images" / f"{i}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
        m = np.zeros((size, size), np.uint8)
        m[4:4 + i, 4:10] = 255
        png(root / "masks" / f"{i}.png", m)
    return root


def run(*args) -> int:
    return pack([*map(str, args), "--no-progress"])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) if parent.exists() else []


def samples_of(out: Path) -> dict[str, dict]:
    m = json.loads((out / "manifest.json").read_text())
    got: dict[str, dict] = {}
    for info in m["splits"].values():
        for sh in info["shards"]:
            with tarfile.open(out / sh["name"]) as tf:
                for mem in tf.getmembers():
                    k, _, ext = mem.name.partition(".")
                    got.setdefault(k, {})[ext] = tf.extractfile(mem).read()
    return got


def assert_failed_cleanly(rc: int, capsys, out: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert leftovers(out.parent) == []
    return err


@pytest.mark.parametrize("case", ["image_without_mask", "mask_without_image", "size_mismatch", "truncated",
                                  "zero_byte", "not_an_image", "mask_zero_byte"])
def test_bad_pair_fails_then_skips(tmp_path, capsys, case):
    root = folders_set(tmp_path / "in")
    bad = {
        "image_without_mask": lambda: png(root / "images" / "extra.png", np.zeros((32, 32), np.uint8)),
        "mask_without_image": lambda: png(root / "masks" / "orphan.png", np.zeros((32, 32), np.uint8)),
        "size_mismatch": lambda: png(root / "masks" / "3.png", np.zeros((16, 32), np.uint8)),
        "truncated": lambda: (root / "images" / "5.png").write_bytes((root / "images" / "5.png").read_bytes()[:200]),
        "zero_byte": lambda: (root / "images" / "5.png").write_bytes(b""),
        "not_an_image": lambda: (root / "images" / "5.png").write_text("this is a text file, not a PNG\n"),
        "mask_zero_byte": lambda: (root / "masks" / "7.png").write_bytes(b""),
    }
    name = {"image_without_mask": "images/extra.png", "mask_without_image": "masks/orphan.png",
            "size_mismatch": "masks/3.png", "truncated": "images/5.png", "zero_byte": "images/5.png",
            "not_an_image": "images/5.png", "mask_zero_byte": "masks/7.png"}[case]
    fix = {"image_without_mask": "add the mask", "mask_without_image": "add the image",
           "size_mismatch": "fix or remove this pair", "truncated": "truncated, corrupt",
           "zero_byte": "empty (0-byte)", "not_an_image": "not an image", "mask_zero_byte": "empty (0-byte)"}[case]
    bad[case]()
    out = tmp_path / "out" / "ds"
    for workers in ("1", "2"):
        rc = run(root, "--out", out, "--workers", workers)
        assert_failed_cleanly(rc, capsys, out, name, fix, "--on-error skip")
    assert run(root, "--out", out, "--on-error", "skip") == 0
    printed = capsys.readouterr().out
    assert "skipped 1" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert [s["source"] for s in m["skipped"]] == [name]
    assert m["skipped"][0]["reason"]
    n = sum(v["samples"] for v in m["splits"].values())
    expect = 12 if case in ("image_without_mask", "mask_without_image") else 11
    assert n == expect == len(samples_of(out))
    sources = {json.loads(s["json"])["source"] for s in samples_of(out).values()}
    assert name not in sources


def test_non_image_files_are_ignored_and_listed(tmp_path, capsys):
    root = folders_set(tmp_path / "in")
    (root / "readme.txt").write_text("notes")
    (root / "images" / "Thumbs.db").write_bytes(b"\0\1")
    out = tmp_path / "ds"
    assert run(root, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "ignored 2 file(s)" in printed and "readme.txt" in printed and "images/Thumbs.db" in printed
    assert len(samples_of(out)) == 12


def test_nonbinary_mask_is_binarised_and_reported(tmp_path, capsys):
    root = folders_set(tmp_path / "in")
    m = np.zeros((32, 32), np.uint8)
    m[1:5, 1:5] = 37
    m[10:12, 10:20] = 128
    png(root / "masks" / "2.png", m)
    out = tmp_path / "ds"
    assert run(root, "--out", out) == 0
    assert "binarised" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["nonbinary_masks"] == {"count": 1, "examples": ["masks/2.png"]}
    s = samples_of(out)["images_2"]
    got = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
    assert np.array_equal(got, np.where(m > 0, 255, 0))


def test_mask_modes_and_16bit_image(tmp_path):
    """1-bit, RGB, 0/1, 16-bit and palette masks all become {0,255}; a 16-bit image stays 16-bit."""
    root = tmp_path / "in"
    rng = np.random.default_rng(1)
    img16 = rng.integers(0, 65535, (24, 24), dtype=np.uint16)
    shape = np.zeros((24, 24), bool)
    shape[3:9, 5:15] = True
    png(root / "images" / "a.png", img16)
    (root / "masks").mkdir(parents=True)
    Image.fromarray(shape).save(root / "masks" / "a.png")                       # 1-bit
    assert Image.open(root / "masks" / "a.png").mode == "1"
    png(root / "images" / "b.png", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[shape, 0] = 200
    png(root / "masks" / "b.png", rgb)
    png(root / "images" / "c.png", rng.integers(0, 255, (24, 24), dtype=np.uint8))
    png(root / "masks" / "c.png", shape.astype(np.uint8))                       # 0/1
    png(root / "images" / "d.png", rng.integers(0, 255, (24, 24), dtype=np.uint8))
    png(root / "masks" / "d.png", shape.astype(np.uint16) * 1000)               # 16-bit
    png(root / "images" / "e.png", rng.integers(0, 255, (24, 24), dtype=np.uint8))
    pal = Image.new("P", (24, 24))
    pal.putdata(list((shape.astype(np.uint8) * 2).flatten()))
    pal.putpalette([0, 0, 0, 9, 9, 9, 255, 0, 0] + [0] * 759)
    pal.save(root / "masks" / "e.png")
    for codec in ("png", "raw"):
        out = tmp_path / codec
        assert run(root, "--out", out, "--codec", codec) == 0
        got = samples_of(out)
        assert len(got) == 5
        for k, s in got.items():
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["mask.png"]))), shape * np.uint8(255)), k
        a = got["images_a"]
        arr = np.load(io.BytesIO(a["image.npy"])) if codec == "raw" else np.asarray(Image.open(io.BytesIO(a["image.png"])))
        assert arr.dtype == np.uint16 and np.array_equal(arr, img16)


def test_tiff_lzw_deflate_and_bmp_jpeg_inputs(tmp_path):
    import tifffile
    root = tmp_path / "in"
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:9] = 255
    (root / "case").mkdir(parents=True)
    for name, comp in (("lzw", "lzw"), ("deflate", "zlib"), ("none", None)):
        tifffile.imwrite(root / "case" / f"{name}.tif", img, compression=comp)
        tifffile.imwrite(root / "case" / f"{name}_mask.tif", mask, compression=comp)
    Image.fromarray(img).save(root / "case" / "bmp.bmp")
    Image.fromarray(mask).save(root / "case" / "bmp_mask.bmp")
    Image.fromarray(img).save(root / "case" / "jpg.jpg", quality=90)
    Image.fromarray(mask).save(root / "case" / "jpg_mask.png")
    out = tmp_path / "ds"
    assert run(root, "--out", out, "--codec", "raw") == 0
    got = samples_of(out)
    assert len(got) == 5
    for k, s in got.items():
        arr = np.load(io.BytesIO(s["image.npy"]))
        src = json.loads(s["json"])["source"]
        expect = np.asarray(Image.open(root / src)) if src.endswith(".jpg") else img
        assert np.array_equal(arr, expect), k
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["mask.png"]))), mask), k
    # --codec jpeg keeps a JPEG input's bytes as they are (no second lossy encode)
    out2 = tmp_path / "jpeg"
    assert run(root, "--out", out2, "--codec", "jpeg") == 0
    got = samples_of(out2)
    assert got["case_jpg"]["image.jpg"] == (root / "case" / "jpg.jpg").read_bytes()
    assert got["case_lzw"]["image.jpg"][:2] == b"\xff\xd8"


def test_keys_stay_unique_after_cleaning(tmp_path):
    root = tmp_path / "in"
    for name in ("a b", "a_b", "a(b)", "x"):
        png(root / "d" / f"{name}.png", np.zeros((8, 8), np.uint8))
        png(root / "d" / f"{name}_mask.png", np.zeros((8, 8), np.uint8))
    png(root / "d" / "x.tif", np.zeros((8, 8), np.uint8))
    png(root / "d" / "x_mask.tif", np.zeros((8, 8), np.uint8))
    out = tmp_path / "ds"
    assert run(root, "--out", out) == 0
    got = samples_of(out)
    assert len(got) == 5
    assert {json.loads(s["json"])["source"]: json.loads(s["json"])["mask_sources"] for s in got.values()} == {
        "d/a b.png": ["d/a b_mask.png"], "d/a_b.png": ["d/a_b_mask.png"], "d/a(b).png": ["d/a(b)_mask.png"],
        "d/x.png": ["d/x_mask.png"], "d/x.tif": ["d/x_mask.tif"]}
    for k in got:
        assert all(c.isalnum() or c in "_-" for c in k), k


def linked_set(tmp_path: Path, layout: str, what: str) -> tuple[Path, str]:
    """A folders or suffix set with one pair read through a real symlink that leads outside
    INPUT (to `outside/`): the image, its mask, or a folder holding the pair. Returns the input
    and the path (relative to it) that the error must name."""
    outside = tmp_path / "outside"
    secret = np.full((32, 32), 7, np.uint8)
    root = folders_set(tmp_path / "in", n=4) if layout == "folders" else tmp_path / "in"
    if layout == "suffix":
        for i in range(4):
            png(root / "case" / f"{i}.png", np.full((32, 32), i, np.uint8))
            png(root / "case" / f"{i}_mask.png", np.zeros((32, 32), np.uint8))
    img_dir, msk_dir = ("images", "masks") if layout == "folders" else ("case", "case")
    name = {"folders": ("s.png", "s.png"), "suffix": ("s.png", "s_mask.png")}[layout]
    if what == "folder":
        png(outside / "sub" / name[0], secret)
        if layout == "folders":
            png(outside / "msub" / name[1], np.zeros((32, 32), np.uint8))
            (root / img_dir / "sub").symlink_to(outside / "sub", target_is_directory=True)
            (root / msk_dir / "sub").symlink_to(outside / "msub", target_is_directory=True)
        else:
            png(outside / "sub" / name[1], np.zeros((32, 32), np.uint8))
            (root / "sub").symlink_to(outside / "sub", target_is_directory=True)
        return root, f"{img_dir}/sub/{name[0]}" if layout == "folders" else f"sub/{name[0]}"
    png(outside / "img.png", secret)
    png(outside / "msk.png", np.zeros((32, 32), np.uint8))
    if what == "image":
        (root / img_dir / name[0]).symlink_to(outside / "img.png")
        png(root / msk_dir / name[1], np.zeros((32, 32), np.uint8))
        return root, f"{img_dir}/{name[0]}"
    png(root / img_dir / name[0], secret)
    (root / msk_dir / name[1]).symlink_to(outside / "msk.png")
    return root, f"{msk_dir}/{name[1]}"


@pytest.mark.parametrize("what", ["image", "mask", "folder"])
@pytest.mark.parametrize("layout", ["folders", "suffix"])
def test_link_out_of_input_is_refused_unless_followed(tmp_path, capsys, layout, what):
    root, name = linked_set(tmp_path, layout, what)
    out = tmp_path / "o" / "ds"
    rc = run(root, "--out", out, "--format", layout)
    assert_failed_cleanly(rc, capsys, out, f"{name}: leads through a link to", "outside INPUT",
                          "--follow-links", "--on-error skip")
    assert run(root, "--out", out, "--format", layout, "--on-error", "skip") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [s["source"] for s in m["skipped"]] == [name] and len(samples_of(out)) == 4
    linked = tmp_path / "followed"
    assert run(root, "--out", linked, "--format", layout, "--follow-links") == 0
    got = {json.loads(s["json"])["source"]: s for s in samples_of(linked).values()}
    assert len(got) == 5
    src = next(k for k in got if k.endswith("s.png"))
    assert np.asarray(Image.open(io.BytesIO(got[src]["image.png"]))).max() == 7   # read where the link leads


def test_links_inside_input_and_link_cycles_are_fine(tmp_path):
    """A link to a file inside INPUT is read; a folder link back into INPUT (a cycle) is not
    walked twice: the pack is the same as without it."""
    root = folders_set(tmp_path / "in", n=4)
    (root / "images" / "alias.png").symlink_to(root / "images" / "0.png")
    png(root / "masks" / "alias.png", np.zeros((32, 32), np.uint8))
    (root / "images" / "loop").symlink_to(root, target_is_directory=True)
    out = tmp_path / "ds"
    assert run(root, "--out", out) == 0
    sources = sorted(json.loads(s["json"])["source"] for s in samples_of(out).values())
    assert sources == ["images/0.png", "images/1.png", "images/2.png", "images/3.png", "images/alias.png"]


def coco_set(root: Path, images: list[dict], anns: list[dict]) -> Path:
    d = root / "train"
    d.mkdir(parents=True, exist_ok=True)
    for im in images:
        if not im.get("_missing"):
            p = d / im["file_name"]
            if ".." not in im["file_name"] and not im["file_name"].startswith("/"):
                png(p, np.full((im["height"], im["width"], 3), 100, np.uint8))
    clean = [{k: v for k, v in im.items() if not k.startswith("_")} for im in images]
    (d / "_annotations.coco.json").write_text(json.dumps(
        {"images": clean, "annotations": anns, "categories": [{"id": 1, "name": "tumor"}, {"id": 2, "name": "other"}]}))
    return root


def test_coco_polygons_rle_and_categories_match_pycocotools(tmp_path):
    from pycocotools import mask as mu
    from pycocotools.coco import COCO
    h, w = 40, 50
    ref = np.zeros((h, w), np.uint8)
    ref[5:20, 10:30] = 1
    comp = mu.encode(np.asfortranarray(ref))
    comp["counts"] = comp["counts"].decode()
    unc = np.zeros((h, w), np.uint8)
    unc[25:35, 2:8] = 1
    flat = unc.flatten(order="F")
    counts, cur, run_len = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run_len)
            cur, run_len = v, 0
        run_len += 1
    counts.append(run_len)
    images = [{"id": 7, "file_name": "a.png", "height": h, "width": w},
              {"id": 11, "file_name": "b.png", "height": h, "width": w},
              {"id": 3, "file_name": "c.png", "height": h, "width": w}]
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": [[1.5, 1.5, 12.25, 1.5, 12.25, 9.75, 1.5, 9.75], [30, 30, 45, 30, 40, 38]]},
            {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0, "segmentation": [[40, 2, 48, 2, 48, 6, 40, 6]]},
            {"id": 3, "image_id": 11, "category_id": 1, "iscrowd": 1, "segmentation": comp},
            {"id": 4, "image_id": 11, "category_id": 1, "iscrowd": 1, "segmentation": {"size": [h, w], "counts": counts}}]
    root = coco_set(tmp_path / "in", images, anns)
    coco = COCO(str(root / "train" / "_annotations.coco.json"))
    for cats, keep in ((None, {1, 2}), ("tumor", {1}), ("id:2", {2})):
        out = tmp_path / f"out-{cats}"
        args = ["--categories", cats] if cats else []
        assert run(root, "--out", out, "--format", "coco", *args) == 0
        got = {json.loads(s["json"])["source"]: s for s in samples_of(out).values()}
        assert set(got) == {"train/a.png", "train/b.png", "train/c.png"}
        for iid, name in ((7, "a.png"), (11, "b.png"), (3, "c.png")):
            expect = np.zeros((h, w), bool)
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[iid])):
                if a["category_id"] in keep:
                    expect |= coco.annToMask(a).astype(bool)
            mask = np.asarray(Image.open(io.BytesIO(got[f"train/{name}"]["mask.png"]))) > 0
            assert np.array_equal(mask, expect), (cats, name)
        man = json.loads((out / "manifest.json").read_text())
        assert man["splits"]["train"]["samples"] == 3   # given split
    assert run(root, "--out", tmp_path / "x", "--categories", "nosuch") == 2


@pytest.mark.parametrize("case", ["missing_image", "dotdot", "absolute", "bad_image_id", "unlisted_image"])
def test_coco_bad_references(tmp_path, capsys, case):
    images = [{"id": 1, "file_name": "ok.png", "height": 8, "width": 8},
              {"id": 2, "file_name": "ok2.png", "height": 8, "width": 8}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]
    secret = tmp_path / "secret.png"
    png(secret, np.zeros((8, 8, 3), np.uint8))
    if case == "missing_image":
        images.append({"id": 9, "file_name": "gone.png", "height": 8, "width": 8, "_missing": True})
        needle = "train/gone.png"
    elif case == "dotdot":
        images.append({"id": 9, "file_name": "../../secret.png", "height": 8, "width": 8})
        needle = "'..'"
    elif case == "absolute":
        images.append({"id": 9, "file_name": str(secret), "height": 8, "width": 8})
        needle = "absolute path"
    elif case == "bad_image_id":
        anns.append({"id": 5, "image_id": 404, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]})
        needle = "image_id 404"
    root = coco_set(tmp_path / "in", images, anns)
    if case == "unlisted_image":
        png(root / "train" / "stray.png", np.zeros((8, 8, 3), np.uint8))
        needle = "train/stray.png"
    out = tmp_path / "out" / "ds"
    rc = run(root, "--out", out)
    assert_failed_cleanly(rc, capsys, out, needle)
    assert run(root, "--out", out, "--on-error", "skip") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["skipped"]) == 1 and m["splits"]["train"]["samples"] == 2
    for s in samples_of(out).values():
        assert json.loads(s["json"])["source"] in ("train/ok.png", "train/ok2.png")


def test_empty_input_and_missing_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "is empty" in capsys.readouterr().err
    assert run(tmp_path / "nope", "--out", tmp_path / "o") == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    assert run(tmp_path / "junk", "--out", tmp_path / "o") == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ambiguous_layout_lists_candidates(tmp_path, capsys):
    root = folders_set(tmp_path / "in", n=3)
    png(root / "extra" / "p.png", np.zeros((8, 8), np.uint8))
    png(root / "extra" / "p_mask.png", np.zeros((8, 8), np.uint8))
    assert run(root, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "several formats" in err and "--format folders" in err and "--format suffix" in err
    assert run(root, "--out", tmp_path / "o", "--format", "folders") == 0
    assert "extra/p_mask.png" in capsys.readouterr().out   # listed as ignored
    assert len(samples_of(tmp_path / "o")) == 3


def test_output_not_writable(tmp_path, capsys):
    root = folders_set(tmp_path / "in", n=3)
    (tmp_path / "afile").write_text("x")
    rc = run(root, "--out", tmp_path / "afile" / "ds")
    assert rc == 2 and "choose a writable --out" in capsys.readouterr().err
    if os.geteuid() != 0:   # root ignores permission bits; the case above covers it
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert run(root, "--out", ro / "ds") == 2
            assert "writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


def test_disk_full_leaves_nothing_and_keeps_old_output(tmp_path, capsys, monkeypatch):
    root = folders_set(tmp_path / "in")
    out = tmp_path / "o" / "ds"
    assert run(root, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = shards.ShardWriter.write
    calls = {"n": 0}

    def failing(self, members):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, members)

    monkeypatch.setattr(shards.ShardWriter, "write", failing)
    rc = run(root, "--out", out, "--overwrite", "--codec", "raw")
    err = capsys.readouterr().err
    assert rc == 2 and "disk full" in err and "free space" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out.parent) == []


def test_existing_output_is_never_damaged(tmp_path, capsys):
    root = folders_set(tmp_path / "in")
    out = tmp_path / "ds"
    assert run(root, "--out", out) == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert run(root, "--out", out, "--workers", "2") == 0          # same inputs: nothing to do
    assert "up to date" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert run(root, "--out", out, "--codec", "raw") == 2          # other options: refuse
    assert "--overwrite" in capsys.readouterr().err
    png(root / "images" / "0.png", np.ones((32, 32), np.uint8))     # changed input: refuse too
    assert run(root, "--out", out) == 2
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert run(root, "--out", out, "--overwrite", "--codec", "raw") == 0
    assert any(n.endswith(".tar") for n in os.listdir(out)) and leftovers(tmp_path) == []
    assert "image.npy" in next(iter(samples_of(out).values()))
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "f").write_text("x")
    assert run(root, "--out", tmp_path / "stray") == 2
    assert "holds no manifest.json" in capsys.readouterr().err


def test_dry_run_writes_nothing_and_finds_problems(tmp_path, capsys):
    root = folders_set(tmp_path / "in")
    out = tmp_path / "ds"
    assert run(root, "--out", out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "dry run: 12 pairs OK of 12" in printed and not out.exists()
    (root / "images" / "4.png").write_bytes(b"\x89PNG broken")
    assert run(root, "--out", out, "--dry-run") == 2
    assert "images/4.png" in capsys.readouterr().err
    assert run(root, "--out", out, "--dry-run", "--on-error", "skip") == 0
    assert "1 problem(s)" in capsys.readouterr().out
    assert not out.exists() and leftovers(tmp_path) == []


def start_held_pack(tmp_path: Path, point: str, *args) -> tuple[subprocess.Popen, int]:
    """`pack --workers 2` in its own process group, held at `point` (TUMORSEG_PACK_HOLD) until the
    returned FIFO writer is closed: the signal lands at a known moment, whatever the timing."""
    fifo = tmp_path / f"hold-{point}"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "tumorseg_dist.pack", *map(str, args), "--workers", "2",
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TUMORSEG_PACK_HOLD": f"{point}:{fifo}"}, start_new_session=True)
    while True:   # wait for a state (the pack opened the FIFO), not for a time
        try:
            w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if proc.poll() is not None:
                raise AssertionError(f"pack ended before reaching {point}: {proc.communicate()}")
            time.sleep(0.05)
    os.write(w, b"held")
    return proc, w


@pytest.fixture(scope="module")
def old_output(tmp_path_factory) -> tuple[Path, Path]:
    """An input and a complete earlier pack of it, copied by each test that overwrites it."""
    d = tmp_path_factory.mktemp("old")
    root = folders_set(d / "in", n=16)
    assert run(root, "--out", d / "ds") == 0
    return root, d / "ds"


@pytest.mark.parametrize("point", ["planned", "written", "last", "published"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_no_partial_output(tmp_path, old_output, sig, point):
    """A stop signal to the whole process group (a terminal's Ctrl-C, Slurm's SIGTERM) at each
    phase: before the atomic rename the old output stays as it was; after it the new output is
    complete; either way one message from the parent, exit 130, no traceback, no leftovers."""
    root, old = old_output
    out = tmp_path / "o" / "ds"
    shutil.copytree(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc, w = start_held_pack(tmp_path, point, root, "--out", out, "--overwrite", "--codec", "raw")
    try:
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(w)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err and err.count("\n") == 1, err
    assert leftovers(out.parent) == []
    if point == "published":
        assert f"interrupted after {out} was complete" in err
        verify_local(out, shards.SPLITS, "full")
        assert "image.npy" in next(iter(samples_of(out).values()))
    else:
        assert "interrupted; nothing was written (an existing output is unchanged)" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


@pytest.mark.parametrize("fault", ["disk_full", "file_size_limit"])
def test_write_fault_with_workers_is_one_message(tmp_path, fault):
    """A real full filesystem (a 256 KB tmpfs, where the machine lets us mount one) and a real
    write limit (RLIMIT_FSIZE): the parent's one line, no worker traceback, nothing left."""
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(40):
        png(root / "images" / f"{i}.png", rng.integers(0, 256, (128, 128), dtype=np.uint8))
        png(root / "masks" / f"{i}.png", np.zeros((128, 128), np.uint8))
    parent = tmp_path / "mnt"
    preexec = None
    if fault == "disk_full":
        if not _tmpfs(parent, "256k"):
            pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    else:
        parent.mkdir()

        def preexec():
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # then writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
    try:
        p = subprocess.run([sys.executable, "-m", "tumorseg_dist.pack", str(root), "--out", str(parent / "ds"),
                            "--workers", "2", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                           timeout=300, preexec_fn=preexec)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
        want = "disk full while writing" if fault == "disk_full" else "file size limit reached (EFBIG) while writing"
        assert p.stderr.startswith("pack: error: ") and want in p.stderr, p.stderr
        assert sorted(os.listdir(parent)) == []
    finally:
        if fault == "disk_full":
            subprocess.run(["umount", str(parent)], check=True)


def test_groups_csv_and_none(tmp_path, capsys):
    root = folders_set(tmp_path / "in", n=20)
    csv = tmp_path / "groups.csv"
    csv.write_text("source,group\n" + "".join(f"images/{i}.png,p{i // 5}\n" for i in range(20)))
    out = tmp_path / "ds"
    assert run(root, "--out", out, "--groups", csv, "--split", "0.5,0.25,0.25") == 0
    splits: dict = {}
    for s in samples_of(out).values():
        m = json.loads(s["json"])
        assert m["group"] == f"p{int(Path(m['source']).stem) // 5}"
    man = json.loads((out / "manifest.json").read_text())
    for sp, info in man["splits"].items():
        for sh in info["shards"]:
            with tarfile.open(out / sh["name"]) as tf:
                for mem in tf.getmembers():
                    if mem.name.endswith(".json"):
                        splits.setdefault(json.loads(tf.extractfile(mem).read())["group"], set()).add(sp)
    assert len(splits) == 4 and all(len(v) == 1 for v in splits.values())
    csv.write_text("source,group\nimages/0.png,a\n")
    assert run(root, "--out", tmp_path / "ds2", "--groups", csv) == 2
    assert "have no row" in capsys.readouterr().err
