"""Both loaders carry K-class label masks through every geometric augmentation by nearest
neighbour only: no label value appears that the shards do not hold, and binary masks stay {0, 1}."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multiclass_testing import BUSI, BUSI_CLASSES, coco_phantoms, pack
from tumorseg_dist.data.augment import PRESETS, AugmentParams
from tumorseg_dist.data.batch import LoaderSpec
from tumorseg_dist.data.torch_loader import TorchLoader
from tumorseg_dist.dist import DistInfo

DIST = DistInfo(0, 0, 1, torch.device("cpu"))
# every geometric kind at once, always on: flips, rotation, zoom, shift
GEOMETRY = AugmentParams(**{**PRESETS["strong"].__dict__, "flip_p": 0.5, "affine_p": 1.0})


@pytest.fixture(scope="module")
def phantoms3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mc")
    coco_phantoms(root / "coco", {"train": 12, "val": 4, "test": 2})
    assert pack(root / "coco", "--out", root / "k3", "--classes", "cyst=1,mass=2") == 0
    assert pack(root / "coco", "--out", root / "bin") == 0
    return root


def spec(shard_dir: Path, size: int, aug: AugmentParams, training: bool = True, batch: int = 4) -> LoaderSpec:
    return LoaderSpec(Path(shard_dir), "train", training, size, 1, batch, (0.5,), (0.25,), aug, 0, 0,
                      torch.contiguous_format)


def dali_loader(s: LoaderSpec):
    pytest.importorskip("nvidia.dali")
    from tumorseg_dist.data.dali import DaliLoader
    return DaliLoader(s, DIST)


LOADERS = {"torch": lambda s: TorchLoader(s, DIST), "dali": dali_loader}


def values_seen(loader, epochs: int = 2) -> set[float]:
    seen: set[float] = set()
    for e in range(epochs):
        loader.set_epoch(e)
        for b in loader:
            assert b.mask.dtype == torch.float32 and b.mask.shape[1] == 1
            seen |= set(b.mask.unique().tolist())
    return seen


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("size, aug", [(96, GEOMETRY), (32, GEOMETRY), (64, PRESETS["light"]),
                                       (96, PRESETS["none"])])
def test_label_values_survive_geometry(phantoms3, kind, size, aug):
    seen = values_seen(LOADERS[kind](spec(phantoms3 / "k3", size, aug, training=aug is not PRESETS["none"])))
    # both lesion types still there, and nothing in between them (a linear resample of 1 and 2
    # would make 1.5, of 0 and 2 would make 1)
    assert seen == {0.0, 1.0, 2.0}


@pytest.mark.parametrize("kind", LOADERS)
def test_binary_masks_unchanged(phantoms3, kind):
    assert values_seen(LOADERS[kind](spec(phantoms3 / "bin", 96, GEOMETRY)), 1) == {0.0, 1.0}


def test_real_busi_through_torch_loader(tmp_path):
    """Real BUSI sizes (273-841 px wide): the antialiased shrink of the image does not touch the
    mask, which is shrunk by nearest neighbour."""
    if not BUSI.is_dir():
        pytest.skip("no BUSI subset")
    assert pack(BUSI, "--out", tmp_path / "b3", "--classes", BUSI_CLASSES, "--split", "0.5,0.3,0.2") == 0
    seen = values_seen(TorchLoader(spec(tmp_path / "b3", 64, GEOMETRY, batch=8), DIST), 1)
    assert seen == {0.0, 1.0, 2.0}
