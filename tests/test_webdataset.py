"""Our shards are standard WebDataset: `webdataset` (streaming) and `wids` (indexed) read every
shard pack writes, member for member, with the same bytes as plain `tarfile`, on the real
subsets in ../shared/data and on the synthetic set (several shards per split)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tumorseg_dist.data.shards import IndexedShards, shard_paths
from tumorseg_dist.pack import main as pack

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (name, pack arguments): every codec and importer, a few shards per split where it is small.
REAL = [
    ("folders", ["images_masks_folders", "--shard-size", "300KB"]),
    ("lgg-raw", ["lgg_kaggle_3m", "--codec", "raw"]),
    ("busi-jpeg", ["busi", "--codec", "jpeg", "--shard-size", "500KB"]),
    ("lidc-jp2", ["lung_nodule_ct_slices", "--codec", "jp2", "--mask-fusion", "majority"]),
]


def tar_samples(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The reference: (key, {ext: bytes}) in tar order, with nothing but `tarfile`."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def assert_libraries_read(shard_dir: Path, tmp_path: Path) -> int:
    import webdataset as wds
    import wids
    from wids.wids import IndexedTarSamples

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    tars = [t for sp in ("train", "val", "test") for t in shard_paths(shard_dir, sp, manifest)]
    ours = IndexedShards(tars)
    flat = [s for t in tars for s in tar_samples(t)]
    assert len(flat) == len(ours) == sum(manifest["splits"][sp]["samples"] for sp in manifest["splits"])
    for t in tars:
        want = tar_samples(t)
        streamed = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                    for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)]
        assert streamed == want, t
        indexed = IndexedTarSamples(path=str(t))
        got = [indexed[i] for i in range(len(indexed))]
        assert [(s["__key__"], {k[1:]: v.getvalue() for k, v in s.items() if k != "__key__"})
                for s in got] == want, t
    # The whole dataset as one wids ShardListDataset, from the manifest's counts (its "index").
    shardlist = [{"url": str(t), "nsamples": sh["samples"]} for sp in ("train", "val", "test")
                 for t, sh in zip(shard_paths(shard_dir, sp, manifest), manifest["splits"][sp]["shards"])]
    ds = wids.ShardListDataset(shardlist, cache_dir=str(tmp_path / "wids-cache"), transformations=[])
    assert len(ds) == len(flat)
    for i, (key, members) in enumerate(flat):
        s = ds[i]
        assert s["__key__"] == key
        assert {k[1:]: v.getvalue() for k, v in s.items() if not k.startswith("__")} == members
        assert ours.read_member(i) == members and ours.refs[i].key == key
    return len(flat)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")
@pytest.mark.parametrize("name,args", REAL, ids=[n for n, _ in REAL])
def test_webdataset_and_wids_read_real_shards(tmp_path, name, args):
    out = tmp_path / name
    assert pack([str(DATA / args[0]), *args[1:], "--out", str(out), "--no-progress"]) == 0
    assert any(sh["samples"] for sh in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"])
    assert assert_libraries_read(out, tmp_path) > 0


def test_webdataset_and_wids_read_synthetic_shards(tmp_path):
    out = tmp_path / "synthetic"
    assert pack(["--format", "synthetic", "--out", str(out), "--samples", "60", "--size", "96",
                 "--shard-size", "40KB", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 1   # the multi-shard case is covered
    assert assert_libraries_read(out, tmp_path) == 60

