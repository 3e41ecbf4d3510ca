"""export --graph full (the default): the raw image in, probabilities at its size out, the
preprocessing inside; equal to the PyTorch predictor's whole mode on real images of every
channel layout, sizes and pixel types; declared shapes; K-class output; flag errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from inference_testing import make_checkpoint, tiny_config
from test_export import declared
from tumorseg_dist import export
from tumorseg_dist.imageio import read_array, read_image
from tumorseg_dist.inference import Predictor, load_model

# Real files of each layout the one reader returns: RGB 701×526 ultrasound, 512² grey MRI,
# an RGB TIFF, a 128² CT slice (smaller than nothing here: the graph takes any size).
REAL = [SHARED_DATA / "busi" / "dataset" / "benign" / "benign (15).png",
        SHARED_DATA / "images_masks_folders" / "data" / "temp" / "1.png",
        SHARED_DATA / "lgg_kaggle_3m" / "kaggle_3m" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_1.tif",
        SHARED_DATA / "lung_nodule_ct_slices" / "LIDC-IDRI-slices" / "LIDC-IDRI-0001" / "nodule-0" / "images" / "slice-0.png"]
TOL = 1e-5   # probabilities, fp32: the separable resize sums in another order than torch's kernel


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic_shards) -> dict:
    """A 1-channel and a 3-channel model (different means), each exported as the full graph."""
    import onnxruntime as ort
    d = tmp_path_factory.mktemp("full")
    out = {}
    for c, mean, std in ((1, (0.25,), (0.15,)), (3, (0.4,), (0.2,))):
        ckpt = make_checkpoint(d / f"c{c}.pt", tiny_config(size=64, in_channels=c, data=synthetic_shards,
                                                            mean=mean, std=std), seed=c)
        onnx_path = d / f"c{c}.onnx"
        assert export.main(["--checkpoint", str(ckpt), "--onnx", str(onnx_path)]) == 0
        out[c] = (load_model(ckpt), ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),
                  onnx_path)
    return out


def graph(sess, raw: np.ndarray) -> np.ndarray:
    return sess.run(None, {"image": raw if raw.ndim == 3 else raw[:, :, None]})[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_full_graph_equals_the_predictor_on_real_images(exported, channels):
    model, sess, _ = exported[channels]
    for path in REAL:
        raw = read_array(path, str(path))
        want = model.probability_map(read_image(path)).numpy()
        got = graph(sess, raw)
        assert got.shape == (1, *raw.shape[:2]), path.name
        assert np.abs(got[0] - want).max() < TOL, (path.name, np.abs(got[0] - want).max())


@pytest.mark.parametrize("layout", ["grey", "grey+alpha", "rgb", "rgba"])
def test_every_channel_layout_is_handled_as_the_predictor_does(exported, layout):
    """Grey repeated for a 3-channel model, colour to luma for a 1-channel one, alpha dropped;
    random pixels at a non-square size above and below the tile."""
    c = {"grey": 1, "grey+alpha": 2, "rgb": 3, "rgba": 4}[layout]
    rng = np.random.default_rng(c)
    for channels in (1, 3):
        model, sess, _ = exported[channels]
        for shape in ((90, 77), (40, 150)):
            raw = rng.integers(0, 256, (*shape, c), dtype=np.uint8)
            want = model.probability_map(raw.astype(np.float32) / 255).numpy()
            assert np.abs(graph(sess, raw)[0] - want).max() < TOL, (layout, channels, shape)


def test_declared_signature_is_dynamic_in_height_and_width(exported):
    import onnx
    _, sess, path = exported[3]
    proto = onnx.load(str(path))
    assert declared(proto) == ([["height", "width", "channels"]], [[1, "height", "width"]])
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    # shape inference agrees with the declaration, and ties the output's dims to the input's
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    assert declared(inferred)[1] == [[1, "height", "width"]]
    props = {p.key: p.value for p in proto.metadata_props}
    assert (props["tumorseg_dist.graph"], props["tumorseg_dist.pixels"], props["tumorseg_dist.out_channels"]) \
        == ("full", "uint8", "1")
    # Two different sizes through one session: the dims are really free.
    for h, w in ((64, 64), (333, 97)):
        assert graph(sess, np.zeros((h, w, 3), np.uint8)).shape == (1, h, w)


def test_sixteen_bit_export_matches_on_sixteen_bit_pixels(tmp_path, synthetic_shards):
    import onnxruntime as ort
    ckpt = make_checkpoint(tmp_path / "c.pt", tiny_config(size=64, data=synthetic_shards))
    src = tmp_path / "ct16.tif"
    import tifffile
    raw = np.random.default_rng(0).integers(0, 65536, (70, 100), dtype=np.uint16)
    tifffile.imwrite(src, raw, photometric="minisblack")
    out = tmp_path / "m16.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(out), "--pixels", "uint16",
                        "--input", str(src)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint16)"
    want = load_model(ckpt).probability_map(read_image(src)).numpy()
    assert np.abs(graph(sess, raw)[0] - want).max() < TOL


class ThreeClasses(torch.nn.Module):
    """A K = 3 network (what issue 17's K-class models output): the graph reads K from it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) * 4


def test_a_k_class_network_gets_softmax_probabilities_at_the_input_size(tmp_path):
    import onnxruntime as ort
    from tumorseg_dist.jobs.export import full_proto, torch_probabilities
    model = Predictor(model=ThreeClasses().eval(), arch="unet", encoder="resnet18", in_channels=3,
                      size=32, mean=(0.5,) * 3, std=(0.25,) * 3, threshold=0.5, device=torch.device("cpu"))
    proto = full_proto(model, 32, 18, "uint8", torch.zeros(1, 3, 32, 32))
    assert declared(proto) == ([["height", "width", "channels"]], [[3, "height", "width"]])
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    raw = np.random.default_rng(1).integers(0, 256, (45, 71, 3), dtype=np.uint8)
    got = graph(sess, raw)
    assert got.shape == (3, 45, 71)
    assert np.allclose(got.sum(0), 1, atol=1e-5)
    want = torch_probabilities(model, raw.astype(np.float32) / 255, "whole")
    assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize("flags, message", [
    (["--dynamic-batch"], "--dynamic-batch applies to --graph network"),
    (["--opset", "17"], "--graph full needs --opset 18 or later"),
])
def test_flags_that_do_not_fit_the_full_graph_are_one_line(tmp_path, flags, message, capsys):
    out = tmp_path / "x.onnx"
    with pytest.raises(SystemExit) as e:  # refused while parsing the flags, before torch loads
        export.main(["--checkpoint", str(tmp_path / "c.pt"), "--onnx", str(out), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
