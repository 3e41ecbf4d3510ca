"""The one precision decision (tumorseg_dist/precision.py) and the parts that only read it."""
import pytest
import torch

from tumorseg_dist.config import Config, TrainConfig
from tumorseg_dist.data.loader import build_loader
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine
from tumorseg_dist.precision import resolve_precision

CPU = torch.device("cpu")


def test_auto_is_off_on_cpu_and_bf16_computes_and_delivers_bf16():
    off = resolve_precision(TrainConfig(amp="auto", channels_last=False), CPU)
    assert (off.amp, off.compute_dtype, off.grad_scaler, off.image_dtype) == ("off", None, False, torch.float32)
    assert off.memory_format == torch.contiguous_format and not off.compile
    bf16 = resolve_precision(TrainConfig(amp="bf16", channels_last=True, compile=True), CPU)
    assert (bf16.compute_dtype, bf16.image_dtype, bf16.grad_scaler) == (torch.bfloat16, torch.bfloat16, False)
    assert bf16.memory_format == torch.channels_last and bf16.compile


def test_fp16_on_cpu_is_an_error_naming_the_alternatives():
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device.*--amp bf16"):
        resolve_precision(TrainConfig(amp="fp16"), CPU)


def test_the_record_is_frozen():
    p = resolve_precision(TrainConfig(amp="off"), CPU)
    with pytest.raises(AttributeError):
        p.amp = "bf16"


def test_loader_and_engine_follow_the_precision_they_are_given(synthetic_shards):
    """The config says fp32 NCHW; the Precision handed down says bf16 channels_last: both the
    loader and the engine must do what the record says, not re-derive it from the config."""
    cfg = Config()
    cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = 64, 1, 0
    cfg.model.encoder, cfg.model.encoder_weights = "resnet18", "none"
    cfg.train.batch_size, cfg.train.amp, cfg.train.channels_last = 4, "off", False
    prec = resolve_precision(TrainConfig(amp="bf16", channels_last=True), CPU)
    dist = DistInfo(0, 0, 1, CPU)
    batch = next(iter(build_loader(cfg, synthetic_shards, "val", dist, training=False, precision=prec)))
    assert batch.image.dtype == torch.bfloat16 and batch.image.is_contiguous(memory_format=torch.channels_last)
    from tumorseg_dist.models import build_model
    engine = build_engine(cfg, build_model(cfg.model, 1), dist, lambda x, y: x.mean(), 4, prec)
    assert engine.precision is prec
    conv = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with engine.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
