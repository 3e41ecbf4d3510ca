"""Resume on another number of ranks (issue 18), on CPU with torchrun and gloo.

A run with per-rank batch 2 and optimizer batch 12 (1 rank: --batch-size 2 --grad-accum 6; 2
ranks: 4 x 3; 3 ranks: 6 x 2) on a 36-sample train split is SIGTERMed mid-epoch and resumed on
another world size. Across the interruption every train sample is seen once in that epoch
(--record-keys lists each global micro-batch's keys in steps.jsonl), and with --deterministic
each logged loss equals the uninterrupted 1-rank run's loss of the same samples (rank 0's
per-rank batch at the same global position) within rel 1e-4: the layouts differ only in float
reduction order (gradients summed by gloo's all-reduce instead of by accumulation).

Both loaders select samples AND draw their augmentation (the default `--augment light`) by
global position (data/draws.py), so the augmented losses are the same on another world size;
`--loader dali` runs its CPU pipeline. `test_standard_augmentation_resumes_on_another_world_size`
repeats one resume with `--augment standard` (affine, intensities, noise).
"""
import json
import math
import re
import shutil

import pytest

from conftest import PY, REPO, TINY, TORCHRUN, run_cli
from test_deepspeed import ENV, preempt

pytestmark = pytest.mark.slow
LAYOUT = {1: ["--batch-size", "2", "--grad-accum", "6"], 2: ["--batch-size", "4", "--grad-accum", "3"],
          3: ["--batch-size", "6", "--grad-accum", "2"]}
TOLERANCE = 1e-4   # relative, per logged loss


@pytest.fixture(scope="module", params=["torch", "dali"])
def loader(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali")
    return request.param


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tumorseg_dist.data.synthetic import pack_synthetic
    out = tmp_path_factory.mktemp("elastic") / "synthetic"
    pack_synthetic(out, n=52, size=64, seed=0)   # 36 train samples: 3 optimizer steps of 12
    return out


def command(shards, out, world, loader="torch", augment=()):
    launch = [PY, str(REPO / "launch" / "record_exit.py")] if world == 1 else \
        [TORCHRUN, "--nproc-per-node", str(world), "--standalone",
         str(REPO / "launch" / "record_exit.py")]
    return [*launch, "tumorseg_dist.train", *TINY, "--data", str(shards), "--out", str(out),
            "--loader", loader, "--epochs", "1", "--log-every", "1", "--seed", "3",
            "--deterministic", "--record-keys", *LAYOUT[world], *augment]


def steps(run):
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def chunk_losses(lines):
    """{global position of rank 0's per-rank batch: its loss} (batch = samples / step)."""
    return {r["samples"] - r["samples"] // r["step"]: r["loss"] for r in lines}


def train_keys(shards):
    from tumorseg_dist.data.shards import read_index, read_manifest, shard_paths
    m = read_manifest(shards)
    return sorted(ref.key for tar in shard_paths(shards, "train", m) for ref in read_index(tar))


@pytest.fixture(scope="module")
def reference(shards, loader, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(command(shards, out, 1, loader), cwd=out.parent, env={**ENV, "EXIT_CODE_DIR": str(out.parent / "c")})
    return chunk_losses(steps(out))


def stopped(shards, tmp_path, world, loader, augment=()):
    out = tmp_path / f"from{world}"
    codes = tmp_path / f"codes{world}"
    _, stdout = preempt(command(shards, out, world, loader, augment), tmp_path, {**ENV, "EXIT_CODE_DIR": str(codes)},
                        after_step=1)
    # Every rank exits 75 (requeue) after the collective save; torchrun itself reports the signal.
    assert [(codes / f"rank{r}").read_text().strip() for r in range(world)] == ["75"] * world, stdout[-3000:]
    pos = int(re.search(r"sample (\d+) of 36", stdout).group(1))
    assert 0 < pos < 36 and pos % 12 == 0, stdout[-3000:]   # mid-epoch, on an optimizer step
    return out


def resume_on(src, tmp_path, shards, world, loader, augment=()):
    out = tmp_path / f"{src.name}-to{world}"
    shutil.copytree(src, out)
    p = run_cli(command(shards, out, world, loader, augment), cwd=tmp_path, env={**ENV, "EXIT_CODE_DIR": str(tmp_path / "c")})
    assert f"resumed on {world} ranks" in p.stdout, p.stdout[-3000:]
    return out


def check(run, shards, reference):
    lines = [r for r in steps(run) if r["epoch"] == 1]
    seen = sorted(k for r in lines for k in r["keys"])
    assert seen == train_keys(shards)                        # every sample once in the epoch
    got = chunk_losses(lines)
    assert got.keys() <= reference.keys() and len(got) >= 6
    bad = {p: (got[p], reference[p]) for p in got if not math.isclose(got[p], reference[p], rel_tol=TOLERANCE)}
    assert not bad, bad
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1


def test_two_ranks_stopped_mid_epoch_resume_on_one_and_on_three(shards, tmp_path, reference, loader):
    src = stopped(shards, tmp_path, 2, loader)
    for world in (1, 3):
        check(resume_on(src, tmp_path, shards, world, loader), shards, reference)


def test_one_rank_stopped_mid_epoch_resumes_on_two(shards, tmp_path, reference, loader):
    check(resume_on(stopped(shards, tmp_path, 1, loader), tmp_path, shards, 2, loader), shards, reference)


def test_standard_augmentation_resumes_on_another_world_size(shards, tmp_path, loader):
    """`--augment standard` (affine, gamma, brightness, contrast, noise): stopped on 2 ranks,
    resumed on 1, every loss equals the uninterrupted 1-rank run's."""
    aug = ["--augment", "standard"]
    ref = tmp_path / "ref"
    run_cli(command(shards, ref, 1, loader, aug), cwd=tmp_path, env={**ENV, "EXIT_CODE_DIR": str(tmp_path / "rc")})
    src = stopped(shards, tmp_path, 2, loader, aug)
    check(resume_on(src, tmp_path, shards, 1, loader, aug), shards, chunk_losses(steps(ref)))
