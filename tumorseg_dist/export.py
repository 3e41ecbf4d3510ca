"""Export a checkpoint to ONNX: `python -m tumorseg_dist.export --checkpoint CKPT --onnx model.onnx`.

The graph maps a normalised image `image` [N, C, S, S] (float32) to `logits` [N, 1, S, S];
probability = sigmoid(logits). The preprocessing a deployment must apply (channels, size,
mean/std in [0, 1] pixel units) and the threshold are stored in the model's metadata
(`metadata_props`), so the .onnx file is self-describing.

Before reporting success the export is run with onnxruntime on a real input (the first test
image of the checkpoint's data set, or --input) and compared with PyTorch; the maximum absolute
difference is printed and must be below --atol. The file only appears at --onnx when it passed.
"""

from __future__ import annotations

from . import cli
from .options import ExportArgs


def _run(args: ExportArgs) -> int:
    from .jobs.export import run   # torch and the model stack: only once the flags are good
    return run(args)


def main(argv: list[str] | None = None) -> int:
    return cli.guarded("export", _run, cli.parse(ExportArgs, argv, name="export", description=__doc__))


if __name__ == "__main__":
    cli.exit_with(main())
