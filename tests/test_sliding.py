"""Sliding-window inference (`--inference sliding`): the tile layout, the Gaussian weights, the
stitching (a constant-logit model gives its constant back everywhere, borders included), flip
TTA composed with the window, bounded memory on a huge image, and evaluate/predict end to end."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import REPO
from inference_testing import make_checkpoint, tiny_config
from tumorseg_dist import evaluate, predict
from tumorseg_dist.data.batch import to_channels
from tumorseg_dist.data.shards import IndexedShards, read_sample, shard_paths
from tumorseg_dist.inference import (WEIGHT_FLOOR, Predictor, gaussian_weights, load_model,
                                     sliding_window_probs, tile_starts)

MEAN, STD = 0.3, 0.2


class Constant(nn.Module):
    """Logit c at every pixel, whatever the input."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[-2:]), self.c, dtype=x.dtype)


def conv_model(in_channels: int, kernel: int, seed: int = 0) -> nn.Module:
    """A random convolution: translation-equivariant (exactly so for kernel 1), and for
    kernel > 1 not flip-symmetric."""
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, 1, kernel, padding=kernel // 2).eval()


def predictor(model: nn.Module, size: int = 64, in_channels: int = 1) -> Predictor:
    return Predictor(model=model, arch="unet", encoder="test", in_channels=in_channels, size=size,
                     mean=(MEAN,) * in_channels, std=(STD,) * in_channels, threshold=0.5,
                     device=torch.device("cpu"))


def rand_image(h: int, w: int, *channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, *channels), dtype=np.float32)


# ---------------------------------------------------------------- layout and weights

@pytest.mark.parametrize("length", [64, 65, 100, 127, 128, 129, 200, 701, 1000])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_tiles_cover_the_axis_flush_with_both_ends_and_mirror_symmetric(length, overlap):
    size = 64
    starts = tile_starts(length, size, overlap)
    step = int(size * (1 - overlap) + 1e-9)  # whole pixels, so the overlap is at least the asked one
    assert starts[0] == 0 and starts[-1] == length - size
    assert all(0 < b - a <= step for a, b in zip(starts, starts[1:])), starts
    assert sorted(length - size - s for s in starts) == starts
    # the fewest tiles the step allows (one more only where symmetry needs it)
    fewest = -(-(length - size) // step) + 1
    assert len(starts) in (fewest, fewest + 1) if length > size else starts == [0]


def test_tile_layout_examples():
    assert tile_starts(128, 64, 0.5) == [0, 32, 64]
    assert tile_starts(128, 64, 0.0) == [0, 64]
    assert tile_starts(40, 64, 0.5) == [0]  # smaller than a tile: padded to one tile
    assert len(tile_starts(3000, 128, 0.5)) == 46  # ceil(2872 / 64) + 1


@pytest.mark.parametrize("size", [32, 64, 65])
def test_gaussian_weights_are_symmetric_and_peak_in_the_centre(size):
    g = gaussian_weights(size)
    assert g.shape == (size, size) and g.dtype == torch.float32
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1)) and torch.equal(g, g.T)
    c = (size - 1) // 2
    assert g[c, c] == g.max() == 1.0 and g[(size - 1) - c, (size - 1) - c] == 1.0
    row = g[c, :c + 1]  # rising from the edge to the centre, floored at the rim
    assert bool((row[1:] >= row[:-1]).all()) and row[-1] > row[size // 4] > row[0]
    assert g.min() == pytest.approx(WEIGHT_FLOOR)
    # sigma = size / 8: one sigma from the centre the weight is e^-1/2 of the peak
    if size % 2:
        assert float(g[c, c + size // 8]) == pytest.approx(np.exp(-0.5 * ((size // 8) / (size / 8)) ** 2), rel=1e-6)


# ---------------------------------------------------------------- stitching

@pytest.mark.parametrize("shape", [(100, 130), (64, 64), (65, 200), (20, 37), (1, 1), (40, 300),
                                   (77, 91, 3)])
@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_a_constant_logit_model_gives_its_probability_everywhere(shape, overlap):
    """Sizes not a multiple of the step, smaller than a tile (padded), a colour image into a
    3-channel model: every pixel, borders and corners included, is sigmoid(c)."""
    c = 1.3
    image = rand_image(*shape)
    probs = predictor(Constant(c), in_channels=3).sliding_probabilities(image, overlap=overlap, batch_size=5)
    assert probs.shape == shape[:2] and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.full(shape[:2], torch.sigmoid(torch.tensor(c)).item()),
                               atol=1e-6, rtol=0)


def test_a_pointwise_model_gives_the_full_image_map_at_every_pixel():
    """A 1×1 convolution is exactly translation-equivariant, so each tile's output is the crop
    of the full-image output: a tile stitched at the wrong place, a wrong channel or
    normalisation, or a wrong weighting shows."""
    model = conv_model(3, 1)
    image = rand_image(150, 211)  # grey into a 3-channel model: repeated, as training did
    got = predictor(model, in_channels=3).sliding_probabilities(image, batch_size=4)
    t = to_channels(torch.from_numpy(image)[None], 3)
    with torch.no_grad():
        want = torch.sigmoid(model(((t - MEAN) / STD)[None]))[0, 0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [(), (3,)])
def test_sliding_equals_whole_on_an_image_of_exactly_tile_size(channels):
    p = predictor(conv_model(1, 3), size=64)
    image = rand_image(64, 64, *channels)
    whole = p.probability_map(image, inference="whole")
    sliding = p.probability_map(image, inference="sliding")
    torch.testing.assert_close(sliding, whole, atol=1e-6, rtol=0)
    assert np.array_equal(p.predict_image(image, inference="sliding"), (sliding > 0.5).numpy())


@pytest.mark.parametrize("shape", [(150, 151), (40, 40), (129, 64)])
def test_flip_tta_composes_with_the_window(shape):
    """A mirror-symmetric image gives a mirror-symmetric map under flip TTA, whatever the
    model, because the tile layout is mirror-symmetric too. Without TTA this model's map is
    not symmetric, so the check has teeth."""
    p = predictor(conv_model(1, 7, seed=3), size=64)
    a = rand_image(*shape, seed=1)
    image = (a + a[::-1] + a[:, ::-1] + a[::-1, ::-1]) / 4
    m = p.sliding_probabilities(image, tta=True, batch_size=3)
    for dims in ((0,), (1,)):
        torch.testing.assert_close(m, m.flip(dims), atol=1e-6, rtol=0)
    plain = p.sliding_probabilities(image, tta=False, batch_size=3)
    assert (plain - plain.flip(1)).abs().max() > 1e-3


def test_flip_tta_of_a_constant_model_is_the_constant():
    probs = predictor(Constant(-0.7)).sliding_probabilities(rand_image(90, 70), tta=True)
    torch.testing.assert_close(probs, torch.full((90, 70), torch.sigmoid(torch.tensor(-0.7)).item()),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("overlap", [1.0, -0.1, float("nan")])
def test_the_predictor_refuses_a_bad_overlap(overlap):
    with pytest.raises(ValueError, match="--overlap"):
        predictor(Constant(0.0)).sliding_probabilities(rand_image(80, 80), overlap=overlap)


def test_the_predictor_refuses_an_unknown_inference_mode():
    with pytest.raises(ValueError, match="--inference"):
        predictor(Constant(0.0)).probability_map(rand_image(80, 80), inference="tiles")


# ---------------------------------------------------------------- memory on a huge image

class Watched(nn.Module):
    """A constant-logit model that records, at each forward, how many tile batches (inputs
    and outputs it has seen) are still alive and how large the input's storage is: tiles
    streamed in batches keep this at one or two; tiles cut from one big tensor, or all
    outputs kept until the end, make it grow with the image."""

    def __init__(self, c: float):
        super().__init__()
        self.c, self.alive, self.max_alive, self.max_storage, self.max_batch, self.calls = c, set(), 0, 0, 0, 0

    def _watch(self, t: torch.Tensor) -> None:
        key = object()
        self.alive.add(key)
        weakref.finalize(t, self.alive.discard, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.max_batch = max(self.max_batch, x.shape[0])
        self.max_storage = max(self.max_storage, x.untyped_storage().nbytes())
        self._watch(x)
        self.max_alive = max(self.max_alive, len(self.alive))
        out = torch.full((x.shape[0], 1, *x.shape[-2:]), self.c, dtype=x.dtype)
        self._watch(out)
        return out


@pytest.fixture
def one_thread():
    """Hundreds of small elementwise ops: on a busy 2-core box, intra-op threads waiting for
    each other cost ten times the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_huge_image_streams_its_tiles_and_still_gives_the_constant(one_thread):
    h, w, size, batch = 4000, 3000, 256, 6
    model = Watched(2.0)
    probs = sliding_window_probs(model, np.zeros((h, w), np.float32), in_channels=3, size=size,
                                 mean=(MEAN,) * 3, std=(STD,) * 3, overlap=0.5, batch_size=batch)
    tiles = len(tile_starts(h, size, 0.5)) * len(tile_starts(w, size, 0.5))
    assert tiles > 700 and model.calls == -(-tiles // batch)
    assert model.max_batch == batch
    assert model.max_storage == batch * 3 * size * size * 4  # its own batch, not a view of all tiles
    assert model.max_alive <= 2  # this batch's input, at most the previous batch's probabilities
    assert probs.shape == (h, w)
    assert float(probs.min()) == pytest.approx(float(probs.max()), abs=1e-6)
    assert float(probs[0, 0]) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))), abs=1e-6)


def test_a_huge_image_allocates_the_accumulator_and_weights_and_little_more():
    """Peak resident memory of a fresh process while a 4000×3000 grey image goes through a
    3-channel model: the accumulator and weight map (2 × H × W float32, 92 MiB) plus a margin
    of 48 MiB (one batch of tiles and its copies take ~10 MiB; measured 102 MiB in all). Materialising the tiles (713 of 256², 186 MiB per channel) or a full-size
    3-channel normalised copy (137 MiB) would not fit."""
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np, torch
        sys.path.insert(0, "tests")
        from test_sliding import Constant, MEAN, STD
        from tumorseg_dist.inference import sliding_window_probs
        torch.set_num_threads(1)
        kw = dict(in_channels=3, size=256, mean=(MEAN,) * 3, std=(STD,) * 3, overlap=0.5, batch_size=4)
        sliding_window_probs(Constant(0.5), np.zeros((600, 600), np.float32), **kw)  # warm up torch
        image = np.random.default_rng(0).random((4000, 3000), dtype=np.float32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        probs = sliding_window_probs(Constant(0.5), image, **kw)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert probs.shape == (4000, 3000)
        print((after - before) * 1024)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                         # freed batches go back to the system at once, so the peak
                                         # is what was held, not glibc's heap high-water mark
                                         "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert p.returncode == 0, p.stderr[-3000:]
    grown = int(p.stdout.split()[-1])
    maps = 2 * 4000 * 3000 * 4
    assert grown < maps + (48 << 20), f"peak grew by {grown / 2**20:.0f} MiB"


@pytest.mark.slow   # ~20 s of CPU, over a minute on a loaded 2-core box
def test_a_10000_square_image_predicts_in_a_few_tiles_and_two_maps_of_memory():
    """Issue 15: a 10000×10000 image through `Predictor.predict_image(inference="sliding")`
    (tiles of 512, 26 × 26 of them, 4 per batch, a 3×3 convolution) in a fresh process. Peak
    resident memory may grow by the accumulator and weight sum (2 × 10⁸ float32, 763 MiB), the
    boolean mask returned (95 MiB) and 64 MiB for a few batches of tiles and their copies; the
    model never sees more than one batch, and its largest activation is one batch of tiles.
    Holding every tile (676 × 1 MiB per channel) or one more full-size float map (381 MiB)
    would not fit."""
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np, torch
        sys.path.insert(0, "tests")
        from test_sliding import conv_model, predictor
        torch.set_num_threads(1)
        model = conv_model(1, 3)
        seen = {"batch": 0, "numel": 0}
        def hook(module, inputs, output):
            seen["batch"] = max(seen["batch"], inputs[0].shape[0])
            seen["numel"] = max(seen["numel"], output.numel(), inputs[0].numel())
        for m in model.modules():
            m.register_forward_hook(hook)
        pred = predictor(model, size=512)
        pred.predict_image(np.zeros((700, 700), np.float32), inference="sliding", batch_size=4)
        n = 10000
        image = np.zeros((n, n), np.float32)
        image[::7] = 0.8                                  # touched: resident before the count
        seen["batch"] = seen["numel"] = 0
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mask = pred.predict_image(image, inference="sliding", overlap=0.25, batch_size=4)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert mask.shape == (n, n) and mask.dtype == np.bool_
        print(seen["batch"], seen["numel"], (after - before) * 1024)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                         "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert p.returncode == 0, p.stderr[-3000:]
    batch, numel, grown = (int(v) for v in p.stdout.split()[-3:])
    assert batch == 4
    assert numel <= 4 * 512 * 512                         # one batch of one-channel tiles
    n = 10000
    allowed = 2 * n * n * 4 + n * n + (64 << 20)
    assert grown < allowed, f"peak grew by {grown / 2**20:.0f} MiB (allowed {allowed / 2**20:.0f})"


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory, synthetic_shards) -> Path:
    """A real checkpoint trained (here: made) at 32 px, for the 64 px synthetic images: 3×3
    tiles per image at overlap 0.5."""
    d = tmp_path_factory.mktemp("ckpt32")
    return make_checkpoint(d / "checkpoints" / "best.pt",
                           tiny_config(size=32, in_channels=3, data=synthetic_shards))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_sliding_scores_at_the_original_size_and_records_how(ckpt32, synthetic_shards):
    assert evaluate.main(["--checkpoint", str(ckpt32), "--inference", "sliding", "--overlap", "0.25",
                          "--batch-size", "9", "--workers", "0", "--device", "cpu", "--cases", "1"]) == 0
    out = ckpt32.parent.parent / "eval-test-sliding"  # beside, never over, the whole-image scores
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["inference"], metrics["overlap"], metrics["resolution"]) == ("sliding", 0.25, "original")
    assert (out / "cases.png").is_file()
    model = load_model(ckpt32)
    ds = IndexedShards(shard_paths(synthetic_shards, "test"))
    rows = {r["key"]: r for r in read_csv(out / "per_image.csv")}
    assert len(rows) == len(ds) > 0
    for i in range(len(ds)):
        s = read_sample(ds, i)
        pred = model.predict_image(s.image, inference="sliding", overlap=0.25, batch_size=9)
        assert pred.shape == s.mask.shape  # the original size
        assert int(rows[s.key]["target_area"]) == int((s.mask > 0).sum())
        assert int(rows[s.key]["prediction_area"]) == int(pred.sum())
    assert evaluate.main(["--checkpoint", str(ckpt32), "--workers", "0", "--device", "cpu",
                          "--cases", "0"]) == 0
    whole = json.loads((ckpt32.parent.parent / "eval-test" / "metrics.json").read_text())
    assert (whole["inference"], whole["overlap"]) == ("whole", None)


def test_predict_sliding_writes_masks_at_each_original_size(tmp_path, ckpt32, synthetic_shards):
    src = tmp_path / "in"
    src.mkdir()
    images = {"grey_odd.png": (np.random.default_rng(0).integers(0, 256, (45, 71)), "L"),
              "rgb.png": (np.random.default_rng(1).integers(0, 256, (40, 90, 3)), "RGB"),
              "small.png": (np.random.default_rng(2).integers(0, 256, (20, 26)), "L")}  # < a tile
    for name, (arr, mode) in images.items():
        Image.fromarray(arr.astype(np.uint8), mode=mode).save(src / name)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(ckpt32), str(src), str(synthetic_shards), "--split", "test",
                         "--out", str(out), "--inference", "sliding", "--batch-size", "16",
                         "--workers", "0", "--device", "cpu", "--tta", "--overlay"]) == 0
    model = load_model(ckpt32)
    from tumorseg_dist.imageio import read_image
    for name, (arr, _) in images.items():
        mask = np.asarray(Image.open(out / "masks" / name)) > 0
        assert mask.shape == arr.shape[:2]
        want = model.predict_image(read_image(src / name), tta=True, inference="sliding", batch_size=16)
        assert np.array_equal(mask, want), name
    rows = read_csv(out / "areas.csv")
    assert len(rows) == len(images) + len(IndexedShards(shard_paths(synthetic_shards, "test")))
    for r in rows:
        m = np.asarray(Image.open(out / r["mask"]))
        assert m.shape == (int(r["height"]), int(r["width"]))
        assert (out / "overlays" / Path(r["mask"]).relative_to("masks")).is_file()


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_a_bad_overlap_is_one_line_and_exit_2(command, value, capsys):
    main = {"evaluate": evaluate.main, "predict": predict.main}[command]
    needed = ["--checkpoint", "c"] + (["i", "--out", "o"] if command == "predict" else [])
    with pytest.raises(SystemExit) as e:
        main(needed + ["--inference", "sliding", "--overlap", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{command}: error: --overlap "), err
    assert value in err


def test_sliding_with_model_resolution_and_an_unknown_mode_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "c", "--inference", "sliding", "--resolution", "model"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--inference sliding" in err and "--resolution" in err, err
    with pytest.raises(SystemExit) as e:
        predict.main(["i", "--checkpoint", "c", "--out", "o", "--inference", "tiles"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiles" in err, err
