"""Predict tumour masks for new images: `python -m tumorseg_dist.predict --checkpoint CKPT INPUT... --out DIR`.

INPUT is any mix of image files (PNG, JPEG, TIFF, BMP), folders of them (searched recursively),
packed shard directories (`shards/NAME`, every split unless --split) and volumes (`.nii`/`.nii.gz`
files, or a folder holding one DICOM series). Several --checkpoint: an ensemble (probabilities
averaged). Writes

  DIR/masks/<name>.png      one 8-bit {0,255} mask per image, at the image's ORIGINAL size, under
                            its original name (relative folder kept; the extension becomes .png)
  DIR/overlays/<name>.png   with --overlay: the image with the predicted contour (red) and, for
                            shard inputs, the ground-truth contour (green)
  DIR/volumes/<name>.nii.gz a volume input's mask volume (0/1) in its own voxel order, affine and
                            header; its slices' masks in DIR/masks/<name>/<name>_zK.png
  DIR/areas.csv             lesion area per image (pixels and fraction of the image)
  DIR/skipped.csv           inputs that could not be read, with the reason (only if any)
  DIR/predict.log           the lines shown on the console, timestamped

In folders, files named like masks (`X_mask.png`, `X_mask_1.png`) are left out; pass them as
files to predict them anyway. Unreadable inputs are reported and skipped; the rest are written,
and the exit status is then 1 (0 when every input was written).
"""

from __future__ import annotations

from . import cli, threads
from .options import PredictArgs


def _run(args: PredictArgs) -> int:
    from .jobs.predict import run   # torch and the model stack: only once the flags are good
    return run(args)


def main(argv: list[str] | None = None) -> int:
    threads.prefer_passive_waits()   # before torch is imported
    args = cli.parse(PredictArgs, argv, name="predict", description=__doc__)
    if not args.inputs:
        cli.usage_error("predict", "no INPUT: give image files, folders of images or shard directories")
    return cli.guarded("predict", _run, args)


if __name__ == "__main__":
    cli.exit_with(main())
