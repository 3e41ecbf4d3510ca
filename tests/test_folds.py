"""K-fold cross-validation: `pack --folds K` puts every patient group in exactly one fold (its own
train shards) or in the held-out test split, `train --fold k` validates on fold k and trains on
the others through both loaders, and `slurm/train.sh` runs the folds as a job array."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, SHARED_DATA, TINY, run_cli
from tumorseg_dist.data.shards import (IndexedShards, ShardError, assign_folds, check_fold, fold_split,
                                       read_manifest, read_sample, shard_paths)
from tumorseg_dist.pack import main as pack

LGG = SHARED_DATA / "lgg_kaggle_3m" / "kaggle_3m"
FOLDERS = SHARED_DATA / "images_masks_folders"


def test_assign_folds_is_deterministic_balanced_and_total():
    # 23 groups of very different sizes, as patients with 3 to 40 slices are
    groups = [f"p{i:02d}" for i in range(23) for _ in range(3 + (i * 7) % 38)]
    a = assign_folds(groups, 5, seed=3)
    assert a == assign_folds(list(reversed(groups)), 5, seed=3)      # input order does not matter
    assert set(a) == set(groups) and set(a.values()) == set(range(5))
    sizes = [sum(a[g] == f for g in groups) for f in range(5)]
    biggest = max(groups.count(g) for g in set(groups))
    assert sum(sizes) == len(groups) and max(sizes) - min(sizes) <= biggest
    assert max(sizes) - min(sizes) < 0.1 * len(groups) / 5
    # the seed decides among groups of one size (every case of a volume set counts one)
    cases = [f"case{i}" for i in range(20)]
    assert assign_folds(cases, 5, seed=4) != assign_folds(cases, 5, seed=3)
    assert sorted(list(assign_folds(cases, 5, seed=4).values()).count(f) for f in range(5)) == [4] * 5
    with pytest.raises(ShardError, match="needs at least 5 groups"):
        assign_folds(["a", "b", "c"], 5, 0)


def _pack_folders(tmp: Path, n_per_class: int = 10) -> Path:
    """A copy of part of the real image/mask folder set (no patient ids: one group per image)."""
    src = tmp / "in"
    for sub in ("data/temp", "mask/temp"):
        (src / sub).mkdir(parents=True)
    names = sorted((FOLDERS / "data" / "temp").iterdir(), key=lambda p: int(p.stem))
    keep = [p.name for p in names if int(p.stem) % 1000 <= n_per_class]
    for name in keep:
        for sub in ("data/temp", "mask/temp"):
            shutil.copy(FOLDERS / sub / name, src / sub / name)
    return src


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("folds")
    out = tmp / "shards"
    assert pack([str(_pack_folders(tmp)), "--out", str(out), "--folds", "3", "--split", "0.7,0.2,0.1",
                 "--shard-size", "200KB", "--no-progress"]) == 0
    return out


def _keys_and_groups(shards: Path, split: str) -> list[tuple[str, str]]:
    ds = IndexedShards(shard_paths(shards, split))
    metas = [read_sample(ds, i).meta for i in range(len(ds))]
    return [(r.key, m["group"] or m["source"]) for r, m in zip(ds.refs, metas)]   # no group: the image


def test_every_group_is_in_exactly_one_fold_or_the_test_split(folded):
    m = read_manifest(folded)
    folds = m["folds"]
    assert folds["count"] == 3 and folds["balanced_by"] == "images" and m["splits"]["val"]["samples"] == 0
    members = [set(g) for g in folds["groups"]]
    assert all(members) and sum(map(len, members)) == len(set().union(*members))   # disjoint
    test_groups = {g for _, g in _keys_and_groups(folded, "test")}
    assert test_groups and not test_groups & set().union(*members)
    for k in range(3):
        val = _keys_and_groups(folded, fold_split("val", k))
        train = _keys_and_groups(folded, fold_split("train", k))
        assert {g for _, g in val} == members[k]              # fold k's shards hold fold k only
        assert {g for _, g in train} == set().union(*members) - members[k]
        assert len(val) == folds["samples"][k] and len(val) + len(train) == m["splits"]["train"]["samples"]
        shards = [sh for sh in m["splits"]["train"]["shards"] if sh["fold"] == k]
        assert shards and all(sh["name"].startswith(f"train-fold{k}-") for sh in shards)
    assert max(folds["samples"]) - min(folds["samples"]) <= 1   # one image per group here
    total = sum(map(len, members)) + len(test_groups)
    assert total == len(list((folded.parent / "in" / "data" / "temp").iterdir()))


def test_lgg_patients_are_the_groups(tmp_path):
    """The real LGG layout: its 3 patient folders are the groups; no patient in two folds."""
    out = tmp_path / "lgg"
    assert pack([str(LGG), "--out", str(out), "--folds", "2", "--split", "0.67,0,0.33", "--no-progress"]) == 0
    m = read_manifest(out)
    seen: dict[str, str] = {}
    for split in ("test", fold_split("val", 0), fold_split("val", 1)):
        for key, group in _keys_and_groups(out, split):
            assert seen.setdefault(group, split) == split, f"{group} in {seen[group]} and {split}"
    assert len(set(seen)) == 3 and len(set(seen.values())) == 3
    assert sorted(g for f in m["folds"]["groups"] for g in f) == sorted(k for k, v in seen.items() if v != "test")


def test_slurm_parts_keep_the_folds(tmp_path, folded):
    """A Slurm array pack (2 tasks, then --merge) gives the single pack's folds and fold shards."""
    src, out = folded.parent / "in", tmp_path / "merged"
    common = [str(src), "--out", str(out), "--folds", "3", "--split", "0.7,0.2,0.1", "--shard-size", "200KB",
              "--no-progress"]
    for i in range(2):
        assert pack([*common, "--task-index", str(i), "--num-tasks", "2"]) == 0
    assert pack(["--out", str(out), "--merge", "--no-progress"]) == 0
    a, b = read_manifest(folded), read_manifest(out)
    assert a["folds"] == b["folds"]
    for k in range(3):
        assert sorted(_keys_and_groups(folded, fold_split("val", k))) == sorted(_keys_and_groups(out, fold_split("val", k)))


LOADER_PROBE = """
import json, sys
from tumorseg_dist import dist as d
from tumorseg_dist.config import Config
from tumorseg_dist.data.loader import build_loader
info = d.init("cpu")
out = {}
for loader in ("torch", "dali"):
    cfg = Config(); cfg.data.size, cfg.data.in_channels, cfg.data.num_workers = 64, 1, 1
    cfg.data.loader, cfg.data.fold, cfg.train.batch_size = loader, int(sys.argv[2]), 2
    for split, training in (("train", True), ("val", False)):
        ld = build_loader(cfg, sys.argv[1], split, info, training)
        ld.set_epoch(0)
        out[f"{loader}-{split}"] = sorted({k for b in ld for k, v in zip(b.keys, b.valid.tolist()) if v})
print(json.dumps(out))
"""


def test_both_loaders_read_the_folds_shards(folded, tmp_path):
    p = run_cli([PY, "-c", LOADER_PROBE, str(folded), "1"], cwd=tmp_path)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    want_val = sorted(k for k, _ in _keys_and_groups(folded, "val:fold1"))
    want_train = sorted(k for k, _ in _keys_and_groups(folded, "train:fold1"))
    for loader in ("torch", "dali"):
        assert got[f"{loader}-val"] == want_val, loader
        # training drops a last partial batch at most: every key it gives is one of the others' folds
        assert set(got[f"{loader}-train"]) <= set(want_train) and len(got[f"{loader}-train"]) >= len(want_train) - 1


def test_fold_errors_name_the_fix(folded, synthetic_shards, tmp_path):
    m = read_manifest(folded)
    with pytest.raises(ShardError, match=r"has 3 folds, --fold 0 to 2"):
        check_fold(m, 3, folded)
    with pytest.raises(ShardError, match=r"pass --fold 0 to 2"):
        check_fold(m, None, folded, training=True)
    check_fold(m, None, folded)                       # evaluate/predict read it without a fold
    plain = read_manifest(synthetic_shards)
    with pytest.raises(ShardError, match="synthetic set, which has no folds"):
        check_fold(plain, 0, synthetic_shards)
    unfolded = {**m, "folds": None, "format": "folders"}
    with pytest.raises(ShardError, match=r"packed without folds; re-pack it with --folds K: "
                                         r"python -m tumorseg_dist.pack \S+ --out \S+ --codec png --folds 5 --overwrite"):
        check_fold(unfolded, 0, folded)
    # the command line says it before anything is built or written
    p = run_cli([PY, "-m", "tumorseg_dist.train", *TINY, "--data", str(folded), "--fold", "5",
                 "--out", str(tmp_path / "r")], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--fold 5" in p.stderr and "has 3 folds" in p.stderr
    assert not (tmp_path / "r").exists()


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_array_task_trains_its_fold(tmp_path):
    """slurm/train.sh in array task 3: --fold 3 and a run dir per fold. Slurm's own clients are
    stand-ins that record what they were asked (tests/test_slurm.py runs a real cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'echo node1')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="1007", SLURM_ARRAY_JOB_ID="1004",
               SLURM_ARRAY_TASK_ID="3", SLURM_JOB_NAME="cv", SLURM_JOB_NODELIST="node1",
               RUNS_DIR=str(tmp_path / "runs"), RDZV_HOST="127.0.0.1", VENV=str(REPO / ".venv"))
    res = subprocess.run(["bash", "slurm/train.sh", "--data", "shards/x"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    args = (tmp_path / "srun.args").read_text().split("\n")
    train = args[args.index("tumorseg_dist.train") + 1:]
    run_dir = str(tmp_path / "runs" / "cv-1004-f3")
    assert train[:6] == ["--out", run_dir, "--resume", "auto", "--fold", "3"], (train, res.stderr)
    assert f"run dir {run_dir}" in res.stdout
    res = subprocess.run(["bash", "slurm/train.sh", "--data", "shards/x", "--out", "runs/one"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "leave --out out" in res.stderr


def test_evaluate_reads_the_checkpoints_fold(folded, tmp_path, capsys):
    """A checkpoint trained with --fold 1 evaluates --split val on fold 1; one trained without a
    fold is told why the folded dataset has no val split."""
    from inference_testing import make_checkpoint, tiny_config
    from tumorseg_dist import evaluate
    cfg = tiny_config(data=folded)
    cfg.data.fold = 1
    ck = make_checkpoint(tmp_path / "f1" / "checkpoints" / "best.pt", cfg)
    args = ["--split", "val", "--device", "cpu", "--workers", "0", "--cases", "0"]
    assert evaluate.main(["--checkpoint", str(ck), *args]) == 0
    m = json.loads((tmp_path / "f1" / "eval-val" / "metrics.json").read_text())
    assert m["split"] == "val:fold1" and m["samples"] == read_manifest(folded)["folds"]["samples"][1]
    plain = make_checkpoint(tmp_path / "plain.pt", tiny_config(data=folded))
    assert evaluate.main(["--checkpoint", str(plain), *args]) == 2
    assert "packed with --folds, so its validation data are the folds" in capsys.readouterr().err


def test_folds_are_part_of_the_fingerprint_and_the_dry_run(folded, tmp_path, capsys):
    src = folded.parent / "in"
    common = [str(src), "--out", str(folded), "--split", "0.7,0.2,0.1", "--shard-size", "200KB", "--no-progress"]
    assert pack([*common, "--folds", "3"]) == 0
    assert "up to date" in capsys.readouterr().out                    # same folds: nothing to do
    assert pack([*common, "--folds", "2"]) == 2                       # other folds: another dataset
    assert "other inputs or options" in capsys.readouterr().err
    assert pack([*common, "--folds", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "folds: 2 folds of the 27 groups outside the test split, by images (14, 13)" in out
    with pytest.raises(SystemExit) as e:                               # a flag error, while parsing
        pack([*common, "--folds", "1"])
    assert e.value.code == 2 and "at least 2 folds" in capsys.readouterr().err
    assert pack([*common, "--folds", "40", "--out", str(tmp_path / "x")]) == 2
    assert "--folds 40 needs at least 40 groups" in capsys.readouterr().err
