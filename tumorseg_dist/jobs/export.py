"""The work of `python -m tumorseg_dist.export` (its flags: tumorseg_dist/export.py): the ONNX
file, written only once onnxruntime agrees with PyTorch on a real input."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.batch import to_channels
from ..data.shards import IndexedShards, read_sample
from ..data.shards import MANIFEST, read_manifest, shard_paths
from ..imageio import read_image
from ..inference import Predictor, load_model
from ..log import Console
from ..onnx_predictor import GRAPH_FORMAT, MIN_OPSET, PIXEL_SCALE, load_onnx
from ..options import ExportArgs
from .. import outputs


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
    """The bare network: a preprocessed `image` [N or 1, C, S, S] -> `logits` (--graph network)."""
    import onnx
    proto = network_proto(model, size, dynamic_batch, opset, example)
    onnx.helper.set_model_props(proto, {
        **common_props(model, size, opset), "tumorseg_dist.graph": "network",
        "tumorseg_dist.output": "logits; probability = sigmoid(logits)",
        "tumorseg_dist.preprocess": "pixels/255 (16-bit: /65535) -> channels (grey repeated, colour "
                                    "to BT.601 luma) -> bilinear antialiased resize -> (x-mean)/std",
    })
    onnx.save(proto, str(path))


def common_props(model: Predictor, size: int, opset: int) -> dict[str, str]:
    return {"tumorseg_dist.arch": model.arch, "tumorseg_dist.encoder": model.encoder,
            "tumorseg_dist.in_channels": str(model.in_channels), "tumorseg_dist.size": str(size),
            "tumorseg_dist.mean": json.dumps(list(model.mean)), "tumorseg_dist.std": json.dumps(list(model.std)),
            "tumorseg_dist.threshold": str(model.threshold), "tumorseg_dist.opset": str(opset),
            "tumorseg_dist.class_names": json.dumps(list(model.class_names))}


def network_proto(model: Predictor, size: int, dynamic_batch: bool, opset: int, example: torch.Tensor):
    """The network alone, traced by the TorchScript exporter, its signature declared."""
    import onnx
    net = model.model.float().cpu().eval()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter: the torch.export one needs onnxscript, which we do not ship.
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), buf, input_names=["image"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    with torch.no_grad():
        out_channels = int(net(example[:1]).shape[1])
    declare_shapes(proto, "batch" if dynamic_batch else 1, model.in_channels, size, out_channels)
    onnx.checker.check_model(proto)
    return proto


def channel_table(in_channels: int) -> np.ndarray:
    """[5, 4, in_channels] float32: row C is the matrix that maps a C-channel pixel (zero-padded
    to 4) to the model's channels. Built from data.batch.to_channels on the unit vectors, so it
    is by construction the rule the loaders and the predictor apply (it is linear per pixel:
    grey repeated, colour to BT.601 luma, alpha dropped)."""
    table = np.zeros((5, 4, in_channels), np.float32)
    for c in range(1, 5):
        basis = torch.eye(c).reshape(c, c, 1)          # pixel k of a 1-wide image is unit vector k
        table[c, :c] = to_channels(basis, in_channels)[:, :, 0].T.numpy()
    return table


def full_proto(model: Predictor, size: int, opset: int, pixels: str, example: torch.Tensor):
    """The full graph: raw `image` [height, width, channels] (uint8/uint16) -> `probabilities`
    [K, height, width] float32, doing what Predictor's whole mode does (docs/inference.md):

    pixels / 255 (or 65535) -> the model's channels (channel_table, picked by the input's channel
    count) -> the antialiased bilinear resize to S×S, as F.interpolate(antialias=True) computes
    it (separable triangle-filter weights, stretched by the scale when shrinking, normalised per
    output pixel; onnxruntime's own antialiased Resize differs from torch's by up to 0.03) ->
    (x - mean) / std -> the network -> sigmoid (K = 1) or softmax over the K channels -> bilinear
    resize back to height × width (Resize, half-pixel, as to_original_size). On an S×S input
    both resizes are the identity, so the graph is also the sliding window's tile-step.

    A letterbox (or crop) checkpoint's graph letterboxes as `inference.preprocess` does: the
    resize goes to ly × lx (`letterbox_box`, its float64 arithmetic in the graph: Ly =
    floor(H · (S / max(H, W)) + 0.5)), the result is padded with raw 0 to S × S at (top, left),
    and the probabilities are cropped back to that box before the resize to height × width.
    On an S×S input this is the identity too."""
    import onnx
    from onnx import TensorProto as T, helper as h, numpy_helper as nph
    net = network_proto(model, size, False, opset, example)
    out_channels = net.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    inits, nodes = [], []

    def const(name: str, value) -> str:
        inits.append(nph.from_array(np.asarray(value), f"pre/{name}"))
        return f"pre/{name}"

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(h.make_node(op, inputs, [f"pre/{name}"], name=f"pre/{name}", **attrs))
        return f"pre/{name}"

    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    i64 = lambda v: np.asarray(v, np.int64)    # noqa: E731
    shape = node("Shape", ["image"], "shape")
    hw = node("Slice", [shape, const("0", i64([0])), const("2", i64([2]))], "hw")
    x = node("Div", [node("Cast", ["image"], "float", to=T.FLOAT), const("scale", f32(PIXEL_SCALE[pixels]))], "unit")
    c = node("Gather", [shape, const("c_axis", i64(2))], "c")
    pad_c = node("Sub", [const("4", i64([4])), node("Slice", [shape, const("2b", i64([2])), const("3", i64([3]))], "c1")], "pad_c")
    pads = node("Concat", [const("pads0", i64([0, 0, 0, 0, 0])), pad_c], "pads", axis=0)
    x = node("Pad", [x, pads], "pad4")                                             # [H, W, 4]
    x = node("MatMul", [x, node("Gather", [const("channels", channel_table(model.in_channels)), c], "mix")], "channels_out")
    x = node("Transpose", [x], "chw", perm=[2, 0, 1])                             # [C, H, W]

    letterbox = model.geometry == "letterbox"
    if letterbox:   # (top, left, ly, lx) of letterbox_box, as int64 [2] pairs
        hw_d = node("Cast", [hw], "hw_d", to=T.DOUBLE)
        ratio = node("Div", [const("S_d", np.float64(size)), node("ReduceMax", [hw_d], "long", keepdims=1)], "ratio")
        box = node("Max", [node("Floor", [node("Add", [node("Mul", [hw_d, ratio], "scaled"),
                                                       const("half_d", np.float64(0.5))], "scaled_h")], "floor"),
                           const("one_d", np.float64(1.0))], "box_d")                # [ly, lx]
        offset = node("Neg", [node("Floor", [node("Add", [node("Div", [node("Sub", [box, const("S_d2", np.float64(size))], "spare"),
                                                                         const("two_d", np.float64(2.0))], "spare_h"),
                                                          const("half_d2", np.float64(0.5))], "origin_h")], "origin")], "offset_d")
        box_i = node("Cast", [box], "box", to=T.INT64)                              # [ly, lx]
        top_left = node("Cast", [offset], "top_left", to=T.INT64)                   # [top, left]
        out_len = node("Cast", [box], "box_f", to=T.FLOAT)

    def resize_weights(axis: int, tag: str) -> str:
        """[S, n] antialiased bilinear weights from an axis of n input pixels to S (letterbox:
        [L, n] to the box's side L)."""
        n = node("Cast", [node("Gather", [shape, const(f"axis{tag}", i64(axis))], f"n{tag}")], f"nf{tag}", to=T.FLOAT)
        if letterbox:
            length = node("Gather", [out_len, const(f"box_axis{tag}", i64(axis))], f"L{tag}")
            scale = node("Div", [n, length], f"scale{tag}")
            i = node("Unsqueeze", [node("Range", [const(f"i0{tag}", f32(0.5)), node("Add", [length, const(f"i1{tag}", f32(0.5))], f"iend{tag}"),
                                                  const(f"istep{tag}", f32(1.0))], f"irange{tag}"), const(f"iax{tag}", i64([1]))], f"i{tag}")
        else:
            scale = node("Div", [n, const(f"S{tag}", f32(size))], f"scale{tag}")
            i = const(f"i{tag}", f32(np.arange(size) + 0.5)[:, None])
        inv = node("Reciprocal", [node("Max", [scale, const(f"one{tag}", f32(1.0))], f"support{tag}")], f"inv{tag}")
        centre = node("Mul", [scale, i], f"centre{tag}")
        j = node("Range", [const(f"half{tag}", f32(0.5)), node("Add", [n, const(f"half2{tag}", f32(0.5))], f"end{tag}"),
                           const(f"step{tag}", f32(1.0))], f"j{tag}")
        d = node("Mul", [node("Sub", [j, centre], f"dist{tag}"), inv], f"d{tag}")
        w = node("Relu", [node("Sub", [const(f"one2{tag}", f32(1.0)), node("Abs", [d], f"absd{tag}")], f"tri{tag}")], f"w{tag}")
        return node("Div", [w, node("ReduceSum", [w, const(f"ax1{tag}", i64([1]))], f"wsum{tag}", keepdims=1)], f"weights{tag}")

    x = node("MatMul", [resize_weights(0, "h"), x], "resize_h")                     # [C, S, W]
    x = node("MatMul", [x, node("Transpose", [resize_weights(1, "w")], "wT", perm=[1, 0])], "resized")  # [C, S, S]
    if letterbox:   # [C, ly, lx] -> [C, S, S]: raw 0 around the box, as the loader's warp leaves it
        after = node("Sub", [node("Sub", [const("SS", i64([size, size])), box_i], "rest"), top_left], "after")
        pads = node("Concat", [const("z0", i64([0])), top_left, const("z1", i64([0])), after], "lb_pads", axis=0)
        x = node("Pad", [x, pads], "letterboxed")
    std = f32(model.std).reshape(-1, 1, 1)
    x = node("Div", [node("Sub", [x, const("mean", f32(model.mean).reshape(-1, 1, 1))], "centred"), const("std", std)], "normalised")
    x = node("Unsqueeze", [x, const("ax0", i64([0]))], "batch")                   # [1, C, S, S]
    net_nodes = list(net.graph.node)
    for n_ in net_nodes:
        for k, name in enumerate(n_.input):
            if name == "image":
                n_.input[k] = x
    act = (h.make_node("Sigmoid", ["logits"], ["post/probs"], name="post/sigmoid") if out_channels == 1
           else h.make_node("Softmax", ["logits"], ["post/probs"], name="post/softmax", axis=1))
    sizes = h.make_node("Concat", ["post/nk", hw], ["post/sizes"], name="post/sizes", axis=0)
    probs, post = "post/probs", []
    if letterbox:   # the box of the letterbox only, then back to height × width
        post.append(h.make_node("Add", [top_left, box_i], ["post/box_end"], name="post/box_end"))
        post.append(h.make_node("Slice", ["post/probs", top_left, "post/box_end", "post/hw_axes"],
                                ["post/box"], name="post/unletterbox"))
        inits.append(nph.from_array(i64([2, 3]), "post/hw_axes"))
        probs = "post/box"
    back = h.make_node("Resize", [probs, "", "", "post/sizes"], ["post/resized"], name="post/resize",
                       mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    squeeze = h.make_node("Squeeze", ["post/resized", "pre/ax0"], ["probabilities"], name="post/squeeze")
    inits.append(nph.from_array(i64([1, out_channels]), "post/nk"))
    elem = T.UINT8 if pixels == "uint8" else T.UINT16
    graph = h.make_graph(
        nodes + net_nodes + [act, sizes, *post, back, squeeze], "tumorseg_dist_full",
        [h.make_tensor_value_info("image", elem, ["height", "width", "channels"])],
        [h.make_tensor_value_info("probabilities", T.FLOAT, [out_channels, "height", "width"])],
        initializer=inits + list(net.graph.initializer))
    proto = h.make_model(graph, opset_imports=list(net.opset_import), ir_version=net.ir_version,
                         producer_name="tumorseg_dist")
    onnx.checker.check_model(proto)
    onnx.helper.set_model_props(proto, {
        **common_props(model, size, opset), "tumorseg_dist.graph": "full",
        "tumorseg_dist.format": str(GRAPH_FORMAT), "tumorseg_dist.pixels": pixels,
        "tumorseg_dist.out_channels": str(out_channels),
        "tumorseg_dist.geometry": model.geometry,   # whole-image geometry, done in the graph
        "tumorseg_dist.tile_scale": model.tile_scale,   # the sliding window's, done by the predictor
        "tumorseg_dist.output": ("probabilities [1, H, W]: sigmoid of the logit; mask = > threshold"
                                 if out_channels == 1 else
                                 f"probabilities [{out_channels}, H, W]: softmax over the classes; "
                                 f"mask = argmax"),
        "tumorseg_dist.preprocess": "inside the graph: raw H×W×C pixels (1-4 channels; H×W as H×W×1)",
    })
    return proto


def declare_shapes(proto, batch: int | str, channels: int, size: int, out_channels: int = 1) -> None:
    """The signature a deployment sizes its buffers from: image [batch, C, S, S] and logits
    [batch, K, S, S]. The TorchScript exporter's own guess names the output's spatial dims after
    the batch, so both are written here; the exporter's intermediate shape notes go too."""
    for value, c in ((proto.graph.input[0], channels), (proto.graph.output[0], out_channels)):
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




def torch_probabilities(model: Predictor, image: np.ndarray, inference: str) -> np.ndarray:
    """The PyTorch predictor's [K, H, W] probabilities for one [0, 1] image: what the full graph
    must reproduce. Whole mode of a K-class network: all K softmax maps resized back (the
    predictor's whole-mode map keeps the first channel only)."""
    with torch.no_grad():
        if inference == "sliding" or int(model.model(model.preprocess(image)[None]).shape[1]) == 1:
            p = model.probability_map(image, inference=inference).numpy()
            return p.reshape(-1, *p.shape[-2:])   # [H, W] (binary) or [K, H, W]
        probs = torch.softmax(model.model(model.preprocess(image)[None]).float(), 1)
        return model.to_original(probs, *image.shape[:2]).numpy()


def full_checks(image: np.ndarray, size: int) -> list[tuple[str, np.ndarray, str]]:
    """(what, image, inference mode): the image at its own size, then beside its mirror (a
    non-square image, so the in-graph resize is exercised even when the image is S×S) whole and
    through the sliding window (the graph as one tile-step)."""
    wide = np.concatenate([image, image[:, ::-1]], axis=1)
    if max(wide.shape[:2]) < 2 * size:  # smaller than a tile: the window would be one padded tile
        wide = np.pad(wide, ((0, max(size - wide.shape[0], 0)), (0, max(2 * size - wide.shape[1], 0)))
                      + ((0, 0),) * (wide.ndim - 2), mode="reflect")
    h, w = wide.shape[:2]
    # The sliding check proves the graph is one tile-step: a few tiles show it as well as the
    # hundreds a large image at a small training size would take (minutes at 64 px on 1402×526).
    window = wide[:2 * size, :3 * size]
    wh, ww = window.shape[:2]
    return [(f"whole {image.shape[1]}x{image.shape[0]}", image, "whole"),
            (f"whole {w}x{h}", wide, "whole"), (f"sliding {ww}x{wh}", window, "sliding")]


def run(args: ExportArgs) -> int:
    log = Console()
    model = load_model(args.checkpoint, "cpu")
    size = args.size or model.size
    multiple = 16 if model.arch == "unet-classic" else 32
    if size < multiple or size % multiple:
        raise ValueError(f"--size must be a multiple of {multiple} for {model.arch}, got {size}")
    full = args.graph == "full"
    opset = args.opset or (MIN_OPSET if full else 17)
    image, where = real_input(model, args.input)
    if image is None:
        data = model.config.get("data", {}).get("path")
        missing = f"the training data {data} is not here" if data else "the checkpoint names no training data"
        log.warning(f"export: warning: {missing} and no --input was given; checking on a random input instead")
        g = torch.Generator().manual_seed(0)
        # the full graph takes pixels: a random 8-bit image, not square, larger than a tile
        image = torch.randint(0, 256, (size + 17, size + 9), generator=g).numpy().astype(np.float32) / 255
        where = "random input"
    x = model.preprocess(image, size)[None]
    # The check's steps: the export, then onnxruntime against PyTorch, each on a real input.
    if full:
        steps = [("export", None)] + full_checks(image, size)
    else:
        steps = [("export", None), ("batch 1", x, "")]  # (and batch 3: a free batch must work)
        if args.dynamic_batch:
            steps.append(("batch 3", torch.cat([x, x.flip(-1), x.flip(-2)]), ""))
    kept = f"the earlier {args.onnx} is unchanged" if args.onnx.is_file() else "nothing was written"
    with outputs.atomic(args.onnx, kept + ", no temp file was left",
                        fix="give --onnx a path on another filesystem") as tmp:
        diffs = []
        for step in log.progress(steps, len(steps), "export", unit="step"):
            if step[1] is None and full:
                proto = full_proto(model, size, opset, args.pixels, x)
                import onnx
                onnx.save(proto, str(tmp))
                ort_model = load_onnx(tmp)
            elif step[1] is None:
                export_onnx(model, tmp, size, args.dynamic_batch, opset, x)
            elif full:
                got = ort_model.probabilities(step[1], inference=step[2], source=where)
                diffs.append(float(np.abs(got - torch_probabilities(model, step[1], step[2])).max()))
            else:
                diffs.append(check_onnx(tmp, model.model, step[1]))
        diff = max(diffs)
        what = ("probabilities, " + ", ".join(s[0] for s in steps[1:]) if full else
                f"logits, {'batch 1 and 3' if args.dynamic_batch else 'batch 1'}, {size}x{size}")
        log.info(f"export: onnxruntime vs PyTorch on {where}: max abs difference {diff:.3e} ({what})")
        if not diff <= args.atol:
            log.warning(f"export: error: difference {diff:.3e} is above --atol {args.atol:g}; "
                        f"{args.onnx} was not written")
            tmp.unlink()
            return 1
    mb = args.onnx.stat().st_size / 2 ** 20
    if full:
        k = ort_model.out_channels
        log.info(f"export: wrote {args.onnx} ({mb:.1f} MB, opset {opset}, --graph full): input 'image' "
                 f"[height, width, channels] {args.pixels} (1-4 channels, any size; resized to {size} "
                 f"inside); output 'probabilities' [{k}, height, width] "
                 + (f"-> > {model.threshold}" if k == 1 else "-> argmax"))
        return 0
    log.info(f"export: wrote {args.onnx} ({mb:.1f} MB, opset {opset}, --graph network): input 'image' "
             f"[{'N' if args.dynamic_batch else 1}, {model.in_channels}, {size}, {size}] normalised "
             f"with mean {list(model.mean)} std {list(model.std)}; output 'logits' -> sigmoid -> "
             f"> {model.threshold}")
    return 0
