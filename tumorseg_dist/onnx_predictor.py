"""The predictor on onnxruntime, for `predict --onnx` and deployments: numpy and onnxruntime only,
never torch (a test runs `predict --onnx` and checks that torch was not imported).

It runs a model written by `export` (`--graph full`, the default): one ONNX graph from the raw
image (uint8 or uint16, H×W×C) to the probability map at the image's own size, with the
channel handling, normalisation and resize of `inference.Predictor`'s `whole` mode inside
(docs/inference.md, "export"). Around it, as the torch predictor does: flip TTA (the graph on
each flip, un-flipped, averaged) and the sliding window, where the graph is one tile-step (a
tile of the training size in, its probabilities out; the resize is then the identity), stitched
with the same Gaussian weights and tile layout, which live here so both predictors share them.

An image reaches `probability_map` as the torch predictor gets it, in [0, 1] (imageio.read_image,
shards.read_sample); it is turned back into the graph's pixel type exactly (x × 255 or × 65535 is
an integer for every 8- or 16-bit image), so both predictors see the same pixels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .options import check_overlap

GRAPH_FORMAT = 1      # tumorseg_dist.format of a full graph: what this module knows how to run
MIN_OPSET = 18        # Resize with sizes and the Range/MatMul resize of the full graph
FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (0,), (0, 1))   # H×W(×C) axes; inference.FLIPS on [.., H, W]
PIXEL_SCALE = {"uint8": 255.0, "uint16": 65535.0}

# nnU-Net's importance weighting: sigma = tile size / 8, so a tile's centre counts most and its
# rim, where the model sees the least context (and a padded border), hardly at all.
SIGMA_SCALE = 1 / 8
# The Gaussian falls to e^-8 at the middle of a tile's edge and e^-16 at its corners; an image
# corner is covered by one tile corner only, so without a floor its probability would be a
# ratio of two ~1e-7 numbers. 1e-3 of the peak keeps every division well conditioned and changes
# the weighting only in the outer ~4 % of a tile, where a neighbour's centre dominates anyway.
WEIGHT_FLOOR = 1e-3


class OnnxModelError(ValueError):
    """An .onnx file this predictor cannot run: one line naming the file, the problem and the fix."""


# ---------------------------------------------------------------- the window (shared with inference.py)

def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Where the tiles start along an axis of `length` pixels (padded to >= size): the fewest
    tiles whose step is at most size × (1 - overlap), spread evenly from flush with the start to
    flush with the end (as nnU-Net does), so no tile hangs over the border.

    The layout is mirror-symmetric (a tile at s has a twin at length - size - s), so flipping
    the image flips the layout: flip TTA then composes with the window exactly."""
    span = length - size
    if span <= 0:
        return [0]
    check_overlap(overlap)
    step = max(1, math.floor(size * (1.0 - overlap) + 1e-9))  # (1 - 0.9) * 100 is 9.99..: still 10
    n = math.ceil(span / step) + 1
    if n % 2 and span % 2:  # an odd middle tile is symmetric only on an even span: one more tile
        n += 1
    first = [math.floor(i * span / (n - 1) + 0.5) for i in range((n + 1) // 2)]
    return first + [span - s for s in reversed(first[:n // 2])]


def gaussian_weights(size: int) -> np.ndarray:
    """[size, size] float32 importance map: a Gaussian of sigma size/8 centred on the tile
    (peak 1, at the middle pixel or the middle four), floored at WEIGHT_FLOOR."""
    d = np.arange(size, dtype=np.float64) - (size - 1) / 2  # exact: ±d on mirrored pixels
    g = np.exp(-d ** 2 / (2 * (size * SIGMA_SCALE) ** 2))
    g = np.outer(g, g)
    return np.maximum(g / g.max(), WEIGHT_FLOOR).astype(np.float32)


def pad_to_tile(arr: np.ndarray, size: int) -> tuple[np.ndarray, int, int]:
    """H×W×C -> at least size×size, reflected and centred (see inference.sliding_window_probs
    for why a reflection), with the offsets (top, left) of the image inside it."""
    h, w = arr.shape[:2]
    top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
    if h < size or w < size:
        arr = np.pad(arr, ((top, max(size - h, 0) - top), (left, max(size - w, 0) - left), (0, 0)),
                     mode="reflect")
    return arr, top, left


# ---------------------------------------------------------------- the tile scale (shared with inference.py)

# The scale the sliding window cuts its tiles at: the scale the model trained at. A
# `--geometry crop --crop-scale resize` model saw images whose short side was resized to the
# size, so its tiles come from the image at that scale ("short-side") and the stitched map is
# resized back; every other model is tiled at the image's own resolution ("native": a crop
# model at native scale trained there; squash and letterbox models trained on whole images,
# and sliding them is the user's choice of native detail).
TILE_SCALES = ("native", "short-side")


def tile_scale(geometry: str, crop_scale: str) -> str:
    """The tile scale of a model trained with this data.geometry and data.crop_scale."""
    return "short-side" if geometry == "crop" and crop_scale == "resize" else "native"


def tiled_shape(height: int, width: int, size: int, scale: str) -> tuple[int, int]:
    """(H, W) of the image the tiles are cut from: data/geometry.scaled_size's crop placement
    (short side to size, rounded half up) for "short-side", the image's own for "native"."""
    if scale == "native":
        return height, width
    if scale != "short-side":
        raise ValueError(f"tile scale must be one of {', '.join(TILE_SCALES)}, got {scale!r}")
    r = size / min(height, width)
    return max(1, math.floor(height * r + 0.5)), max(1, math.floor(width * r + 0.5))


def resize_weights(n: int, m: int) -> np.ndarray:
    """[m, n] float32 weights of an antialiased bilinear resize of an axis from n to m pixels,
    as F.interpolate(mode="bilinear", antialias=True) computes them (the triangle filter,
    stretched by the scale when shrinking, normalised per output pixel; enlarging, plain
    half-pixel bilinear with the edge clamped). The full graph builds the same in ONNX ops."""
    scale = n / m
    centre = scale * (np.arange(m, dtype=np.float64) + 0.5)
    d = (np.arange(n, dtype=np.float64)[None] + 0.5 - centre[:, None]) / max(scale, 1.0)
    w = np.maximum(0.0, 1.0 - np.abs(d))
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resize_hw(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, ...] float32 -> [height, width, ...] by `resize_weights` on both axes."""
    if a.shape[:2] == (height, width):
        return a
    a = np.tensordot(resize_weights(a.shape[0], height), a, axes=(1, 0))
    return np.moveaxis(np.tensordot(resize_weights(a.shape[1], width), a, axes=(1, 1)), 0, 1)


def at_tile_scale(image: np.ndarray, size: int, scale: str) -> np.ndarray:
    """A [0, 1] H×W or H×W×C image at its tile scale (`tiled_shape`; the image itself at
    "native"): resized by `resize_hw`, then put back on its pixel grid."""
    h, w = image.shape[:2]
    th, tw = tiled_shape(h, w, size, scale)
    if (th, tw) == (h, w):
        return image
    arr = np.asarray(image, dtype=np.float32)
    grid = 255.0 if np.abs(arr * 255.0 - np.rint(arr * 255.0)).max(initial=0.0) <= 1e-3 else 65535.0
    out = np.clip(resize_hw(arr, th, tw), 0.0, 1.0)
    return (np.rint(out * np.float32(grid)) / np.float32(grid)).astype(np.float32)


def map_back(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., h, w] probabilities stitched at the tile scale -> [..., height, width] (`resize_hw`,
    antialiased where they shrink)."""
    if probs.shape[-2:] == (height, width):
        return probs
    lead = probs.ndim - 2
    hw_first = np.moveaxis(probs, (-2, -1), (0, 1))
    return np.ascontiguousarray(np.moveaxis(resize_hw(hw_first, height, width), (0, 1), (lead, lead + 1)))


def resolve_threshold(flag: float | None, model: Any) -> float:
    """--threshold if given, else the one the model was trained and validated with."""
    t = model.threshold if flag is None else flag
    if not 0.0 < t < 1.0:
        raise ValueError(f"--threshold must be strictly between 0 and 1, got {t}")
    return t


# ---------------------------------------------------------------- the predictor

@dataclass
class OnnxPredictor:
    """An onnxruntime session of a full graph and what its metadata says about it."""

    session: Any
    path: Path
    arch: str
    encoder: str
    in_channels: int
    out_channels: int
    size: int
    pixels: str            # the graph's input type: uint8 or uint16
    threshold: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()   # by class id; () for a file exported before they were kept
    tile_scale: str = "native"          # TILE_SCALES; "native" for a file exported before it was kept

    pre = None             # the graph preprocesses: callers hand it the image itself

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.encoder}" if self.encoder else self.arch

    def pixels_of(self, image: np.ndarray, source: str = "") -> np.ndarray:
        """A [0, 1] float image (H×W or H×W×C) -> H×W×C in the graph's pixel type, exactly."""
        arr = np.asarray(image, dtype=np.float32)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if arr.ndim != 3 or not 1 <= arr.shape[2] <= 4:
            raise ValueError(f"{source or 'image'}: shape {np.shape(image)} is not H×W or H×W×C "
                             f"with 1 to 4 channels")
        scaled = arr * PIXEL_SCALE[self.pixels]
        raw = np.rint(scaled)
        if self.pixels == "uint8" and np.abs(scaled - raw).max(initial=0.0) > 1e-3:
            raise ValueError(f"{source or 'image'}: has 16-bit pixel values, but {self.path} was "
                             f"exported for 8-bit images; re-export with --pixels uint16")
        return raw.astype(self.pixels)

    def run(self, raw: np.ndarray) -> np.ndarray:
        """The graph once: H×W×C raw pixels -> [K, H, W] float32 probabilities."""
        return self.session.run(["probabilities"], {"image": np.ascontiguousarray(raw)})[0]

    def flipped_mean(self, raw: np.ndarray, tta: bool) -> np.ndarray:
        """The graph's output; with tta, the mean over the four flips, each un-flipped (as
        inference.flip_tta_probs, on the raw image: the graph commutes with flips)."""
        if not tta:
            return self.run(raw)
        acc = None
        for axes in FLIPS:
            p = self.run(np.flip(raw, axes) if axes else raw)
            p = np.flip(p, tuple(a + 1 for a in axes)) if axes else p
            acc = p if acc is None else acc + p
        return acc / len(FLIPS)

    def sliding(self, raw: np.ndarray, tta: bool, overlap: float) -> np.ndarray:
        """[K, H, W] probabilities from tiles of the training size, stitched as
        inference.sliding_window_probs does (same layout, weights, padding and order)."""
        check_overlap(overlap)
        h, w = raw.shape[:2]
        arr, top, left = pad_to_tile(raw, self.size)
        ph, pw = arr.shape[:2]
        s = self.size
        weight = gaussian_weights(s)
        acc = np.zeros((self.out_channels, ph, pw), np.float32)
        wsum = np.zeros((ph, pw), np.float32)
        for y in tile_starts(ph, s, overlap):
            for x in tile_starts(pw, s, overlap):
                acc[:, y:y + s, x:x + s] += self.flipped_mean(arr[y:y + s, x:x + s], tta) * weight
                wsum[y:y + s, x:x + s] += weight
        acc /= wsum
        return acc[:, top:top + h, left:left + w]

    def probabilities(self, image: np.ndarray, tta: bool = False, inference: str = "whole",
                      overlap: float = 0.5, source: str = "") -> np.ndarray:
        """One [0, 1] image -> [K, H, W] float32 probabilities at its own size."""
        raw = self.pixels_of(image, source)
        if inference == "sliding":
            if self.tile_scale == "native":
                return self.sliding(raw, tta, overlap)
            scaled = self.pixels_of(at_tile_scale(image, self.size, self.tile_scale), source)
            return map_back(self.sliding(scaled, tta, overlap), *raw.shape[:2])
        if inference != "whole":
            raise ValueError(f"--inference must be one of whole, sliding, got {inference!r}")
        return self.flipped_mean(raw, tta)

    def probability_map(self, image: np.ndarray, tta: bool = False, inference: str = "whole",
                        overlap: float = 0.5, batch_size: int = 8) -> np.ndarray:
        """As Predictor.probability_map: [H, W] tumour probabilities (a binary model), or
        [K, H, W] for a K-class one. The graph takes one image (or tile) per run, so
        batch_size is not used."""
        p = self.probabilities(image, tta, inference, overlap)
        return p[0] if self.out_channels == 1 else p

    def predict_image(self, image: np.ndarray, tta: bool = False, threshold: float | None = None,
                      inference: str = "whole", overlap: float = 0.5, batch_size: int = 8) -> np.ndarray:
        """One [0, 1] image -> its mask at its own size: boolean (> threshold) for a binary
        model, the most probable class per pixel for a K-class one."""
        p = self.probabilities(image, tta, inference, overlap)
        if self.out_channels > 1:
            return p.argmax(0)
        return p[0] > (self.threshold if threshold is None else threshold)


def _meta(props: dict[str, str], key: str, path: Path) -> str:
    try:
        return props[f"tumorseg_dist.{key}"]
    except KeyError:
        raise OnnxModelError(f"{path}: its metadata lacks tumorseg_dist.{key}; it was written by "
                             f"an incompatible tumorseg_dist version: re-export it") from None


def load_onnx(path: Path | str, threads: int = 0, device: str = "cpu") -> OnnxPredictor:
    """An OnnxPredictor for a full graph written by `export`, or OnnxModelError (one line naming
    the file): missing, not ONNX, not ours, a bare-network export, a format or opset this
    version cannot run. threads: onnxruntime's intra-op threads (0: its default)."""
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such file; export one with `python -m tumorseg_dist.export "
                             f"--checkpoint RUN/checkpoints/best.pt --onnx {path}`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif device == "cuda":
        raise OnnxModelError(f"{path}: --device cuda, but this onnxruntime has no CUDA provider "
                             f"(install onnxruntime-gpu, or use --device cpu)")
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own types for a bad file or an unknown opset
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxModelError(f"{path}: onnxruntime {ort.__version__} cannot load it ({first}); it is "
                             f"not an ONNX model, or its opset is newer than this onnxruntime runs: "
                             f"re-export with `export --opset {MIN_OPSET}` or upgrade onnxruntime") from None
    props = session.get_modelmeta().custom_metadata_map
    if "tumorseg_dist.size" not in props:
        raise OnnxModelError(f"{path}: has no tumorseg_dist metadata; it was not written by "
                             f"`python -m tumorseg_dist.export`: export the checkpoint with it")
    graph = props.get("tumorseg_dist.graph", "network")
    if graph != "full":
        raise OnnxModelError(f"{path}: is the bare network (export --graph network: a preprocessed "
                             f"[N, C, S, S] input); predict --onnx runs the full graph: re-export "
                             f"with --graph full (the default)")
    fmt, opset = int(_meta(props, "format", path)), int(_meta(props, "opset", path))
    if fmt > GRAPH_FORMAT:
        raise OnnxModelError(f"{path}: graph format {fmt} is newer than this tumorseg_dist "
                             f"(format {GRAPH_FORMAT}); upgrade the package")
    if opset < MIN_OPSET:
        raise OnnxModelError(f"{path}: opset {opset} is below {MIN_OPSET}, which the full graph "
                             f"needs; re-export with --opset {MIN_OPSET}")
    pixels = _meta(props, "pixels", path)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if ([i.name for i in inputs], [o.name for o in outputs]) != (["image"], ["probabilities"]) or \
            pixels not in PIXEL_SCALE or inputs[0].type != f"tensor({pixels})":
        raise OnnxModelError(f"{path}: its inputs/outputs ({[(i.name, i.type) for i in inputs]} -> "
                             f"{[o.name for o in outputs]}) are not those of a full tumorseg_dist "
                             f"graph; the file was edited or damaged: re-export it")
    return OnnxPredictor(
        session=session, path=path, arch=_meta(props, "arch", path),
        encoder=props.get("tumorseg_dist.encoder", ""),
        in_channels=int(_meta(props, "in_channels", path)),
        out_channels=int(_meta(props, "out_channels", path)), size=int(_meta(props, "size", path)),
        pixels=pixels, threshold=float(_meta(props, "threshold", path)),
        mean=tuple(json.loads(_meta(props, "mean", path))), std=tuple(json.loads(_meta(props, "std", path))),
        class_names=_class_names(props, path), tile_scale=_tile_scale(props, path))


def _tile_scale(props: dict[str, str], path: Path) -> str:
    scale = props.get("tumorseg_dist.tile_scale", "native")
    if scale not in TILE_SCALES:
        raise OnnxModelError(f"{path}: its tumorseg_dist.tile_scale metadata {scale!r} is not one of "
                             f"{', '.join(TILE_SCALES)}; the file was edited or written by a newer "
                             f"tumorseg_dist: re-export it or upgrade the package")
    return scale


def _class_names(props: dict[str, str], path: Path) -> tuple[str, ...]:
    """The class names export recorded, checked against the graph's output channels; a file
    exported before they were recorded has none (predict names them class_1, class_2, ...)."""
    text = props.get("tumorseg_dist.class_names")
    if text is None:
        return ()
    try:
        names = tuple(str(n) for n in json.loads(text))
    except (ValueError, TypeError):
        raise OnnxModelError(f"{path}: its tumorseg_dist.class_names metadata is not a JSON list; "
                             f"the file was edited or damaged: re-export it") from None
    k = int(props.get("tumorseg_dist.out_channels", "1"))
    return names if k > 1 and len(names) == k else ()
