import pytest
import torch

from tumorseg_dist import checkpoint
from tumorseg_dist.config import Config
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import DDPEngine, build_engine
from tumorseg_dist.loop import TrainState, checkpoint_state, restore
from tumorseg_dist.losses import reference_dice_bce
from tumorseg_dist.models import build_model


def make_engine(seed: int) -> DDPEngine:
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model.encoder, cfg.model.encoder_weights = "resnet18", "none"
    cfg.train.amp, cfg.train.channels_last = "off", False
    cfg.data.mean, cfg.data.std = (0.5,), (0.25,)
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    return build_engine(cfg, build_model(cfg.model, 1), dist, reference_dice_bce, total_steps=10)


def test_round_trip_restores_everything(tmp_path):
    a = make_engine(0)
    x, y = torch.randn(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    a.train()
    a.train_step(x, y)
    state = TrainState(epoch=3, step=7, best=0.5, best_epoch=2, bad_epochs=1,
                       global_batch=a.cfg.train.batch_size, world_size=1)
    checkpoint.atomic_save(checkpoint_state(a.cfg, a, state), tmp_path / "last.pt")
    rng_after_save = torch.rand(1)

    b = make_engine(1)
    ck = checkpoint.load(tmp_path / "last.pt")
    st = restore(b, ck)
    assert st == state
    assert torch.rand(1).item() == rng_after_save.item()  # RNG state restored
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert b.lr() == a.lr()
    assert ck["normalization"] == {"mean": [0.5], "std": [0.25]}
    # the next step is identical from both
    a.train(), b.train()
    torch.manual_seed(5); la = a.train_step(x, y)
    torch.manual_seed(5); lb = b.train_step(x, y)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"format_version": 1, "x": torch.ones(3)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"format_version": 1, "x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_unreadable_and_foreign_checkpoints_are_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="bad.pt"):
        checkpoint.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a tumorseg_dist checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
