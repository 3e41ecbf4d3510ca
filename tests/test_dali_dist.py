"""Two real ranks (torchrun, gloo, DALI CPU pipeline): disjoint training samples, equal batch
counts with an uneven number of samples per shard, every validation sample counted once."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TORCHRUN, run_cli  # noqa: E402
from test_dali import make_shards  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as td
    from tumorseg_dist import dist
    from tumorseg_dist.config import Config
    from tumorseg_dist.data.loader import build_loader

    shards, out = sys.argv[1], sys.argv[2]
    info = dist.init("cpu")
    cfg = Config()
    cfg.data.loader, cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = "dali", 32, 1, 1
    cfg.train.batch_size, cfg.augment.augment = 4, "standard"     # global batch: 2 per rank
    record = {"rank": info.rank, "train": {}, "val": []}
    train = build_loader(cfg, shards, "train", info, training=True)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        batches = list(train)
        record["train"][epoch] = {"len": len(train), "batches": len(batches),
                                  "keys": [k for b in batches for k in b.keys]}
    val = build_loader(cfg, shards, "val", info, training=False)
    for b in val:
        record["val"].append([k for k, v in zip(b.keys, b.valid.tolist()) if v])
    record["val_len"] = len(val)
    gathered = [None] * info.world_size
    td.all_gather_object(gathered, record)
    if info.is_main:
        open(out, "w").write(json.dumps(gathered))
    dist.cleanup()
""")


@pytest.mark.slow
def test_two_ranks_torchrun(tmp_path):
    # train 11 -> shards of 5 and 6; val 9 -> 4 and 5: uneven on purpose, spread over several tars.
    shards = make_shards(tmp_path / "d", {"train": 11, "val": 9, "test": 1}, size=(40, 40), shard_size=5000)
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    run_cli([TORCHRUN, "--nproc_per_node=2", "--standalone", str(script), str(shards), str(out)],
            cwd=tmp_path, timeout=240)
    r0, r1 = json.loads(out.read_text())
    from tumorseg_dist.data.order import training_plan
    for epoch in ("0", "1"):
        a, b = r0["train"][epoch], r1["train"][epoch]
        assert a["len"] == b["len"] == a["batches"] == b["batches"] == 8 // 4   # whole global batches
        assert not set(a["keys"]) & set(b["keys"]), epoch           # disjoint per epoch
        # Each rank holds its slice of the epoch's global order (by global position).
        for r, got in enumerate((a, b)):
            plan = training_plan(11, 0, int(epoch), 4, 1, r, 2)
            assert got["keys"] == [f"s{i:04d}" for batch in plan for _, i in batch], (epoch, r)
    assert r0["val_len"] == r1["val_len"] == len(r0["val"]) == len(r1["val"]) == 3   # ceil(5/2)
    counted = [k for r in (r0, r1) for batch in r["val"] for k in batch]
    assert sorted(counted) == [f"s{i:04d}" for i in range(11, 20)]    # each val sample once
