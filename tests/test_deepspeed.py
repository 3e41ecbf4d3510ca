"""DDP, DeepSpeed ZeRO-1 and ZeRO-2 on 2 CPU ranks under torchrun (DS_ACCELERATOR=cpu, gloo).

One uninterrupted 2-epoch DDP run is the reference. Each engine then runs the same command, is
preempted mid-epoch (SIGTERM to torchrun and its workers, as Slurm does), exits 75 on every
rank after a collective save, and `--resume auto` finishes it: the step count is right,
metrics.jsonl is continuous, and every loss after the resume equals the reference run's loss at
that step (same seed and data order; fp32, so the engines agree to rounding)."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import REPO, TINY, TORCHRUN, run_cli

pytestmark = pytest.mark.slow
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
ENGINES = {"ddp": [], "zero1": ["--engine", "deepspeed", "--zero-stage", "1"],
           "zero2": ["--engine", "deepspeed", "--zero-stage", "2"]}
STEP = re.compile(r"^\s+step (\d+) loss ([0-9.]+) lr")


def command(shards, out, engine_flags):
    # --standalone: torchrun picks a free port itself (fixed ports collide under `make test`'s workers)
    return [TORCHRUN, "--nproc-per-node", "2", "--standalone",
            str(REPO / "launch" / "record_exit.py"), "tumorseg_dist.train",
            *TINY, "--data", str(shards), "--out", str(out), "--epochs", "2", "--batch-size", "8",
            "--log-every", "1", "--seed", "3", *engine_flags]


def losses(stdout: str) -> dict[int, float]:
    out = {}
    for line in stdout.splitlines():
        m = STEP.match(line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_shards):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = run_cli(command(synthetic_shards, out, []), cwd=out.parent,
                env={**ENV, "EXIT_CODE_DIR": str(out.parent / "codes")})
    return losses(p.stdout), records(out)


def preempt(cmd, cwd, env, after_step: int, timeout=400):
    """Start cmd in its own process group; SIGTERM the whole group once rank 0 logged
    `after_step`. Returns (returncode, stdout)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, sent, t0 = [], False, time.time()
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP.match(line)
            if not sent and m and int(m.group(1)) >= after_step:
                os.killpg(proc.pid, signal.SIGTERM)
                sent = True
            if time.time() - t0 > timeout:
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sent, "".join(lines)[-3000:]
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_preempt_and_resume_matches_the_uninterrupted_run(engine, tmp_path, synthetic_shards, reference):
    ref_losses, ref_records = reference
    steps_per_epoch = ref_records[0]["step"]
    assert ref_records[-1]["step"] == 2 * steps_per_epoch
    # the reference learns: later losses below the first ones
    first, last = [ref_losses[s] for s in sorted(ref_losses)[:2]], [ref_losses[s] for s in sorted(ref_losses)[-2:]]
    assert sum(last) < sum(first)

    out = tmp_path / "run"
    codes = tmp_path / "codes"
    stop_after = steps_per_epoch + 1  # mid-way through epoch 2
    rc, stdout = preempt(command(synthetic_shards, out, ENGINES[engine]), tmp_path,
                         {**ENV, "EXIT_CODE_DIR": str(codes)}, stop_after)
    assert "stop requested: saved" in stdout, stdout[-3000:]
    assert [(codes / f"rank{r}").read_text().strip() for r in (0, 1)] == ["75", "75"], stdout[-3000:]
    saved = int(re.search(r"saved \S+ at step (\d+)", stdout).group(1))
    assert steps_per_epoch < saved < 2 * steps_per_epoch, stdout[-2000:]
    if engine != "ddp":
        assert (out / "deepspeed_config.json").is_file()
        tags = list((out / "checkpoints" / "deepspeed").glob("last-step*"))
        assert len(tags) == 1 and any(tags[0].glob("zero_pp_rank_1_*optim_states.pt")), tags
    # losses before the stop equal the reference: the engines compute the same thing
    before = losses(stdout)
    for s in range(1, saved + 1):
        assert before[s] == pytest.approx(ref_losses[s], rel=2e-3, abs=2e-4), (s, before[s], ref_losses[s])

    p = run_cli(command(synthetic_shards, out, ENGINES[engine]), cwd=tmp_path,
                env={**ENV, "EXIT_CODE_DIR": str(codes)})
    assert f"resumed from {out / 'checkpoints' / 'last.pt'}: epoch 1, step {saved}" in p.stdout, p.stdout[-2000:]
    after = losses(p.stdout)
    assert min(after) == saved + 1  # continues from the saved step, not from the epoch start
    for s in after:
        assert after[s] == pytest.approx(ref_losses[s], rel=2e-3, abs=2e-4), (s, after[s], ref_losses[s])
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2] and recs[-1]["step"] == 2 * steps_per_epoch
    # Validation of a barely trained net amplifies rounding (and DDP evaluates each rank's own
    # BatchNorm statistics, DeepSpeed rank 0's): same ballpark, not bit-equal.
    assert recs[1]["val_loss"] == pytest.approx(ref_records[1]["val_loss"], rel=0.15)


def test_bf16_is_torch_autocast_and_matches_ddp_per_step(tmp_path, synthetic_shards):
    """--amp bf16: DeepSpeed runs torch.autocast over fp32 parameters (BatchNorm's buffers stay
    fp32; DeepSpeed's own bf16 mode fails on them) and reduces gradients in fp32, so ZeRO-2 on 2
    ranks gives DDP's bf16 per-step losses."""
    runs = {}
    for name, flags in (("ddp", []), ("zero2", ENGINES["zero2"])):
        out = tmp_path / name
        p = run_cli(command(synthetic_shards, out, [*flags, "--amp", "bf16", "--max-steps", "4"]),
                    cwd=tmp_path, env={**ENV, "EXIT_CODE_DIR": str(tmp_path / f"codes-{name}")})
        assert "amp bf16" in p.stdout, p.stdout[-2000:]
        runs[name] = losses(p.stdout)
    ds = json.loads((tmp_path / "zero2" / "deepspeed_config.json").read_text())
    assert ds["torch_autocast"]["enabled"] and "bf16" not in ds
    assert sorted(runs["ddp"]) == sorted(runs["zero2"]) == [1, 2, 3, 4]
    for s, ref in runs["ddp"].items():
        assert runs["zero2"][s] == pytest.approx(ref, rel=2e-3, abs=2e-4), (s, runs["zero2"][s], ref)
