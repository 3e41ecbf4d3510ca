"""Pack a dataset into WebDataset shards: `python -m tumorseg_dist.pack INPUT --out shards/NAME`.

Formats (--format auto recognises them from the folder structure and says why):
  folders    ROOT/<images dir>/X + ROOT/<masks dir>/X     (image/+mask/, data/temp/+mask/temp/ ...)
  suffix     X.ext + X_mask.ext (+ X_mask_1.ext ...) side by side, any depth   (LGG, BUSI)
  coco       ROOT/{train,valid,test}/_annotations.coco.json + images   (splits kept, valid -> val)
  lidc       PATIENT/nodule-K/images/slice-S.png + PATIENT/nodule-K/mask-R/slice-S.png
  synthetic  built-in phantoms, no INPUT: --format synthetic --out shards/synthetic --samples 400 --size 256

Volumes, cut into 2D slices along --axis (--slices, --labels, --intensity, --window):
  nnunet     dataset.json + imagesTr/CASE_0000.nii.gz (+ _0001 ...) + labelsTr/CASE.nii.gz (or .png: 2D)
  nifti      images/X.nii.gz + labels/X.nii.gz, or X.nii.gz + X_seg.nii.gz   (MSD imagesTr/ + labelsTr/)
  dicom      a folder of DICOM files per series + its NIfTI label inside, beside (SERIES.nii.gz) or above it

Output: OUT/{train,val,test}-NNNNNN.tar (+ DALI .idx) and OUT/manifest.json, written atomically.
Slurm: slurm/pack.sh runs one slice per array task (--task-index/--num-tasks), then --merge.
See docs/pack.md.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

# Only light imports here: main() installs the stop-signal handler first and then imports the
# rest (numpy, Pillow, scipy: about 2 s), so a Ctrl-C during start-up is one message too.
from .packing.signals import stop_on_signals


def _pack(cfg) -> int:
    from .data.formats import LayoutError
    from .packing.pipeline import run
    if cfg.merge:
        from .packing.merge import merge_parts
        merge_parts(cfg.out, overwrite=cfg.overwrite)
        return 0
    if cfg.format == "synthetic":
        from .data.synthetic import pack_synthetic
        try:
            m = pack_synthetic(cfg.out, cfg.samples, cfg.size, cfg.seed, cfg.codec,
                               split=cfg.split, shard_size=cfg.shard_size, overwrite=cfg.overwrite)
        except ValueError as e:
            raise LayoutError(str(e)) from e
        counts = ", ".join(f"{k} {v['samples']}" for k, v in m["splits"].items())
        print(f"packed synthetic -> {cfg.out} ({counts}; codec {m['codec']})")
        return 0
    run(cfg)
    return 0


def parse(argv: list[str] | None):
    """The command's flags as a PackConfig; a combination that cannot work exits 2."""
    import dataclasses

    from . import cli
    from .packing.config import PackConfig
    cfg = cli.parse(PackConfig, argv, name="pack", description=__doc__)
    if cfg.input is None and cfg.format == "auto":
        cfg = dataclasses.replace(cfg, format="synthetic")
    if cfg.merge:
        return cfg
    if cfg.input is None and cfg.format != "synthetic":
        cli.usage_error("pack", f"INPUT is required for --format {cfg.format}")
    if cfg.folds and cfg.format == "synthetic":
        cli.usage_error("pack", "--folds is for packing an INPUT dataset; the synthetic set has no groups to fold")
    if (cfg.task_index is None) != (cfg.num_tasks is None):
        cli.usage_error("pack", "--task-index and --num-tasks go together")
    return cfg


def _target(cfg) -> Path:
    """The folder this command publishes (a Slurm array task: its part folder)."""
    if cfg.task_index is not None and cfg.num_tasks is not None and not cfg.merge:
        from .packing.merge import part_dir
        return part_dir(cfg.out, cfg.task_index, cfg.num_tasks)
    return Path(cfg.out)


def _stamp(out: Path) -> tuple[int, int] | None:
    """Identity of OUT's manifest: a new one appears only when a pack is published."""
    from .data.shards import MANIFEST
    try:
        st = (out / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    # One handler for the whole command, so a stop signal at any moment (start-up, planning,
    # packing, the publish, this function's last lines) ends in one of the two messages below.
    with stop_on_signals(restore=restore_signals) as stop:
        out = before = None
        try:
            from .cli import guarded
            cfg = parse(argv)
            out = _target(cfg)
            before = _stamp(out)
            rc = guarded("pack", _pack, cfg)
            stop.finish()
        except KeyboardInterrupt:
            stop.finish()
            rc = 130
            # The filesystem says which side of the atomic rename the signal landed on.
            if out is not None and _stamp(out) not in (before, None):
                print(f"pack: interrupted after {out} was complete: it is whole and usable, nothing to redo",
                      file=sys.stderr)
            else:
                print("pack: interrupted; nothing was written (an existing output is unchanged)", file=sys.stderr)
    if rc == 0 and stop.late:
        print(f"pack: {signal.Signals(stop.late).name} arrived after the work was done; {out} is as reported above",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    # The process ends here: a signal from now on finds the result decided and its message
    # printed, so it is recorded rather than allowed to interrupt or kill the exit.
    from .cli import exit_with
    exit_with(main(restore_signals=False))
