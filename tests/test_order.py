"""The global sample order: a function of (seed, epoch) only; each rank takes its slice."""
import pytest
import torch

from tumorseg_dist.config import Config
from tumorseg_dist.data.loader import build_loader
from tumorseg_dist.data.order import epoch_length, global_order, rank_slices
from tumorseg_dist.dist import DistInfo


def positions_by_world(n, per_rank, world, accum=1, seed=3, epoch=1):
    """{position: sample} over every rank of a world, from the rank slices."""
    B = per_rank * world
    order = global_order(n, seed, epoch, epoch_length(n, B * accum))
    seen = {}
    for r in range(world):
        for batch in rank_slices(order, B, r, world):
            for pos, i in batch:
                assert pos not in seen
                seen[pos] = i
    return seen


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_a_position_holds_the_same_sample_whatever_the_world_size(world):
    # Optimizer batch 12 = per-rank 2 x world x accum on every layout.
    ref = positions_by_world(50, 2, 1, accum=6)
    got = positions_by_world(50, 2, world, accum=6 // world)
    assert got == ref and sorted(ref) == list(range(48))
    assert sorted(ref.values()) == sorted(set(ref.values()))   # 48 of 50: each at most once


def test_order_changes_with_epoch_and_seed_and_wraps_a_short_split():
    assert global_order(20, 0, 0, 20) != global_order(20, 0, 1, 20) != global_order(20, 1, 0, 20)
    assert sorted(global_order(5, 0, 0, 12)[:5]) == list(range(5)) and len(global_order(5, 0, 0, 12)) == 12


def test_a_global_batch_that_does_not_divide_names_the_choices(synthetic_shards):
    cfg = Config()
    cfg.train.batch_size = 16
    with pytest.raises(ValueError, match=r"--batch-size 15 or 18 on 3 ranks, or keep --batch-size 16 on 2 or 4"):
        build_loader(cfg, synthetic_shards, "train", DistInfo(0, 0, 3, torch.device("cpu")), training=True)


def test_torch_loader_ranks_read_their_slice_with_the_same_augmentation(synthetic_shards):
    """The real loader: the keys and augmented pixels at each global position are the same on
    1 rank x batch 4 and on 2 ranks x batch 2."""
    cfg = Config()
    cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = 32, 1, 0
    cfg.train.batch_size, cfg.train.channels_last, cfg.train.seed = 4, False, 7
    cfg.augment.augment, cfg.data.loader = "strong", "torch"

    def by_position(world):
        out = {}
        for r in range(world):
            loader = build_loader(cfg, synthetic_shards, "train", DistInfo(r, r, world, torch.device("cpu")),
                                  training=True)
            loader.set_epoch(2)
            for j, batch in enumerate(loader):
                for k in range(len(batch.keys)):
                    out[j * 4 + r * (4 // world) + k] = (batch.keys[k], batch.image[k])
        return out

    one, two = by_position(1), by_position(2)
    assert one.keys() == two.keys()
    for pos in one:
        assert one[pos][0] == two[pos][0]
        assert torch.equal(one[pos][1], two[pos][1])


def _ckpt(world, batch, accum, engine="ddp", samples=12):
    cfg = Config()
    cfg.train.batch_size, cfg.engine.grad_accum, cfg.engine.engine, cfg.data.loader = batch, accum, engine, "torch"
    from tumorseg_dist.config import to_dict
    return cfg, {"config": to_dict(cfg), "train_state": {"world_size": world, "global_batch": batch,
                                                         "samples_in_epoch": samples, "step": 3}}


def test_relayout_keeps_per_rank_and_optimizer_batch_or_names_the_world_sizes_that_fit(tmp_path):
    from tumorseg_dist.config import ConfigError
    from tumorseg_dist.resume_guard import relayout
    cfg, ckpt = _ckpt(2, 4, 3)
    assert "--batch-size 4 -> 6, --grad-accum 3 -> 2" in relayout(cfg, ckpt, tmp_path / "last.pt", 3)[0]
    assert (cfg.train.batch_size, cfg.engine.grad_accum) == (6, 2)
    cfg, ckpt = _ckpt(2, 4, 3)
    with pytest.raises(ConfigError, match=r"Resume on 2 or 3 ranks \(any of 1, 2, 3, 6\)"):
        relayout(cfg, ckpt, tmp_path / "last.pt", 4)
    cfg, ckpt = _ckpt(2, 4, 3, engine="deepspeed")   # ZeRO-0 (the default): not re-partitioned
    with pytest.raises(ConfigError, match="only ZeRO-1/2 state is re-partitioned"):
        relayout(cfg, ckpt, tmp_path / "last.pt", 1)


def test_old_checkpoints_position_in_batches_becomes_samples_and_counters_follow_the_layout():
    from tumorseg_dist.loop import saved_state
    _, ckpt = _ckpt(2, 4, 3)
    old = {**ckpt, "train_state": {"step": 3, "batch_in_epoch": 3}}
    assert saved_state(old, 4).samples_in_epoch == 12
    s = saved_state(ckpt, 6)   # 3 micro-batches of 4 = 2 of 6
    assert (s.step, s.samples_in_epoch, s.global_batch) == (2, 12, 6)
