"""DeepSpeed ZeRO-2 saved on 2 ranks resumes on 1 and on 3 (issue 18), on CPU with torchrun and gloo.

The layouts of tests/test_elastic.py (per-rank batch 2, optimizer batch 12; 36 train samples):
a 2-rank ZeRO-2 run is SIGTERMed after its first optimizer step and resumed on 1 rank and on 3.

* The optimizer state after the conversion equals the saved one: a checker (this file run as a
  script, under torchrun for 3 ranks) builds the engine for the new world size, loads the
  checkpoint, and gathers every parameter's fp32 master, exp_avg and exp_avg_sq with DeepSpeed's
  own safe_get_full_* API; they equal the tensors consolidated from the 2 saved shards within
  1e-6 (measured: 0, a copy), and the fp32 masters equal the saved module weights.
* The resumed runs continue with the per-step losses of the uninterrupted 1-rank ZeRO-2 run
  (rank 0's per-rank batch at the same global position) within rel 1e-4, test_elastic's
  tolerance, and every train sample is seen once in the epoch.
* A malicious optimizer shard of the other rank is refused on the conversion path: one line, no
  code run, nothing written beside the tag; a missing shard is named.

About 2.5 minutes on an idle 2-core box (the 2-rank stop, the 1-rank reference, two resumes, two
checker runs); much longer beside other CPU work.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import PY, REPO, TORCHRUN, run_cli
from test_checkpoint_safety import one_line_error, plant
from test_elastic import check, command
from test_deepspeed import ENV, preempt

pytestmark = pytest.mark.slow
ZERO2 = ["--engine", "deepspeed", "--zero-stage", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tumorseg_dist.data.synthetic import pack_synthetic
    out = tmp_path_factory.mktemp("ds-elastic") / "synthetic"
    pack_synthetic(out, n=52, size=64, seed=0)   # 36 train samples: 3 optimizer steps of 12
    return out


def ds_command(shards, out, world):
    return [*command(shards, out, world), *ZERO2]


def steps(run):
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    from test_elastic import chunk_losses
    out = tmp_path_factory.mktemp("ds-ref") / "run"
    run_cli(ds_command(shards, out, 1), cwd=out.parent, env={**ENV, "EXIT_CODE_DIR": str(out.parent / "c")})
    return chunk_losses(steps(out))


@pytest.fixture(scope="module")
def stopped(shards, tmp_path_factory):
    """The 2-rank ZeRO-2 run, SIGTERMed after its first optimizer step (sample 12 of 36)."""
    tmp = tmp_path_factory.mktemp("ds-stop")
    out, codes = tmp / "from2", tmp / "codes"
    _, stdout = preempt(ds_command(shards, out, 2), tmp, {**ENV, "EXIT_CODE_DIR": str(codes)}, after_step=1)
    assert [(codes / f"rank{r}").read_text().strip() for r in range(2)] == ["75", "75"], stdout[-3000:]
    assert "sample 12 of 36" in stdout, stdout[-3000:]
    tag = _tag(out)
    assert sorted(p.name for p in (out / "checkpoints" / "deepspeed" / tag).glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    return out


def _tag(run: Path) -> str:
    from tumorseg_dist import checkpoint
    return checkpoint.load(run / "checkpoints" / "last.pt")["deepspeed"]["tag"]


@pytest.mark.parametrize("world", [1, 3])
def test_converted_optimizer_state_equals_the_saved_one(stopped, tmp_path, world):
    report = tmp_path / "report.json"
    script = [str(Path(__file__).resolve()), str(stopped), str(report)]
    launch = [PY, *script] if world == 1 else \
        [TORCHRUN, "--nproc-per-node", str(world), "--standalone", *script]
    run_cli(launch, cwd=tmp_path, env=ENV)
    r = json.loads(report.read_text())
    assert r["world"] == world and r["saved_world"] == 2
    assert r["params"] > 50 and r["max_abs_exp_avg"] > 1e-4   # real moments, not zeros
    for key in ("fp32", "exp_avg", "exp_avg_sq", "fp32_vs_saved_module"):
        assert r[key] <= 1e-6, r
    assert r["step"] == [1.0] * world and r["global_steps"] == 1, r


@pytest.mark.parametrize("world", [1, 3])
def test_two_ranks_stopped_mid_epoch_resume_on_another_world_size(stopped, tmp_path, shards, reference, world):
    out = tmp_path / f"to{world}"
    shutil.copytree(stopped, out)
    p = run_cli(ds_command(shards, out, world), cwd=tmp_path, env={**ENV, "EXIT_CODE_DIR": str(tmp_path / "c")})
    assert f"resumed on {world} ranks (written on 2)" in p.stdout and "re-partitioned from 2 to" in p.stdout, \
        p.stdout[-3000:]
    check(out, shards, reference)
    saved = out / "checkpoints" / "deepspeed" / _tag(out)
    assert len(list(saved.glob("zero_pp_rank_*"))) == world   # later saves are in the new layout


def test_a_malicious_shard_is_refused_on_the_conversion_path(stopped, tmp_path, shards):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    tag_dir = out / "checkpoints" / "deepspeed" / _tag(out)
    target, marker = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt", tmp_path / "MARKER"
    plant(target, marker)
    before = sorted(p.name for p in tag_dir.iterdir())
    p = run_cli(ds_command(shards, out, 1), cwd=tmp_path, env={**ENV, "EXIT_CODE_DIR": str(tmp_path / "c")},
                check=False)
    assert not marker.exists(), "the shard ran code"
    assert "refusing to load" in one_line_error(p, "train", target)
    assert sorted(p.name for p in tag_dir.iterdir()) == before   # nothing converted or written beside it


def test_a_missing_shard_is_named(stopped, tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tumorseg_dist.checkpoint import CheckpointError
    from tumorseg_dist.engines import deepspeed_io
    tag_dir = tmp_path / "tag"
    shutil.copytree(stopped / "checkpoints" / "deepspeed" / _tag(stopped), tag_dir)
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"written on 2 ranks, but holds the ZeRO optimizer shards of ranks \[0\];"):
        deepspeed_io.consolidate(tag_dir, 2)


def test_relayout_lets_zero_1_and_2_change_world_size_and_says_so(tmp_path):
    from tumorseg_dist.config import Config, ConfigError, to_dict
    from tumorseg_dist.resume_guard import relayout
    for stage in (0, 1, 2):
        cfg = Config()
        cfg.train.batch_size, cfg.engine.grad_accum = 4, 3
        cfg.engine.engine, cfg.engine.zero_stage, cfg.data.loader = "deepspeed", stage, "torch"
        ckpt = {"config": to_dict(cfg), "deepspeed": {"zero_stage": stage, "world_size": 2},
                "train_state": {"world_size": 2, "global_batch": 4, "samples_in_epoch": 12, "step": 3}}
        if stage == 0:
            with pytest.raises(ConfigError, match="ZeRO stage 0 on 2 ranks; only ZeRO-1/2"):
                relayout(cfg, ckpt, tmp_path / "last.pt", 3)
            continue
        line, = relayout(cfg, ckpt, tmp_path / "last.pt", 3)
        assert line.endswith("--grad-accum 3 -> 2; DeepSpeed's ZeRO optimizer state re-partitioned from 2 to 3 ranks")
        assert (cfg.train.batch_size, cfg.engine.grad_accum) == (6, 2)


def _check_main(run: Path, report: Path) -> None:
    """Under torchrun (or alone): load `run`'s last.pt into an engine for this world size and
    compare every parameter's gathered optimizer state with the saved shards' (rank 0 reports)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from tumorseg_dist import checkpoint, dist as distmod, resume_guard
    from tumorseg_dist.engines import build_engine, deepspeed_io
    from tumorseg_dist.losses import build_loss_fn
    from tumorseg_dist.models import build_model
    path = run / "checkpoints" / "last.pt"
    ckpt = checkpoint.load(path)
    cfg = resume_guard.saved_config(ckpt, path)
    d = distmod.init("cpu")
    resume_guard.relayout(cfg, ckpt, path, d.world_size)
    engine = build_engine(cfg, build_model(cfg.model, cfg.data.in_channels), d, build_loss_fn(cfg.loss), 100)
    assert engine.can_resume(ckpt) is None
    engine.load_state_dict(ckpt, path.parent)
    info = ckpt["deepspeed"]
    saved = deepspeed_io.consolidate(path.parent / "deepspeed" / info["tag"], info["world_size"])
    # DeepSpeed links a parameter to its optimizer state fragments at the first step; a resumed
    # run takes that step, here nothing does.
    engine.ds.optimizer._lazy_init_hp_params_optimizer_state()
    worst = {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "fp32_vs_saved_module": 0.0, "max_abs_exp_avg": 0.0}
    for name, p in engine.model.named_parameters():
        got = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}   # collectives
        want = {"fp32": saved.fp32[name], **saved.state[name]}
        for k, t in got.items():
            worst[k] = max(worst[k], (t.cpu() - want[k]).abs().max().item())
        worst["fp32_vs_saved_module"] = max(worst["fp32_vs_saved_module"],
                                            (saved.fp32[name] - ckpt["model"][name]).abs().max().item())
        worst["max_abs_exp_avg"] = max(worst["max_abs_exp_avg"], saved.state[name]["exp_avg"].abs().max().item())
    opt = engine.ds.optimizer.optimizer
    step = float(opt.state[opt.param_groups[0]["params"][0]]["step"])
    steps_all = [None] * d.world_size
    if d.distributed:
        torch.distributed.all_gather_object(steps_all, step)
    else:
        steps_all = [step]
    if d.is_main:
        report.write_text(json.dumps({**worst, "world": d.world_size, "saved_world": saved.world_size,
                                      "params": len(saved.fp32), "step": steps_all,
                                      "global_steps": engine.ds.global_steps}))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _check_main(Path(sys.argv[1]), Path(sys.argv[2]))
