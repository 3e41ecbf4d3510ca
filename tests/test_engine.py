"""Engine unit tests (one process, CPU, tiny models): the Engine protocol, accumulation,
clipping, EMA, the non-finite step guard, checkpoint round trips and the DeepSpeed config
translation/merging."""
import inspect
import json
import os
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import PY, REPO
from tumorseg_dist.config import Config, ConfigError
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import DDPEngine, NonFiniteLossError, build_engine, build_engine_for_benchmark
from tumorseg_dist.engines.deepspeed import DeepSpeedEngine
from tumorseg_dist.engines.parts import PHASES, Health, nonfinite_gradients
from tumorseg_dist.engines.protocol import Engine

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, target)


def make(seed=0, loss_fn=bce, **engine):
    cfg = Config()
    cfg.train.amp, cfg.train.channels_last = "off", False
    cfg.optim.scheduler = "none"
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return build_engine(cfg, tiny_net(seed), CPU, loss_fn, total_steps=100)


def data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float()


def params(e):
    return [p.detach().clone() for p in e.model.parameters()]


def _protocol_methods() -> list[str]:
    return [n for n, v in vars(Engine).items() if callable(v) and not n.startswith("_")]


def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [DDPEngine, DeepSpeedEngine])
def test_both_engines_have_the_protocol_methods_with_its_signatures(cls):
    assert len(_protocol_methods()) >= 15
    for name in _protocol_methods():
        assert callable(getattr(cls, name, None)), f"{cls.__name__} has no {name}()"
        assert _params(getattr(cls, name)) == _params(getattr(Engine, name)), \
            f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} differs from the protocol"


def test_a_ddp_engine_is_an_engine():
    e = make()
    assert isinstance(e, Engine)
    assert isinstance(e.name, str) and e.device == CPU.device


def test_timed_step_marks_every_phase_and_steps_like_the_plain_one():
    x, y = data(4)
    plain, timed = make(), make()
    plain.train_step(x, y)
    seen = []
    timed.train_step(x, y, mark=seen.append)
    assert tuple(seen) == PHASES
    assert all(torch.equal(a, b) for a, b in zip(params(plain), params(timed)))


def test_grad_accumulation_equals_the_full_batch():
    x, y = data(4)
    full, acc = make(), make(grad_accum=2)
    full.train_step(x, y)
    before = params(acc)
    acc.train_step(x[:2], y[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, params(acc)))  # no step mid-window
    acc.train_step(x[2:], y[2:])
    for a, b in zip(params(full), params(acc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert acc.schedule.step_count == 1 and full.schedule.step_count == 1


def test_the_micro_batch_counter_is_checkpointed_and_the_old_key_still_loads():
    x, y = data(4)
    e = make(grad_accum=2)
    e.train_step(x[:2], y[:2])
    sd = e.state_dict()
    assert sd["micro_batches"] == 1 and "micro_step" not in sd
    old = {k: v for k, v in sd.items() if k != "micro_batches"}
    old["micro_step"] = 1   # written before the rename
    f = make(grad_accum=2)
    f.load_state_dict(old)
    assert f.micro_batches == 1


def test_clipping_bounds_the_update():
    x, y = data(4)
    cfg_clip = 1e-3
    e = make(clip_grad=cfg_clip)
    e.cfg.optim.optimizer = "sgd"
    e.optimizer = torch.optim.SGD(e.model.parameters(), lr=1.0)  # plain SGD: update = -grad
    e.fused = False
    before = params(e)
    e.train_step(x, y)
    delta = torch.cat([(a - b).flatten() for a, b in zip(params(e), before)])
    assert delta.norm().item() == pytest.approx(cfg_clip, rel=1e-3)


def test_ema_is_updated_evaluated_and_checkpointed():
    x, y = data(4)
    e = make(ema_decay=0.5)
    start = params(e)
    e.train_step(x, y)
    now = params(e)
    for m, s, n in zip(e.ema.module.parameters(), start, now):
        torch.testing.assert_close(m, 0.5 * s + 0.5 * n)
    e.eval()
    with torch.no_grad():
        assert torch.allclose(e.eval_logits(x), e.ema.module(x))
        assert not torch.allclose(e.eval_logits(x), e.model(x))
    sd = e.state_dict()
    f = make(seed=3, ema_decay=0.5)
    f.load_state_dict(sd)
    for a, b in zip(f.ema.module.parameters(), e.ema.module.parameters()):
        assert torch.equal(a, b)


def nan_after(n_good):
    calls = {"n": 0}

    def loss_fn(logits, target):
        calls["n"] += 1
        loss = bce(logits, target)
        return loss if calls["n"] <= n_good else loss * float("nan")
    return loss_fn


@pytest.mark.parametrize("fused,host_skip,steps", [(True, True, False), (False, True, False), (False, False, True)])
def test_health_step_skips_on_the_device_or_the_host_or_only_counts(fused, host_skip, steps):
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=fused)
    health = Health(max_bad=5, device=CPU.device)
    w.grad = torch.full((3,), float("nan"))
    health.step(opt, nonfinite_gradients(nn.ParameterList([w]), 0.0), fused, host_skip=host_skip)
    assert torch.isnan(w).all() == steps, "the bad step ran" if not steps else "host_skip=False must step"
    w.data.fill_(1.0)
    w.grad = torch.ones(3)
    if steps:   # the NaN step ran and left NaN moments behind
        opt = torch.optim.AdamW([w], lr=0.1, fused=fused)
    health.step(opt, nonfinite_gradients(nn.ParameterList([w]), 0.0), fused, host_skip=host_skip)
    assert (w < 1).all(), "a finite step was skipped"
    assert health.check() == 1


def test_health_counts_an_optimizers_own_skips():
    health = Health(max_bad=2, device=CPU.device)
    for total in (0, 1, 1, 2, 2):   # DeepSpeed's running count after each optimizer step
        health.count_own_skips(total)
    assert health.check() == 2   # two separate skips: below --max-bad-steps 2 in a row
    health.count_own_skips(3)
    health.count_own_skips(4)
    with pytest.raises(NonFiniteLossError, match="^2 consecutive"):
        health.check()


def test_nonfinite_steps_are_skipped_then_stop_the_run():
    x, y = data(4)
    e = make(loss_fn=nan_after(1), max_bad_steps=3)
    e.train_step(x, y)
    good = params(e)
    opt_state = {k: v.clone() for k, v in e.optimizer.state[next(e.model.parameters())].items()}
    e.train_step(x, y)
    e.train_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(good, params(e)))  # skipped: weights unchanged
    after = e.optimizer.state[next(e.model.parameters())]
    assert torch.equal(after["step"], opt_state["step"]) and torch.equal(after["exp_avg"], opt_state["exp_avg"])
    assert e.check_health() == 2  # two skipped, fewer than 3 in a row: no error yet
    e.train_step(x, y)
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        e.check_health()


def test_isolated_nonfinite_steps_do_not_stop_the_run():
    x, y = data(4)
    flip = {"n": 0}

    def every_other(logits, target):
        flip["n"] += 1
        return bce(logits, target) * (float("inf") if flip["n"] % 2 else 1.0)
    e = make(loss_fn=every_other, max_bad_steps=2)
    for _ in range(6):
        e.train_step(x, y)
    assert e.check_health() == 3


def test_weights_only_load_across_engines_uses_the_model_and_ema():
    a = make(ema_decay=0.9)
    a.train_step(*data(4))
    ck = {"format_version": 1, **a.state_dict()}
    ck["engine"] = "deepspeed"  # as a DeepSpeed metadata file: weights + ema, no optimizer
    del ck["optimizer"]
    b = make(seed=5, ema_decay=0.9)
    assert "deepspeed" in b.can_resume(ck)
    b.load_weights(ck)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        assert torch.equal(p, q)


def test_benchmark_hook_builds_a_working_engine():
    cfg = Config()
    cfg.model.encoder, cfg.model.encoder_weights = "resnet18", "none"
    cfg.train.amp, cfg.train.channels_last, cfg.train.device = "off", False, "cpu"
    cfg.data.in_channels = 1
    e = build_engine_for_benchmark(cfg, CPU, total_steps=10)
    x, y = torch.randn(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.8).float()
    e.train()
    loss = e.train_step(x, y)
    assert loss.shape == () and torch.isfinite(loss)
    mem = e.memory_report()
    assert mem["optimizer_state_bytes"] == 2 * mem["param_bytes"]  # AdamW: two fp32 moments


# ---------------------------------------------------------------- DeepSpeed config (no process group)

def test_benchmark_hook_does_not_import_the_train_entry_point():
    import subprocess
    import sys
    code = ("import sys, torch; from tumorseg_dist.config import Config; from tumorseg_dist.dist import DistInfo; "
            "from tumorseg_dist.engines import build_engine_for_benchmark; cfg = Config(); "
            "cfg.model.encoder, cfg.model.encoder_weights, cfg.train.amp = 'resnet18', 'none', 'off'; "
            "build_engine_for_benchmark(cfg, DistInfo(0, 0, 1, torch.device('cpu'))); "
            "assert not {'tumorseg_dist.train', 'tumorseg_dist.jobs.train'} & set(sys.modules), 'imported train'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_deepspeed_config_translation():
    from tumorseg_dist.engines.deepspeed import deepspeed_config
    cfg = Config()
    cfg.train.batch_size, cfg.engine.grad_accum, cfg.engine.zero_stage = 8, 2, 2
    cfg.engine.clip_grad, cfg.optim.lr = 1.0, 5e-4
    ds = deepspeed_config(cfg, world_size=2, amp="bf16")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds and not ds["fp16"]["enabled"]
    fp16 = deepspeed_config(cfg, world_size=2, amp="fp16")
    assert fp16["fp16"]["enabled"] and fp16["data_types"] == {"buffer_dtype": "fp16"}
    assert not fp16["torch_autocast"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 5e-4
    cfg.optim.optimizer = "adam"
    assert deepspeed_config(cfg, 2, "off")["optimizer"]["params"]["adam_w_mode"] is False
    cfg.optim.optimizer = "sgd"
    assert deepspeed_config(cfg, 2, "fp16")["optimizer"]["type"] == "SGD"
    with pytest.raises(ConfigError, match="divide evenly"):
        deepspeed_config(cfg, world_size=3, amp="off")


def test_deepspeed_accepts_the_generated_precision_sections(monkeypatch):
    """DeepSpeed's own parser reads our AMP translation as meant (fp16 runs only on a GPU, so
    this is the CPU-side check of that branch)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig
    from tumorseg_dist.engines.deepspeed import deepspeed_config
    bf16 = DeepSpeedConfig(deepspeed_config(Config(), 1, "bf16"))
    assert bf16.torch_autocast_enabled and bf16.torch_autocast_dtype == torch.bfloat16
    assert bf16.torch_autocast_lower_precision_safe_modules == [] and not bf16.bfloat16_config.enabled
    fp16 = DeepSpeedConfig(deepspeed_config(Config(), 1, "fp16"))
    assert fp16.float16_config.enabled and fp16.buffer_dtype == "fp16" and not fp16.torch_autocast_enabled
    off = DeepSpeedConfig(deepspeed_config(Config(), 1, "off"))
    assert not (off.float16_config.enabled or off.bfloat16_config.enabled or off.torch_autocast_enabled)


def test_deepspeed_config_merge_conflicts_name_both_values():
    from tumorseg_dist.engines.deepspeed import deepspeed_config, merge_config
    cfg = Config()
    cfg.train.batch_size, cfg.engine.zero_stage = 8, 1
    ours = deepspeed_config(cfg, 2, "off")
    merged, notes = merge_config(ours, {"zero_optimization": {"stage": 1, "overlap_comm": True},
                                        "train_batch_size": "auto",
                                        "optimizer": {"params": {"betas": [0.9, 0.95]}}}, "x.json")
    assert merged["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert merged["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert merged["train_batch_size"] == ours["train_batch_size"]
    assert any("overlap_comm" in n for n in notes) and any("betas" in n for n in notes)
    with pytest.raises(ConfigError) as err:
        merge_config(ours, {"zero_optimization": {"stage": 2}}, "x.json")
    assert "zero_optimization.stage = 2" in str(err.value) and "--zero-stage gives 1" in str(err.value)
    with pytest.raises(ConfigError, match=r"optimizer.params.lr = 0.1 .*--lr gives 0.001"):
        merge_config(ours, {"optimizer": {"params": {"lr": 0.1}}}, "x.json")
    with pytest.raises(ConfigError, match=r"x.json enables DeepSpeed's bf16 mode.*--amp bf16"):
        merge_config(ours, {"bf16": {"enabled": True}}, "x.json")
    with pytest.raises(ConfigError, match=r"torch_autocast.enabled = true .*--amp gives false"):
        merge_config(ours, {"torch_autocast": {"enabled": True}}, "x.json")


def test_engine_flags_are_validated():
    from tumorseg_dist.config import parse
    with pytest.raises(ConfigError, match="needs --engine deepspeed"):
        parse(["--zero-stage", "2", "--device", "cpu"])
    with pytest.raises(ConfigError, match="--ema-decay"):
        parse(["--ema-decay", "1.5", "--device", "cpu"])
    with pytest.raises(ConfigError, match="no such file"):
        parse(["--engine", "deepspeed", "--deepspeed-config", "/nonexistent.json", "--device", "cpu"])


def test_example_deepspeed_configs_merge_cleanly():
    from pathlib import Path
    from tumorseg_dist.engines.deepspeed import deepspeed_config, merge_config
    files = sorted((Path(__file__).resolve().parents[1] / "launch" / "deepspeed").glob("*.json"))
    assert files
    for f in files:
        cfg = Config()
        theirs = json.loads(f.read_text())
        cfg.engine.zero_stage = theirs.get("zero_optimization", {}).get("stage", 0)
        merge_config(deepspeed_config(cfg, 1, "bf16"), theirs, str(f))


def test_deepspeed_single_process_with_channels_last_inputs(monkeypatch):
    """channels_last is the default: DeepSpeed must accept it (parameters stay contiguous)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # The engine starts a one-process group on MASTER_PORT in this pytest process; set the
    # variables here so they are restored afterwards (later tests' subprocesses inherit the
    # environment and must not try the port this process still holds).
    from slurm_harness import free_port
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    import torch
    import torch.distributed as tdist
    from tumorseg_dist.config import Config
    from tumorseg_dist.dist import DistInfo
    from tumorseg_dist.engines import build_engine_for_benchmark
    cfg = Config()
    cfg.engine.engine = "deepspeed"
    cfg.model.encoder, cfg.model.encoder_weights = "resnet18", "none"
    cfg.data.in_channels, cfg.train.channels_last, cfg.train.batch_size = 1, True, 2
    eng = build_engine_for_benchmark(cfg, DistInfo(0, 0, 1, torch.device("cpu")), total_steps=4)
    assert isinstance(eng, Engine)
    x = torch.randn(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(2, 1, 64, 64) > 0.8).float()
    try:
        eng.train()
        assert torch.isfinite(eng.train_step(x, y))
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_deepspeed_on_cpu_builds_no_cpp_extension(tmp_path):
    """No C++ compile at run time: DeepSpeed's shared-memory all-reduce op (inference only) is
    not JIT-built, and a ZeRO step still reduces through gloo."""
    ext = tmp_path / "torch_extensions"
    code = """
import torch
from tumorseg_dist.config import Config
from tumorseg_dist.dist import DistInfo
from tumorseg_dist.engines import build_engine_for_benchmark
cfg = Config()
cfg.engine.engine, cfg.engine.zero_stage = "deepspeed", 2
cfg.model.arch, cfg.data.in_channels, cfg.train.batch_size = "unet-classic", 1, 2
cfg.train.channels_last = False
eng = build_engine_for_benchmark(cfg, DistInfo(0, 0, 1, torch.device("cpu")), total_steps=2)
eng.train()
x, y = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.8).float()
print("loss", float(eng.train_step(x, y)))
"""
    p = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                            "TORCH_EXTENSIONS_DIR": str(ext)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "loss" in p.stdout
    assert "shm_comm_op built" not in p.stdout + p.stderr
    assert not ext.exists() or not any(ext.rglob("*.so")), sorted(ext.rglob("*"))
