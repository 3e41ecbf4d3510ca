"""export --graph network (the bare network): ONNX equals PyTorch (fp32, < 1e-4) on a real input,
dynamic batch, metadata, errors; and the checks on TIFF inputs (the default full graph)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import export
from tumorseg_dist.inference import load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_shards) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(d / "best.pt", tiny_config(size=64, data=synthetic_shards, mean=(0.25,), std=(0.15,)))


def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path, ckpt, capsys):
    import onnx
    import onnxruntime as ort
    out = tmp_path / "m" / "model.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(out), "--graph", "network",
                        "--dynamic-batch"]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and "test/" in printed  # checked on a real test image
    diff = float(printed.split("max abs difference ")[1].split()[0])
    assert diff < 1e-4

    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["tumorseg_dist.mean"]) == [0.25] and props["tumorseg_dist.size"] == "64"

    # Independently: a batch of 3 different inputs through onnxruntime and PyTorch.
    model = load_model(ckpt)
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model.model(x).numpy()
    assert got.shape == (3, 1, 64, 64)
    assert np.abs(got - want).max() < 1e-4
    assert not list(out.parent.glob(".*tmp*"))  # no temp file left behind
    # The signature deployments size buffers from: image [batch, 1, 64, 64], logits [batch, 1, 64, 64].
    assert declared(proto) == ([["batch", 1, 64, 64]], [["batch", 1, 64, 64]])
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)  # and consistent


def declared(proto) -> tuple[list, list]:
    """The input and output shapes the .onnx file declares, a symbolic dim by its name."""
    def dims(values):
        return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]
    return dims(proto.graph.input), dims(proto.graph.output)


def test_fixed_size_export_from_an_image_file_and_errors(tmp_path, ckpt, capsys):
    from PIL import Image
    img = tmp_path / "scan (1).png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70), dtype=np.uint8)).save(img)
    out = tmp_path / "fixed.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(out), "--graph", "network",
                        "--size", "96", "--input", str(img)]) == 0
    import onnxruntime as ort
    shape = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert shape == [1, 1, 96, 96]
    import onnx
    assert declared(onnx.load(str(out))) == ([[1, 1, 96, 96]], [[1, 1, 96, 96]])
    assert "scan (1).png" in capsys.readouterr().out

    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(tmp_path / "x.onnx"), "--size", "50"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(tmp_path / "x.onnx"),
                        "--input", str(tmp_path / "nope.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_checks_on_tiffs_by_the_one_reader_rule(tmp_path, ckpt, capsys):
    """--input TIFF: channels-last, planar and grey files check the export on their real pixels;
    stacks and 5-channel files are a one-line error naming the file and shape, nothing written.
    (Every case is read by test_predict's reader test; here each refusal, and one export per
    planar layout: RGB and RGBA.)"""
    from inference_testing import TIFF_CASES, write_tiff
    for name, shape, kwargs, expect in TIFF_CASES:
        if name in ("hw3", "1hw", "hw1"):
            continue
        src, out = tmp_path / f"{name}.tif", tmp_path / f"{name}.onnx"
        write_tiff(src, shape, kwargs)
        rc = export.main(["--checkpoint", str(ckpt), "--onnx", str(out), "--input", str(src)])
        cap = capsys.readouterr()
        if isinstance(expect, tuple):
            assert rc == 0 and out.is_file() and f"{name}.tif" in cap.out, (name, cap.err)
        else:
            assert rc == 2 and not out.exists(), name
            line = cap.err.strip()
            assert len(line.splitlines()) == 1 and f"{name}.tif: {expect}" in line and str(shape) in line
