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


def prefetched_cache(root, encoder_state: dict):
    """A Hugging Face cache laid out as smp's download leaves it, holding `encoder_state` as
    the resnet18 ImageNet file (smp's repo and pinned revision)."""
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders
    s = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snap = root / f"models--{s['repo_id'].replace('/', '--')}" / "snapshots" / s["revision"]
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder_state.items()}, str(snap / "model.safetensors"))
    return root


def test_imagenet_weights_are_read_from_a_prefetched_cache(tmp_path, monkeypatch):
    src = build_model(ModelConfig(encoder="resnet18", encoder_weights="none"), 3)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(prefetched_cache(tmp_path / "hub", src.encoder.state_dict())))
    grey = build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"), 1)
    assert torch.allclose(grey.encoder.conv1.weight, src.encoder.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.encoder.layer4[1].conv2.weight, src.encoder.layer4[1].conv2.weight)


# Records every name lookup and connection to anything but loopback, in the process under test.
NET_PROBE = '''
import os, socket
_log = os.environ["NET_PROBE_LOG"]
def _note(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *a, **k):
    if host not in (None, "localhost", "127.0.0.1", "::1", "") and not str(host).startswith("127."):
        _note(f"getaddrinfo {host}")
    return _getaddrinfo(host, *a, **k)
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith(("127.", "::1", "localhost")):
        _note(f"connect {address}")
    return _connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
'''


def test_train_with_uncached_imagenet_weights_fails_at_once_offline_and_writes_nothing(tmp_path, synthetic_shards):
    """The CLI as a user on an offline node runs it: an empty cache, no network call at all
    (every lookup and connection is recorded), one line naming the cache and the alternatives,
    and no run directory."""
    from conftest import PY, TINY, run_cli
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(NET_PROBE)
    net_log, cache, run = tmp_path / "net.log", tmp_path / "empty-cache", tmp_path / "run"
    args = [a for a in TINY]
    args[args.index("--encoder-weights") + 1] = "imagenet"
    # The probe, not a clock, shows that nothing waits on a network; the timeout is a hang guard.
    p = run_cli([PY, "-m", "tumorseg_dist.train", *args, "--data", str(synthetic_shards), "--out", str(run)],
                cwd=tmp_path, check=False, timeout=120,
                env={"PYTHONPATH": str(probe), "NET_PROBE_LOG": str(net_log), "HF_HOME": str(cache),
                     "HF_HUB_CACHE": str(cache / "hub"), "TORCH_HOME": str(cache / "torch")})
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train: error: ImageNet weights"), err
    assert str(cache / "hub") in err and "--encoder-weights none" in err and "--encoder-weights PATH" in err
    assert not run.exists()
    assert not net_log.exists(), net_log.read_text()
