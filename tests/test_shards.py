"""The shard contract's building blocks: codecs, group splits, encode-in-worker equivalence."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg_dist.data.formats import Options
from tumorseg_dist.packing.pipeline import PackConfig, plan
from tumorseg_dist.data.shards import (SPLITS, Sample, ShardError, assign_splits, encode_image, encode_sample,
                                       write_dataset)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("codec", ["png", "jp2", "raw"])
@pytest.mark.parametrize("kind", ["gray8", "rgb8", "gray16"])
def test_lossless_codecs_keep_pixels_and_dtype(codec, kind):
    rng = np.random.default_rng(0)
    img = {"gray8": rng.integers(0, 256, (33, 47), dtype=np.uint8),
           "rgb8": rng.integers(0, 256, (33, 47, 3), dtype=np.uint8),
           "gray16": rng.integers(0, 65536, (33, 47), dtype=np.uint16)}[kind]
    data = encode_image(img, codec)
    got = np.load(io.BytesIO(data)) if codec == "raw" else np.asarray(Image.open(io.BytesIO(data)))
    assert got.dtype == img.dtype and np.array_equal(got, img)


def test_jpeg_is_opt_in_lossy_and_8bit_only():
    img = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    data = encode_image(img, "jpeg", 90)
    assert data[:2] == b"\xff\xd8"
    with pytest.raises(ShardError, match="8-bit"):
        encode_image(img.astype(np.uint16), "jpeg")
    with pytest.raises(ShardError, match="--codec raw"):
        encode_image(np.zeros((4, 4, 3), np.uint16), "png")


def test_encoded_samples_write_the_same_bytes_as_samples(tmp_path):
    rng = np.random.default_rng(1)
    samples = [Sample(f"k{i}", rng.integers(0, 256, (16, 16), dtype=np.uint8), rng.random((16, 16)) > 0.8,
                      f"s/{i}.png", [f"m/{i}.png"], f"g{i % 3}", "t", SPLITS[i % 3]) for i in range(9)]
    a = write_dataset(samples, tmp_path / "a", fmt="x", input_root="r", fingerprint="f")
    b = write_dataset([encode_sample(s, "png") for s in samples], tmp_path / "b", fmt="x", input_root="r",
                      fingerprint="f")
    for sp in SPLITS:
        for sa, sb in zip(a["splits"][sp]["shards"], b["splits"][sp]["shards"]):
            assert (tmp_path / "a" / sa["name"]).read_bytes() == (tmp_path / "b" / sb["name"]).read_bytes()
    assert a["mean"] == b["mean"] and a["std"] == b["std"]
    manual = np.concatenate([s.image.ravel() for s in samples if s.split == "train"]) / 255.0
    assert a["mean"][0] == pytest.approx(manual.mean(), abs=1e-6)
    assert a["std"][0] == pytest.approx(manual.std(), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_assign_splits_properties(seed):
    rng = np.random.default_rng(seed)
    groups = [f"p{g}" for g in range(40) for _ in range(int(rng.integers(1, 12)))]
    fractions = (0.7, 0.2, 0.1)
    split_of = assign_splits(groups, fractions, seed)
    assert split_of == assign_splits(list(reversed(groups)), fractions, seed)   # order-independent
    assert set(split_of) == set(groups)
    sizes = {g: groups.count(g) for g in split_of}
    biggest = max(sizes.values())
    for sp, f in zip(SPLITS, fractions):
        n = sum(sizes[g] for g, s in split_of.items() if s == sp)
        assert abs(n - f * len(groups)) <= biggest, (sp, n)
    assert any(assign_splits(groups, fractions, s) != split_of for s in range(seed + 1, seed + 4))


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")
@pytest.mark.parametrize("subset,fractions", [("lung_nodule_ct_slices", (0.6, 0.2, 0.2)),
                                              ("lgg_kaggle_3m", (0.34, 0.33, 0.33)),
                                              ("busi", (0.7, 0.2, 0.1))])
def test_real_splits_by_patient(subset, fractions, tmp_path):
    def assignment(seed, workers=1):
        p = plan(PackConfig(DATA / subset, tmp_path / "o", split=fractions, seed=seed, workers=workers,
                            options=Options()), log=lambda m: None)
        return {it.source: (it.group or it.source, it.split) for it in p.items}

    a = assignment(0)
    assert a == assignment(0, workers=2)
    groups: dict = {}
    for g, sp in a.values():
        groups.setdefault(g, set()).add(sp)
    assert all(len(v) == 1 for v in groups.values())          # no group in two splits
    sizes = {g: sum(1 for gg, _ in a.values() if gg == g) for g in groups}
    for sp, f in zip(SPLITS, fractions):
        n = sum(1 for _, s in a.values() if s == sp)
        assert abs(n - f * len(a)) <= max(sizes.values()), (sp, n)
    assert any(assignment(s) != a for s in (1, 2, 3))


def test_manifest_records_options(tmp_path):
    from tumorseg_dist.pack import main
    root = tmp_path / "in"
    (root / "x").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / "x" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "x" / f"{i}_mask.png")
    assert main([str(root), "--out", str(tmp_path / "o"), "--seed", "3", "--no-progress"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["format"] == "suffix" and m["codec"] == "png" and m["mask_fusion"] == "any"
    assert m["split_request"] == {"fractions": [0.7, 0.2, 0.1], "seed": 3}
    assert m["input_root"] == str(root.resolve()) and m["skipped"] == []
    assert m["size_histogram"] == {"8x8": 10} and len(m["mean"]) == 1


def test_few_groups_still_fill_every_requested_split():
    # The LGG subset: 3 patients with 23/20/24 slices at the default 0.7/0.2/0.1 split.
    groups = ["A"] * 23 + ["B"] * 20 + ["C"] * 24
    for seed in range(5):
        split_of = assign_splits(groups, (0.7, 0.2, 0.1), seed)
        assert sorted(split_of.values()) == ["test", "train", "val"], seed
    # a split asked to be empty stays empty
    assert set(assign_splits(groups, (0.8, 0.2, 0.0), 0).values()) == {"train", "val"}
    # fewer groups than requested splits: nothing to move
    assert len(set(assign_splits(["A", "B"], (0.7, 0.2, 0.1), 0).values())) <= 2
