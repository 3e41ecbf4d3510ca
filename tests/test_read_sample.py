"""shards.read_sample: the one place a sample's members are found and decoded, and what a damaged
payload inside a shard turns into (a ShardError naming shard, sample and the re-pack command)."""
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, TINY, run_cli
from tumorseg_dist.data.shards import (IndexedShards, ShardError, decode_image, decode_mask, read_sample,
                                       shard_paths)


def damage(shard_dir: Path, split: str, member_ext: str, how: str) -> tuple[Path, str]:
    """Rewrite one member's payload in place (same length, so tar headers and .idx stay valid)."""
    tar = shard_paths(shard_dir, split)[0]
    with tarfile.open(tar) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith("." + member_ext))
    with open(tar, "r+b") as f:
        if how == "garbage":     # the whole payload replaced: no decoder recognises it
            f.seek(m.offset_data)
            f.write(b"\xa5" * m.size)
        else:                    # "tail": all but the first 64 bytes lost, as from a partial copy
            f.seek(m.offset_data + 64)
            f.write(b"\x00" * (m.size - 64))
    return tar, m.name.split(".")[0]


@pytest.fixture
def shards_copy(synthetic_shards, tmp_path) -> Path:
    out = tmp_path / "synthetic"
    shutil.copytree(synthetic_shards, out)
    return out


def test_read_sample_finds_the_image_member_and_decodes_all_three(synthetic_shards):
    ds = IndexedShards(shard_paths(synthetic_shards, "val"))
    for i in range(len(ds)):
        s, members = read_sample(ds, i), ds.read_member(i)
        assert s.key == ds.refs[i].key and s.meta["source"]
        assert s.image.dtype == np.float32 and s.image.shape == (64, 64, 1)
        assert np.array_equal(s.image, decode_image(members["image.png"], "image.png"))
        assert np.array_equal(s.mask, decode_mask(members["mask.png"])) and set(np.unique(s.mask)) <= {0.0, 1.0}
        assert ds[i].key == s.key


@pytest.mark.parametrize("member_ext, how", [("image.png", "garbage"), ("image.png", "tail"),
                                             ("mask.png", "garbage"), ("json", "garbage")])
def test_a_damaged_payload_is_a_shard_error_naming_shard_sample_and_repack(shards_copy, member_ext, how):
    tar, key = damage(shards_copy, "train", member_ext, how)
    ds = IndexedShards(shard_paths(shards_copy, "train"))
    i = next(i for i, r in enumerate(ds.refs) if r.key == key)
    with pytest.raises(ShardError) as e:
        read_sample(ds, i)
    msg = str(e.value)
    assert str(tar) in msg and key in msg and member_ext in msg and "\n" not in msg
    assert f"python -m tumorseg_dist.pack --format synthetic --out {shards_copy}" in msg


def test_train_loader_torch_stops_on_a_damaged_shard_with_one_line(shards_copy, tmp_path):
    """Through a real DataLoader worker: the worker's ShardError reaches cli.guarded as one line."""
    tar, key = damage(shards_copy, "train", "image.png", "garbage")
    args = [a for a in TINY]
    args[args.index("--num-workers") + 1] = "1"
    p = run_cli([PY, "-m", "tumorseg_dist.train", *args, "--loader", "torch", "--verify-shards", "off",
                 "--data", str(shards_copy), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "4"], cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("train: error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert str(tar) in err[0] and key in err[0] and "python -m tumorseg_dist.pack" in err[0]


def test_evaluate_with_workers_stops_on_a_damaged_shard_with_one_line(shards_copy, tmp_path):
    """evaluate's default --workers 2: a worker's ShardError is one line, not torch's wrapped traceback."""
    from inference_testing import make_checkpoint, tiny_config
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                           tiny_config(size=32, data=shards_copy))
    tar, key = damage(shards_copy, "val", "image.png", "garbage")
    p = run_cli([PY, "-m", "tumorseg_dist.evaluate", "--checkpoint", str(ckpt), "--split", "val",
                 "--workers", "2", "--verify-shards", "off", "--out", str(tmp_path / "eval")],
                cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("evaluate: error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert str(tar) in err[0] and key in err[0] and "python -m tumorseg_dist.pack" in err[0]
