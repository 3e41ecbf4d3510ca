import pytest
import torch

from tumorseg_dist.config import ModelConfig
from tumorseg_dist.models import ClassicUNet, ModelError, build_model


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "deeplabv3", "deeplabv3plus", "fpn"])
def test_smp_architectures_give_one_logit_channel(arch):
    m = build_model(ModelConfig(arch=arch, encoder="resnet18", encoder_weights="none"), in_channels=1).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_classic_unet_is_the_seeds_unet():
    m = ClassicUNet(in_channels=1).eval()
    widths = [b[0].out_channels for b in m.down]
    assert widths == [64, 128, 256, 512, 1024]
    assert all(isinstance(u, torch.nn.ConvTranspose2d) for u in m.up)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_uncached_imagenet_weights_fail_offline_with_the_cache_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache" / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(arch="unet", encoder="resnet18", encoder_weights="imagenet"), 3)
    msg = str(e.value)
    assert "empty-hf-cache" in msg and "--encoder-weights none" in msg and "--encoder-weights PATH" in msg


def test_local_encoder_weights_file(tmp_path):
    src = build_model(ModelConfig(encoder="resnet18", encoder_weights="none"), 3)
    path = tmp_path / "enc.pt"
    torch.save(src.encoder.state_dict(), path)
    grey = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(path)), 1)
    # a 3-channel first conv is summed for grey input, the rest is loaded as is
    assert torch.allclose(grey.encoder.conv1.weight, src.encoder.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.encoder.layer1[0].conv1.weight, src.encoder.layer1[0].conv1.weight)
    with pytest.raises(ModelError, match="no such file"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "nope.pt")), 1)
