"""The work of `python -m tumorseg_dist.export` (its flags: tumorseg_dist/export.py): the ONNX
file, written only once onnxruntime agrees with PyTorch on a real input."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.shards import IndexedShards, read_sample
from ..data.shards import MANIFEST, read_manifest, shard_paths
from ..imageio import read_image
from ..inference import Predictor, load_model
from ..log import Console
from ..options import ExportArgs


def real_input(model: Predictor, given: Path | None) -> tuple[np.ndarray | None, str]:
    """An image in [0, 1] to check the export on, and where it came from.

    --input (an image file or a shard dir), else the checkpoint's data set (test, val, train)."""
    candidates = [given] if given is not None else []
    if given is None and model.config.get("data", {}).get("path"):
        candidates.append(Path(model.config["data"]["path"]))
    for c in candidates:
        c = Path(c)
        if c.is_dir() and (c / MANIFEST).is_file():
            manifest = read_manifest(c)
            for split in ("test", "val", "train"):
                if manifest["splits"].get(split, {}).get("samples"):
                    ds = IndexedShards(shard_paths(c, split, manifest))
                    return read_sample(ds, 0).image, f"{c} ({split}/{ds.refs[0].key})"
        elif c.is_file():
            return read_image(c), str(c)
        elif given is not None:
            raise ValueError(f"--input {c}: no such image file or shard directory")
    return None, ""


def export_onnx(model: Predictor, path: Path, size: int, dynamic_batch: bool, opset: int,
                example: torch.Tensor) -> None:
    import onnx
    net = model.model.float().cpu().eval()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # The TorchScript exporter: the torch.export one needs onnxscript, which we do not ship.
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    proto = onnx.load(str(path))
    declare_shapes(proto, "batch" if dynamic_batch else 1, model.in_channels, size)
    onnx.checker.check_model(proto)
    onnx.helper.set_model_props(proto, {
        "tumorseg_dist.arch": model.arch, "tumorseg_dist.encoder": model.encoder,
        "tumorseg_dist.in_channels": str(model.in_channels), "tumorseg_dist.size": str(size),
        "tumorseg_dist.mean": json.dumps(list(model.mean)), "tumorseg_dist.std": json.dumps(list(model.std)),
        "tumorseg_dist.threshold": str(model.threshold),
        "tumorseg_dist.output": "logits; probability = sigmoid(logits)",
        "tumorseg_dist.preprocess": "pixels/255 (16-bit: /65535) -> channels (grey repeated, colour "
                                    "to BT.601 luma) -> bilinear antialiased resize -> (x-mean)/std",
    })
    onnx.save(proto, str(path))


def declare_shapes(proto, batch: int | str, channels: int, size: int) -> None:
    """The signature a deployment sizes its buffers from: image [batch, C, S, S] and logits
    [batch, 1, S, S]. The TorchScript exporter's own guess names the output's spatial dims after
    the batch, so both are written here; the exporter's intermediate shape notes go too."""
    for value, c in ((proto.graph.input[0], channels), (proto.graph.output[0], 1)):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in (batch, c, size, size):
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    del proto.graph.value_info[:]


def check_onnx(path: Path, net: torch.nn.Module, x: torch.Tensor) -> float:
    """Max |onnxruntime - PyTorch| over the logits for input x; the returned and the declared
    output shapes must agree with PyTorch's (a symbolic dim matches any size)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = net(x).float().numpy()
    declared = sess.get_outputs()[0].shape
    if got.shape != want.shape or len(declared) != want.ndim or any(
            isinstance(d, int) and d != w for d, w in zip(declared, want.shape)):
        raise RuntimeError(f"onnxruntime returned shape {got.shape} (declared {declared}), "
                           f"PyTorch {want.shape}")
    return float(np.abs(got - want).max())




def run(args: ExportArgs) -> int:
    log = Console()
    model = load_model(args.checkpoint, "cpu")
    size = args.size or model.size
    multiple = 16 if model.arch == "unet-classic" else 32
    if size < multiple or size % multiple:
        raise ValueError(f"--size must be a multiple of {multiple} for {model.arch}, got {size}")
    image, where = real_input(model, args.input)
    if image is None:
        log.warning(f"export: warning: the training data {model.config.get('data', {}).get('path')} is "
                    f"not here and no --input was given; checking on a random input instead")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, model.in_channels, size, size, generator=g)
        where = "random normal input"
    else:
        x = model.preprocess(image, size)[None]
    args.onnx.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.onnx.with_name(f".{args.onnx.name}.tmp-{os.getpid()}")
    # The check's steps: the export, then onnxruntime on batch 1 (and 3: a free batch must work).
    steps = [("export", None), ("check batch 1", x)]
    if args.dynamic_batch:
        steps.append(("check batch 3", torch.cat([x, x.flip(-1), x.flip(-2)])))
    try:
        diffs = []
        for what, batch in log.progress(steps, len(steps), "export", unit="step"):
            if batch is None:
                export_onnx(model, tmp, size, args.dynamic_batch, args.opset, x)
            else:
                diffs.append(check_onnx(tmp, model.model, batch))
        diff = max(diffs)
        log.info(f"export: onnxruntime vs PyTorch on {where}: max abs difference {diff:.3e} "
                 f"(logits, {'batch 1 and 3' if args.dynamic_batch else 'batch 1'}, {size}x{size})")
        if not diff <= args.atol:
            log.warning(f"export: error: difference {diff:.3e} is above --atol {args.atol:g}; "
                        f"{args.onnx} was not written")
            return 1
        os.replace(tmp, args.onnx)
    finally:
        if tmp.exists():
            tmp.unlink()
    mb = args.onnx.stat().st_size / 2 ** 20
    log.info(f"export: wrote {args.onnx} ({mb:.1f} MB, opset {args.opset}): input 'image' "
             f"[{'N' if args.dynamic_batch else 1}, {model.in_channels}, {size}, {size}] normalised "
             f"with mean {list(model.mean)} std {list(model.std)}; output 'logits' -> sigmoid -> "
             f"> {model.threshold}")
    return 0

