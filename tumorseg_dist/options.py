"""The flags of evaluate, predict and export: one typed dataclass per command, parsed by
`cli.parse` (the field docstrings are the --help).

They live here, on the ground floor with config.py (train's Config) and packing/config.py
(pack's), so that a command parses its flags, prints --help or refuses a bad flag without
importing torch; the work in `tumorseg_dist.jobs` imports these records, never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from . import cli
from .config import VerifyMode

Inference = Literal["whole", "sliding"]
# evaluate/predict --checkpoint A [--checkpoint B ...]: one model, or an ensemble
Checkpoints = Annotated[tuple[Path, ...], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="CKPT")]


def check_overlap(overlap: float) -> None:
    """The one rule for --overlap, before torch is imported (inference.py checks it too, for
    callers of the predictor that never parse flags)."""
    if not 0.0 <= overlap < 1.0:  # also refuses NaN
        raise ValueError(f"--overlap must be at least 0 and less than 1 (the fraction of a tile "
                         f"shared with its neighbour), got {overlap}")


@dataclass
class EvaluateArgs:
    """The flags of `python -m tumorseg_dist.evaluate`."""

    checkpoint: Annotated[Checkpoints, tyro.conf.arg(help_behavior_hint="(required)")] = ()
    """RUN/checkpoints/best.pt; repeat it for an ensemble (probabilities averaged). Not with
    --summary."""
    summary: Annotated[tuple[Path, ...], tyro.conf.arg(metavar="RUN", help_behavior_hint="(default: off)")] = ()
    """Cross-validation summary instead of an evaluation: RUN-f0 RUN-f1 ... (run directories or
    their eval folders) -> per-fold and mean ± sd table (summary.md, summary.json)."""
    data: cli.optional(Path, "the data the checkpoint was trained on") = None
    """Packed shard directory."""
    split: str = "test"
    """Split to evaluate."""
    tta: bool = False
    """Average probabilities over 4 flips."""
    threshold: cli.optional(float, "the one the model was trained with") = None
    """Probability threshold."""
    out: cli.optional(Path, "RUN/eval-SPLIT[-tta] beside RUN/checkpoints") = None
    """Output folder."""
    resolution: Literal["original", "model"] = "original"
    """Compare at each image's original size, or at the training size."""
    inference: Inference = "whole"
    """whole: each image resized to the training size and the map back; sliding: tiles of the
    training size over the image at its original size, Gaussian-weighted (docs/inference.md)."""
    overlap: float = 0.5
    """--inference sliding: fraction of a tile shared with its neighbour, in [0, 1)."""
    batch_size: int = 8
    """Images per forward pass, per rank (--inference sliding: tiles)."""
    workers: int = 2
    """Decoding worker processes per rank."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cases: int = 4
    """Worst and best images in cases.png."""
    verify_shards: VerifyMode = "quick"
    """Check the split's shards against manifest.json first: quick (size + cached sha256),
    full (rehash) or off."""

    def __post_init__(self) -> None:
        check_overlap(self.overlap)
        if not self.checkpoint and not self.summary:
            raise ValueError("--checkpoint RUN/checkpoints/best.pt is required (or --summary RUN-f0 RUN-f1 ...)")
        if self.checkpoint and self.summary:
            raise ValueError("--summary reads finished evaluations; leave --checkpoint out")
        if self.inference == "sliding" and self.resolution == "model":
            raise ValueError("--inference sliding predicts at each image's original size; it goes "
                             "with --resolution original, not --resolution model")


@dataclass
class PredictArgs:
    """The flags of `python -m tumorseg_dist.predict`."""

    inputs: Annotated[tuple[Path, ...], tyro.conf.Positional,
                      tyro.conf.arg(metavar="INPUT...", help_behavior_hint="(required)")]
    """Image files, folders of images, or packed shard directories."""
    out: Path
    """Output folder."""
    checkpoint: Annotated[Checkpoints, tyro.conf.arg(help_behavior_hint="(default: none; required unless --onnx)")] = ()
    """RUN/checkpoints/best.pt; repeat it for an ensemble (probabilities averaged)."""
    onnx: cli.optional(Path, "off: the checkpoint on PyTorch") = None
    """A model written by `export` (--graph full), run on onnxruntime without torch, instead of
    --checkpoint."""
    tta: bool = False
    """Average probabilities over 4 flips."""
    overlay: bool = False
    """Also write overlays/<name>.png."""
    threshold: cli.optional(float, "the one the model was trained with") = None
    """Probability threshold."""
    inference: Inference = "whole"
    """whole: each image resized to the training size and the map back; sliding: tiles of the
    training size over the image at its original size, Gaussian-weighted (docs/inference.md)."""
    overlap: float = 0.5
    """--inference sliding: fraction of a tile shared with its neighbour, in [0, 1)."""
    batch_size: int = 8
    """Images per forward pass (--inference sliding: tiles)."""
    split: Annotated[tuple[str, ...], tyro.conf.UseAppendAction,
                     tyro.conf.arg(help_behavior_hint="(default: every split)")] = ()
    """Shard inputs: only this split (repeatable: --split val --split test)."""
    verify_shards: VerifyMode = "quick"
    """Shard inputs: check the chosen splits' shards against manifest.json first: quick (size +
    cached sha256), full (rehash) or off."""
    workers: int = 2
    """Image-reading worker processes."""
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        check_overlap(self.overlap)
        if not self.checkpoint and self.onnx is None:
            raise ValueError("--checkpoint RUN/checkpoints/best.pt is required (repeat it for an ensemble)"
                             " or --onnx model.onnx")
        if self.checkpoint and self.onnx is not None:
            raise ValueError("--onnx runs the exported model on its own; leave --checkpoint out")



@dataclass
class ExportArgs:
    """The flags of `python -m tumorseg_dist.export`."""

    checkpoint: Path
    """RUN/checkpoints/best.pt"""
    onnx: Path
    """Output .onnx file."""
    graph: Literal["full", "network"] = "full"
    """full: the raw image (H×W×C uint8/uint16, any size) -> probabilities at its size, the
    preprocessing inside (what predict --onnx runs); network: the bare network, a preprocessed
    [N, C, S, S] float input -> logits."""
    pixels: Literal["uint8", "uint16"] = "uint8"
    """--graph full: the input's pixel type (8-bit images scaled by 255, 16-bit by 65535)."""
    size: cli.optional(int, "the training size") = None
    """Input side length (--graph full: the size the graph resizes to)."""
    dynamic_batch: bool = False
    """--graph network: batch dimension free (off: batch 1)."""
    opset: cli.optional(int, "18 for --graph full, 17 for network") = None
    input: cli.optional(Path, "the training data") = None
    """Image file or shard dir to check the export on."""
    atol: float = 1e-4
    """Max allowed |onnxruntime - PyTorch| (probabilities for --graph full, logits for network)."""

    def __post_init__(self) -> None:
        if self.dynamic_batch and self.graph == "full":
            raise ValueError("--dynamic-batch applies to --graph network; the full graph takes one "
                             "image of any size (batch tiles with --graph network)")
        if self.opset is not None and self.graph == "full" and self.opset < 18:
            raise ValueError(f"--graph full needs --opset 18 or later (its resize), got {self.opset}")

