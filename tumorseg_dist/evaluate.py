"""Evaluate a checkpoint on a packed split: `python -m tumorseg_dist.evaluate --checkpoint CKPT --data shards/NAME`.

Writes to --out (default RUN/eval-<split>[-sliding][-tta]/ next to the checkpoint's run):

  metrics.json    dataset-level Dice, IoU, precision, recall, accuracy (from summed TP/FP/FN/TN),
                  mean per-image Dice/IoU, mean/median Hausdorff-95 (MONAI's) over the images
                  where both masks are non-empty, and the average symmetric surface distance
                  (ASSD), in pixels and, for images whose json gives their spacing (slices of
                  volumes: spacing_mm), in mm; and what was evaluated (checkpoint, data, split, ...)
  per_image.csv   key, source, group, dice, iou, target/prediction area, hd95, hd95_mm, assd, assd_mm
  evaluate.log    the lines shown on the console, timestamped
  cases.png       the worst and the best images by Dice, with ground truth (green) and
                  prediction (red) contours

By default the prediction is resized back to each image's ORIGINAL size and compared with the
original mask (areas and HD95 are in original pixels), as training's test_metrics.json is (the
same scoring: tumorseg_dist/scoring.py). `--resolution model` instead compares at the training
size, exactly as the training loop's validation counts. `--inference sliding` predicts
at each image's original size with tiles of the training size (Gaussian-weighted, `--overlap`),
for images much larger than the training size (docs/inference.md).

Several --checkpoint: an ensemble, their probabilities averaged (flip TTA inside each model);
the default --out is then ensemble-RUN1+RUN2+.../eval-<split>... beside the runs.

`--summary RUN-f0 RUN-f1 ...` evaluates nothing: it reads each run's eval-<split>[...]/metrics.json
(as the flags name it) and writes the per-fold and mean ± sd table, summary.md and summary.json,
to --out (default: summary-<split>[...] in the runs' common folder).

Under torchrun each rank evaluates a disjoint slice of the split (global rank, world size), and
the counts are summed, so every sample is counted exactly once.
"""
from __future__ import annotations

from . import cli, threads
from .options import EvaluateArgs


def _run(args: EvaluateArgs) -> int:
    if args.summary:
        from .jobs.summary import run as summary   # reads metrics.json files: no torch
        return summary(args)
    from .jobs.evaluate import run   # torch and the model stack: only once the flags are good
    return run(args)


def main(argv: list[str] | None = None) -> int:
    threads.prefer_passive_waits()   # before torch is imported
    return cli.guarded("evaluate", _run, cli.parse(EvaluateArgs, argv, name="evaluate", description=__doc__))


if __name__ == "__main__":
    cli.exit_with(main())
