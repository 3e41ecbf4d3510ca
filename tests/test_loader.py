import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tumorseg_dist.config import Config
from tumorseg_dist.data.loader import build_loader
from tumorseg_dist.data.torch_loader import batches_for, rank_indices
from tumorseg_dist.data.phantoms import phantom
from tumorseg_dist.data.shards import read_manifest, shard_paths
from tumorseg_dist.dist import DistInfo


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_training_partition_is_disjoint_and_even(n, world):
    parts = [rank_indices(n, r, world, True, seed=1, epoch=0) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    flat = [i for p in parts for i in p]
    # One global order per epoch, cut to whole global batches: no sample twice in an epoch, and
    # all of them when the world divides n (the rest are left out of this epoch, not repeated).
    # (fewer samples than ranks: one global batch, topped up by repeating the order)
    assert (len(flat) == len(set(flat)) or n < world) and set(flat) <= set(range(n))
    if n % world == 0:
        assert set(flat) == set(range(n))
    assert rank_indices(n, 0, world, True, 1, 0) != rank_indices(n, 0, world, True, 1, 1) or n <= 2


@pytest.mark.parametrize("n,world", [(10, 1), (11, 2), (7, 3), (2, 4)])
def test_eval_partition_counts_each_sample_once(n, world):
    parts = [rank_indices(n, r, world, False, 0, 0) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    real = sorted(i for p in parts for i in p if i >= 0)
    assert real == list(range(n))
    batches = [batches_for(p, 3) for p in parts]
    assert len({len(b) for b in batches}) == 1


def test_phantoms_are_deterministic():
    a, am = phantom(3, 64, seed=7)
    b, bm = phantom(3, 64, seed=7)
    c, _ = phantom(4, 64, seed=7)
    assert np.array_equal(a, b) and np.array_equal(am, bm) and not np.array_equal(a, c)


def test_shards_are_plain_tar_and_match_manifest(synthetic_shards):
    m = read_manifest(synthetic_shards)
    total = 0
    for split in ("train", "val", "test"):
        for tar in shard_paths(synthetic_shards, split, m):
            with tarfile.open(tar) as tf:
                names = tf.getnames()
                keys = sorted({n.split(".")[0] for n in names})
                for k in keys:
                    assert {f"{k}.image.png", f"{k}.mask.png", f"{k}.json"} <= set(names)
                    mask = np.asarray(Image.open(io.BytesIO(tf.extractfile(f"{k}.mask.png").read())))
                    assert set(np.unique(mask)) <= {0, 255}
                total += len(keys)
    assert total == sum(s["samples"] for s in m["splits"].values()) == 48


def test_torch_loader_batches(synthetic_shards):
    cfg = Config()
    cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = 64, 3, 0
    cfg.train.batch_size, cfg.train.channels_last = 4, True
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    val = build_loader(cfg, synthetic_shards, "val", dist, training=False)
    batches = list(val)
    assert len(batches) == len(val)
    b = batches[0]
    assert b.image.shape == (4, 3, 64, 64) and b.mask.shape == (4, 1, 64, 64)
    assert b.image.is_contiguous(memory_format=torch.channels_last)
    assert set(torch.unique(b.mask).tolist()) <= {0.0, 1.0}
    keys = [k for bb in batches for k, v in zip(bb.keys, bb.valid.tolist()) if v]
    assert len(keys) == len(set(keys)) == read_manifest(synthetic_shards)["splits"]["val"]["samples"]


def test_global_batch_must_divide_world_size(synthetic_shards):
    cfg = Config()
    cfg.train.batch_size = 5
    with pytest.raises(ValueError, match="GLOBAL"):
        build_loader(cfg, synthetic_shards, "train", DistInfo(0, 0, 2, torch.device("cpu")), True)


def test_decode_16_bit_png_scales_by_65535():
    import io as _io
    from tumorseg_dist.data.shards import decode_image
    a = (np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)
    buf = _io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), "image.png")
    assert out.shape == (4, 4, 1)
    assert np.allclose(out[:, :, 0], a / 65535.0)


@pytest.mark.parametrize("cin,cout", [(1, 3), (2, 3), (2, 1), (3, 1), (4, 3), (4, 1), (3, 3)])
def test_to_channels_shapes(cin, cout):
    from tumorseg_dist.data.batch import to_channels
    t = torch.rand(cin, 5, 5)
    out = to_channels(t, cout)
    assert out.shape == (cout, 5, 5)
    if cin in (1, 2) and cout == 3:
        assert torch.equal(out[0], t[0]) and torch.equal(out[2], t[0])  # grey repeated, alpha dropped
