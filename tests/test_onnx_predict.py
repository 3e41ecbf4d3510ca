"""predict --onnx: the whole predictor (whole, sliding, flip TTA) on onnxruntime, without torch,
equal to the PyTorch predictor on real images; bad .onnx files are one line naming the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED_DATA
from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import export, predict
from tumorseg_dist.imageio import read_image
from tumorseg_dist.inference import load_model
from tumorseg_dist.onnx_predictor import load_onnx

# Real images of three layouts and sizes: RGB ultrasound 701×526 and 558×462, grey MRI 512²,
# an RGB TIFF 256².
IMAGES = [SHARED_DATA / "busi" / "dataset" / "benign" / "benign (15).png",
          SHARED_DATA / "busi" / "dataset" / "benign" / "benign (16).png",
          SHARED_DATA / "images_masks_folders" / "data" / "temp" / "1001.png",
          SHARED_DATA / "lgg_kaggle_3m" / "kaggle_3m" / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_1.tif"]
TOL = 1e-5   # probabilities (fp32); masks may differ only where torch's probability is this close to the threshold
MODES = [("whole", False), ("sliding", False), ("whole", True), ("sliding", True)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, synthetic_shards):
    d = tmp_path_factory.mktemp("onnx")
    ckpt = make_checkpoint(d / "best.pt", tiny_config(size=64, in_channels=3, data=synthetic_shards))
    onnx_path = d / "model.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--onnx", str(onnx_path)]) == 0
    return ckpt, onnx_path


def near_threshold_only(got: np.ndarray, want: np.ndarray, prob: np.ndarray, t: float) -> None:
    differ = got != want
    assert (np.abs(prob[differ] - t) <= TOL).all(), "a mask pixel differs away from the threshold"
    assert differ.mean() < 1e-4


def test_predict_onnx_runs_without_torch_and_equals_the_pytorch_predictor(tmp_path, models):
    """One subprocess runs `predict --onnx` twice, whole on every image and sliding with flip
    TTA on the TIFF (25 tiles × 4 flips), and reports whether torch was imported; its masks are
    then compared with the PyTorch predictor's."""
    ckpt, onnx_path = models
    model = load_model(ckpt)
    runs = {"whole": (IMAGES, []), "sliding": (IMAGES[3:], ["--inference", "sliding", "--overlap", "0.25", "--tta"])}
    calls = [[*map(str, images), "--onnx", str(onnx_path), "--out", str(tmp_path / name), *flags]
             for name, (images, flags) in runs.items()]
    script = ("import json, sys; from tumorseg_dist import predict; "
              "rcs = [predict.main(a) for a in json.loads(sys.argv[1])]; "
              "print(json.dumps({'rc': rcs, 'torch': 'torch' in sys.modules}))")
    p = subprocess.run([sys.executable, "-c", script, json.dumps(calls)], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": [0, 0], "torch": False}, p.stderr[-2000:]
    for name, (images, _) in runs.items():
        sliding = name == "sliding"
        for path in images:
            got = np.asarray(Image.open(tmp_path / name / "masks" / f"{path.stem}.png")) > 0
            prob = model.probability_map(read_image(path), sliding, name, 0.25).numpy()
            assert got.shape == prob.shape
            near_threshold_only(got, prob > model.threshold, prob, model.threshold)


def test_onnx_probabilities_equal_the_pytorch_predictors(models):
    ckpt, onnx_path = models
    model, onnx_model = load_model(ckpt), load_onnx(onnx_path)
    assert (onnx_model.size, onnx_model.in_channels, onnx_model.out_channels, onnx_model.threshold) == \
        (model.size, model.in_channels, 1, model.threshold)
    image = read_image(IMAGES[3])[:150, :200]   # 4 × 5 tiles at overlap 0.5
    small = read_image(IMAGES[2])[:40, :50]     # padded to one tile when sliding
    for img in (image, small):
        for inference, tta in MODES:
            want = model.probability_map(img, tta, inference, 0.5).numpy()
            got = onnx_model.probability_map(img, tta, inference, 0.5)
            assert got.shape == want.shape and np.abs(got - want).max() < TOL, (inference, tta, img.shape)
            mask = onnx_model.predict_image(img, tta, None, inference, 0.5)
            near_threshold_only(mask, want > model.threshold, want, model.threshold)


def test_a_sixteen_bit_image_into_an_eight_bit_model_is_a_clear_error(models):
    onnx_model = load_onnx(models[1])
    img16 = (np.arange(64 * 64, dtype=np.float32).reshape(64, 64) * 7 % 65535) / 65535
    with pytest.raises(ValueError, match="has 16-bit pixel values.*--pixels uint16"):
        onnx_model.probability_map(img16)


def _bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    import onnx
    from onnx import TensorProto as T, helper as h
    text = tmp / "notes.onnx"
    text.write_text("not a model\n")
    g = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "other",
                     [h.make_tensor_value_info("x", T.FLOAT, [1])], [h.make_tensor_value_info("y", T.FLOAT, [1])])
    other = tmp / "other.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]), str(other))
    proto = onnx.load(str(good))
    network = tmp / "network.onnx"
    for p in proto.metadata_props:
        if p.key == "tumorseg_dist.graph":
            p.value = "network"
    onnx.save(proto, str(network))
    proto = onnx.load(str(good))
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 99
    opset = tmp / "opset99.onnx"
    onnx.save(proto, str(opset))
    proto = onnx.load(str(good))
    keep = [p for p in proto.metadata_props if p.key != "tumorseg_dist.pixels"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    nometa = tmp / "no-pixels.onnx"
    onnx.save(proto, str(nometa))
    return {"missing": (tmp / "nope.onnx", "no such file"), "text": (text, "cannot load it"),
            "not ours": (other, "has no tumorseg_dist metadata"),
            "bare network": (network, "is the bare network"), "opset": (opset, "cannot load it"),
            "metadata": (nometa, "lacks tumorseg_dist.pixels")}


def test_bad_onnx_files_are_one_line_naming_the_file(tmp_path, models, capsys):
    img = IMAGES[3]
    for case, (path, message) in _bad_files(tmp_path, models[1]).items():
        out = tmp_path / f"out-{case}"
        assert predict.main([str(img), "--onnx", str(path), "--out", str(out)]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and message in err, (case, err)
        assert not out.exists(), case  # refused before anything is written


def test_onnx_and_checkpoint_together_or_neither_are_usage_errors(tmp_path, models, capsys):
    for flags, message in ((["--onnx", str(models[1]), "--checkpoint", str(models[0])], "leave --checkpoint out"),
                           ([], "or --onnx model.onnx")):
        with pytest.raises(SystemExit) as e:
            predict.main([str(IMAGES[3]), "--out", str(tmp_path / "o"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_onnx_predictor_and_the_image_reader_import_no_torch():
    code = ("import sys; import tumorseg_dist.onnx_predictor, tumorseg_dist.imageio, tumorseg_dist.jobs.predict; "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "False", p.stderr
