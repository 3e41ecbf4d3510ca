"""Datasets with more than one class for the tests/test_multiclass_*.py files: phantoms with two
lesion types as a COCO export (a bright disk "cyst" and a dark square "mass", sometimes
overlapping), and the real BUSI subset packed with benign=1, malignant=2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUSI = DATA / "busi"
BUSI_CLASSES = "benign=1,malignant=2,normal=0"
SPLIT_DIRS = {"train": "train", "val": "valid", "test": "test"}


def _disk(cx: float, cy: float, r: float, n: int = 16) -> list[float]:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return [float(v) for xy in zip(cx + r * np.cos(a), cy + r * np.sin(a)) for v in xy]


def _square(x: float, y: float, s: float) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def coco_phantoms(root: Path, n: dict[str, int] | None = None, size: int = 64, seed: int = 0,
                  overlap_every: int = 4) -> Path:
    """ROOT/{train,valid,test}/ with PNGs and _annotations.coco.json: categories id 1 "cyst"
    (bright disk) and id 2 "mass" (dark square); every `overlap_every`-th image has them overlap."""
    n = n or {"train": 16, "val": 6, "test": 4}
    rng = np.random.default_rng(seed)
    cats = [{"id": 0, "name": "lesion", "supercategory": "none"},
            {"id": 1, "name": "cyst", "supercategory": "lesion"},
            {"id": 2, "name": "mass", "supercategory": "lesion"}]
    ann_id = 0
    for split, count in n.items():
        d = root / SPLIT_DIRS[split]
        d.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            img = (rng.normal(100, 8, (size, size))).clip(0, 255)
            yy, xx = np.mgrid[:size, :size]
            r = size * rng.uniform(0.1, 0.16)
            cx, cy = rng.uniform(r + 2, size / 2 - 2), rng.uniform(r + 2, size - r - 2)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 200
            s = size * rng.uniform(0.15, 0.25)
            if i % overlap_every == 0:   # the square starts inside the disk
                x0, y0 = cx, cy - s / 2
            else:
                x0, y0 = rng.uniform(size / 2 + 2, size - s - 2), rng.uniform(2, size - s - 2)
            img[int(y0):int(y0 + s), int(x0):int(x0 + s)] = 30
            name = f"{split}_{i:03d}.png"
            Image.fromarray(img.astype(np.uint8)).save(d / name)
            images.append({"id": i, "file_name": name, "height": size, "width": size})
            for cat, poly in ((1, _disk(cx, cy, r)), (2, _square(x0, y0, s))):
                anns.append({"id": ann_id, "image_id": i, "category_id": cat, "segmentation": [poly],
                             "iscrowd": 0, "area": 0.0, "bbox": [0, 0, 0, 0]})
                ann_id += 1
        (d / "_annotations.coco.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
    return root


def pack(*args) -> int:
    from tumorseg_dist.pack import main
    return main([*map(str, args), "--no-progress"])


def all_masks(out: Path, split: str) -> dict[str, np.ndarray]:
    """key -> the decoded mask member of every sample of a split (uint8 as stored)."""
    import io
    import tarfile
    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for sh in m["splits"][split]["shards"]:
        with tarfile.open(out / sh["name"]) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".mask.png"):
                    got[member.name.partition(".")[0]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())))
    return got
