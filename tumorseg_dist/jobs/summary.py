"""The work of `evaluate --summary RUN-f0 RUN-f1 ...`: one table of a cross-validation, per fold
and mean ± sd over the folds (as nnU-Net's summary.json), from evaluations already written.

No model runs here: each RUN is a run directory (its evaluation folder is found by the flags'
naming, RUN/eval-SPLIT[-sliding][-tta], the folder `evaluate` writes by default), an evaluation
folder, or a metrics.json. A metric a fold cannot define (HD95 with no lesion pair, a ratio over
nothing) stays null in the JSON and n/a in the table; the mean and sd are over the folds that
define it, and `n` says how many did.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .. import outputs
from ..log import Console, fmt
from ..options import EvaluateArgs

METRICS = ("dice", "iou", "precision", "recall", "mean_image_dice", "hd95_mean", "hd95_mm_mean", "assd_mm_mean")
SPEC = {"hd95_mean": ".2f", "hd95_mm_mean": ".2f", "assd_mm_mean": ".2f"}


def metrics_file(path: Path, split: str, tta: bool, inference: str) -> Path:
    """The metrics.json a --summary argument stands for (error naming the command that writes it)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "metrics.json").is_file():
        return path / "metrics.json"
    sub = f"eval-{split}{'-sliding' if inference == 'sliding' else ''}{'-tta' if tta else ''}"
    if (path / sub / "metrics.json").is_file():
        return path / sub / "metrics.json"
    flags = f" --split {split}" + (" --tta" if tta else "") + (f" --inference {inference}" if inference != "whole" else "")
    raise ValueError(f"--summary {path}: no {path / sub / 'metrics.json'}; evaluate that run first: "
                            f"python -m tumorseg_dist.evaluate --checkpoint {path / 'checkpoints' / 'best.pt'}{flags}")


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample sd (n - 1) over the defined values; sd needs two of them."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return m, sd, len(xs)


def summarise(files: list[Path], names: list[str]) -> dict:
    """summary.json: each fold's metrics, their mean, sd and n."""
    rows, base = [], None
    for f, name in zip(files, names):
        m = json.loads(Path(f).read_text())
        split = str(m.get("split", "?"))
        kind = split.partition(":fold")[0]
        if base is None:
            base = (kind, m.get("data"), f)
        elif kind != base[0]:
            raise ValueError(f"--summary: {f} evaluated split {kind!r} but {base[2]} split {base[0]!r}; "
                             f"summarise evaluations of one split")
        fold = split.partition(":fold")[2]
        rows.append({"name": name, "metrics_file": str(f), "fold": int(fold) if fold else None, "split": split,
                     "checkpoint": m.get("checkpoint"), "samples": m.get("samples"),
                     **{k: _number(m.get(k)) for k in METRICS}})
    stats = {k: mean_sd([r[k] for r in rows]) for k in METRICS}
    return {"split": base[0] if base else None, "data": base[1] if base else None, "metrics": list(METRICS),
            "folds": rows, "mean": {k: v[0] for k, v in stats.items()}, "sd": {k: v[1] for k, v in stats.items()},
            "n": {k: v[2] for k, v in stats.items()},
            "samples": sum(r["samples"] or 0 for r in rows)}


def markdown(s: dict) -> str:
    head = ["fold", "run", "images", *s["metrics"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["folds"]:
        cells = ["n/a" if r["fold"] is None else str(r["fold"]), r["name"], str(r["samples"] or 0),
                 *(fmt(r[k], SPEC.get(k, ".4f")) for k in s["metrics"])]
        lines.append("| " + " | ".join(cells) + " |")
    both = []
    for k in s["metrics"]:
        m, sd = s["mean"][k], s["sd"][k]
        spec = SPEC.get(k, ".4f")
        both.append("n/a" if m is None else fmt(m, spec) + (f" ± {fmt(sd, spec)}" if sd is not None else ""))
    lines.append("| " + " | ".join(["mean ± sd", f"{len(s['folds'])} folds", str(s["samples"]), *both]) + " |")
    return (f"Cross-validation summary, split {s['split']} ({s['data']}); mean ± sd over the folds that "
            f"define each metric (sample sd, n - 1).\n\n" + "\n".join(lines) + "\n")


def run(args: EvaluateArgs) -> int:
    log = Console()
    files = [metrics_file(p, args.split, args.tta, args.inference) for p in args.summary]
    names = [Path(p).name for p in args.summary]
    s = summarise(files, names)
    runs = [Path(p).resolve() for p in args.summary]
    out = args.out or Path(os.path.commonpath(runs)) / (
        f"summary-{args.split}{'-sliding' if args.inference == 'sliding' else ''}{'-tta' if args.tta else ''}")
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_text(out / "summary.json", json.dumps(s, indent=2) + "\n")
    outputs.write_text(out / "summary.md", markdown(s))
    for line in markdown(s).splitlines():
        log.info(line)
    log.info(f"evaluate: summary of {len(files)} folds -> {out / 'summary.md'}, {out / 'summary.json'}")
    log.close()
    return 0
