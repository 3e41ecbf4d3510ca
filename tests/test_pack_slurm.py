"""Slurm array packing without Slurm: the per-task and merge commands run directly, and
slurm/pack.sh driven through a stand-in `sbatch` that runs the jobs in place."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg_dist.pack import main as pack

REPO = Path(__file__).resolve().parents[1]


def make_set(root: Path, patients: int = 6, per: int = 5) -> Path:
    rng = np.random.default_rng(3)
    for p in range(patients):
        case = f"CASE_{p:02d}"
        for s in range(per):
            d = root / case
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(d / f"{case}_{s}.png")
            m = np.zeros((24, 24), np.uint8)
            m[: s * 3, :5] = 255
            Image.fromarray(m).save(d / f"{case}_{s}_mask.png")
    if patients > 3:   # an orphan mask: a scan problem, recorded once (by task 0)
        (root / "CASE_03" / "CASE_03_9_mask.png").write_bytes((root / "CASE_03" / "CASE_03_1_mask.png").read_bytes())
    return root


def members(out: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    man = json.loads((out / "manifest.json").read_text())
    got = {}
    for split, info in man["splits"].items():
        for sh in info["shards"]:
            assert (out / sh["name"]).with_suffix(".idx").is_file()
            with tarfile.open(out / sh["name"]) as tf:
                for m in tf.getmembers():
                    k, _, ext = m.name.partition(".")
                    got.setdefault(k, (split, {}))[1][ext] = tf.extractfile(m).read()
    return got


def test_tasks_then_merge_equal_single_run(tmp_path, capsys):
    root = make_set(tmp_path / "in")
    opts = ["--split", "0.5,0.25,0.25", "--seed", "4", "--shard-size", "5KB", "--on-error", "skip", "--no-progress"]
    single = tmp_path / "single" / "ds"
    assert pack([str(root), "--out", str(single), *opts]) == 0
    out = tmp_path / "arr" / "ds"
    assert pack(["--merge", "--out", str(out)]) == 2
    assert "run the array tasks first" in capsys.readouterr().err
    for i in (0, 2):
        assert pack([str(root), "--out", str(out), "--task-index", str(i), "--num-tasks", "3", *opts]) == 0
    assert pack(["--merge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 tasks have not finished" in err and "--array=1" in err and not out.exists()
    assert pack([str(root), "--out", str(out), "--task-index", "1", "--num-tasks", "3", *opts]) == 0
    # a re-run of a finished task does nothing
    assert pack([str(root), "--out", str(out), "--task-index", "1", "--num-tasks", "3", *opts]) == 0
    assert "up to date" in capsys.readouterr().out
    assert pack(["--merge", "--out", str(out)]) == 0
    assert not (tmp_path / "arr" / "ds.parts").exists()
    a, b = members(single), members(out)
    assert a == b and len(a) == 30
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (single, out))
    for k in ("train", "val", "test"):
        assert ma["splits"][k]["samples"] == mb["splits"][k]["samples"]
        assert ma["splits"][k]["positive_samples"] == mb["splits"][k]["positive_samples"]
    assert mb["merged_from_tasks"] == 3
    assert ma["skipped"] == mb["skipped"] and len(mb["skipped"]) == 1   # the orphan mask, recorded once
    assert np.allclose(ma["mean"], mb["mean"], atol=1e-6) and np.allclose(ma["std"], mb["std"], atol=1e-6)
    assert ma["size_histogram"] == mb["size_histogram"] and ma["fingerprint"] == mb["fingerprint"]
    names = sorted(p.name for p in out.iterdir())
    assert "train-000000.tar" in names and all(n.split("-")[0] in ("train", "val", "test", "manifest.json")
                                               for n in names)
    # the merged output is the same dataset: a single run into it now does nothing
    assert pack([str(root), "--out", str(out), *opts]) == 0
    assert "up to date" in capsys.readouterr().out


def test_pack_sh_with_stand_in_sbatch(tmp_path):
    root = make_set(tmp_path / "in", patients=4, per=3)
    (root / "CASE_03" / "CASE_03_9_mask.png").unlink()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    sbatch = bindir / "sbatch"
    sbatch.write_text(f"""#!/usr/bin/env bash
# stand-in for sbatch: runs the job here, now; arrays task by task
echo "$@" >> {log}
array=""; exports=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --array=*) array=${{1#--array=}}; shift ;;
    --export=*) exports=${{1#--export=}}; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
IFS=, read -ra kv <<< "$exports"
for x in "${{kv[@]}}"; do [[ "$x" == ALL ]] || export "$x"; done
if [[ -n "$array" ]]; then
  for i in $(seq "${{array%-*}}" "${{array#*-}}"); do SLURM_ARRAY_TASK_ID=$i bash "$@" >&2 || exit 1; done
  echo 1001
else
  bash "$@" >&2 || exit 1
  echo 1002
fi
""")
    sbatch.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": sys.executable}
    out = tmp_path / "shards" / "cases"
    r = subprocess.run(["bash", str(REPO / "slurm" / "pack.sh"), "2", str(root), "--out", str(out),
                        "--split", "0.5,0.25,0.25"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "submitted pack array job 1001 (2 tasks) and merge job 1002" in r.stdout
    calls = log.read_text().splitlines()
    assert "--array=0-1" in calls[0] and "--dependency=afterok:1001" in calls[1]
    got = members(out)
    assert len(got) == 12 and not (tmp_path / "shards" / "cases.parts").exists()
    for split, s in got.values():
        m = json.loads(s["json"])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["image.png"]))),
                              np.asarray(Image.open(root / m["source"])))
    r = subprocess.run(["bash", str(REPO / "slurm" / "pack.sh"), "x", str(root)], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_bad_task_arguments(tmp_path, capsys):
    root = make_set(tmp_path / "in", patients=2, per=2)
    rc = pack([str(root), "--out", str(tmp_path / "o"), "--task-index", "3", "--num-tasks", "3"])
    assert rc == 2 and "--task-index must be in 0..2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pack([str(root), "--out", str(tmp_path / "o"), "--task-index", "0"])
    assert "go together" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.parts").exists()
