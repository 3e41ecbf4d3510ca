"""`evaluate --summary RUN-f0 ... RUN-fK`: the per-fold and mean ± sd table of a cross-validation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tumorseg_dist import evaluate

# What `evaluate` writes (a subset of its keys), for three folds; fold 2 had no lesion pair, so
# its HD95 is undefined (null), and no sample gave a pixel spacing (hd95_mm null everywhere).
FOLDS = [
    {"dice": 0.81, "iou": 0.68, "precision": 0.8, "recall": 0.83, "mean_image_dice": 0.7, "hd95_mean": 4.5,
     "hd95_mm_mean": None, "samples": 20},
    {"dice": 0.77, "iou": 0.63, "precision": 0.75, "recall": 0.8, "mean_image_dice": 0.66, "hd95_mean": 6.25,
     "hd95_mm_mean": None, "samples": 22},
    {"dice": 0.86, "iou": 0.75, "precision": 0.9, "recall": 0.82, "mean_image_dice": 0.79, "hd95_mean": None,
     "hd95_mm_mean": None, "samples": 19},
]


def _runs(root: Path, split="val", folds=FOLDS) -> list[Path]:
    runs = []
    for k, m in enumerate(folds):
        run = root / f"cv-f{k}"
        (run / f"eval-{split}").mkdir(parents=True)
        (run / f"eval-{split}" / "metrics.json").write_text(json.dumps(
            {**m, "split": f"{split}:fold{k}" if split != "test" else split, "data": "/d", "checkpoint": "c"}))
        runs.append(run)
    return runs


def test_summary_table_mean_sd_and_undefined(tmp_path, capsys):
    runs = _runs(tmp_path)
    assert evaluate.main(["--summary", *map(str, runs), "--split", "val"]) == 0
    out = tmp_path / "summary-val"
    s = json.loads((out / "summary.json").read_text())
    assert [r["fold"] for r in s["folds"]] == [0, 1, 2] and s["samples"] == 61
    for k in ("dice", "iou", "mean_image_dice"):
        xs = np.array([f[k] for f in FOLDS])
        assert s["mean"][k] == pytest.approx(xs.mean()) and s["sd"][k] == pytest.approx(xs.std(ddof=1))
        assert s["n"][k] == 3
    assert s["mean"]["hd95_mean"] == pytest.approx(5.375) and s["n"]["hd95_mean"] == 2
    assert s["folds"][2]["hd95_mean"] is None                       # stays null, not 0
    assert s["mean"]["hd95_mm_mean"] is None and s["sd"]["hd95_mm_mean"] is None and s["n"]["hd95_mm_mean"] == 0
    md = (out / "summary.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| fold | run | images | dice |")
    assert rows[3].split(" | ")[8] == "n/a"                        # fold 2's hd95
    assert f"{np.mean([0.81, 0.77, 0.86]):.4f} ± {np.std([0.81, 0.77, 0.86], ddof=1):.4f}" in rows[-1]
    assert rows[-1].split(" | ")[-2] == "n/a"                       # no fold had a spacing
    assert "mean ± sd" in capsys.readouterr().out


def test_summary_errors_name_the_fix(tmp_path, capsys):
    runs = _runs(tmp_path / "a")
    assert evaluate.main(["--summary", *map(str, runs), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "no " in err and "evaluate that run first: python -m tumorseg_dist.evaluate --checkpoint" in err
    other = _runs(tmp_path / "b", split="test")
    assert evaluate.main(["--summary", str(runs[0] / "eval-val"), str(other[1] / "eval-test")]) == 2
    assert "summarise evaluations of one split" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # a flag combination: refused while parsing
        evaluate.main(["--summary", str(runs[0]), "--checkpoint", "x.pt"])
    assert e.value.code == 2 and "leave --checkpoint out" in capsys.readouterr().err
