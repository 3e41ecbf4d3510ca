"""CT-like phantom volumes in the nnU-Net / Medical Segmentation Decathlon raw layout, for the
docs, the pack benchmark and trying the volume path without patient data:

    python -m tumorseg_dist.data.volume_phantoms phantoms/liver --cases 10

writes `dataset.json`, `imagesTr/case_NNN_0000.nii.gz` (int16 HU: air -1000, body, a liver-like
organ, a brighter tumour, noise; CT's -1024 floor) and `labelsTr/case_NNN.nii.gz` (1 organ, 2
tumour, as MSD Task03 Liver labels them), with an anisotropic spacing and a non-trivial origin.
Seeded: the same command writes the same voxels.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SPACING = (0.8, 0.9, 2.5)      # mm: in-plane x, y and the slice gap, as a thin-ish abdominal CT
SHAPE = (64, 56, 16)
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def phantom(shape=SHAPE, seed=0, tumour_at=(0.55, 0.5, 0.5)) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU image, uint8 label: 1 organ, 2 tumour inside it)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"), -1)
    body = (((grid - 0.5) / [0.45, 0.42, 2.0]) ** 2).sum(-1) < 1
    organ = (((grid - [0.45, 0.5, 0.5]) / [0.25, 0.22, 0.38]) ** 2).sum(-1) < 1
    tumour = (((grid - tumour_at) / [0.1, 0.12, 0.2]) ** 2).sum(-1) < 1
    img = np.full(shape, -1000, np.int16)
    img[body] = 20
    img[organ] = 60
    img[tumour] = 110
    img = np.maximum(img + rng.integers(-30, 31, shape), -1024).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[organ] = 1
    lab[tumour & organ] = 2
    return img, lab


def write_dataset(root: Path, cases: int = 10, shape=SHAPE, spacing=SPACING, seed: int = 0) -> Path:
    """An nnU-Net v2 raw dataset of `cases` phantoms under `root`; each case's tumour sits
    elsewhere (and some cases lack one in many slices), so lesion and lesion-free slices mix."""
    import nibabel as nib
    root = Path(root)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-20.0, -15.0, 30.0)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        at = (0.45 + 0.2 * rng.random(), 0.4 + 0.2 * rng.random(), 0.25 + 0.5 * rng.random())
        img, lab = phantom(shape, seed=seed * 1000 + i, tumour_at=at)
        for data, path in ((img, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                           (lab, root / "labelsTr" / f"case_{i:03d}.nii.gz")):
            nii = nib.Nifti1Image(data, affine)
            nii.header.set_xyzt_units("mm")
            nib.save(nii, str(path))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "file_ending": ".nii.gz",
        "name": "phantom liver (tumorseg_dist.data.volume_phantoms)"}, indent=2) + "\n")
    return root


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m tumorseg_dist.data.volume_phantoms",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="dataset folder to write (nnU-Net raw layout)")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=SHAPE,
                   help="X,Y,Z voxels (default %(default)s)")
    a = p.parse_args(argv)
    if a.cases < 1 or len(a.shape) != 3 or min(a.shape) < 1:
        p.error("--cases must be >= 1 and --shape three positive sizes X,Y,Z")
    write_dataset(a.out, a.cases, a.shape, SPACING, a.seed)
    print(f"wrote {a.cases} phantom cases ({'x'.join(map(str, a.shape))} voxels, {SPACING} mm) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
