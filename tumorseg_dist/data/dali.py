"""The NVIDIA DALI loader (`--loader dali`): read tar shards, decode, resize, augment, normalise.

One pipeline definition (`seg_pipeline`) serves both devices: on a GPU the decoders run
`device="mixed"` (nvJPEG / nvJPEG2000 where DALI accelerates the codec) and everything after
them on the GPU; on CPU (`device_id=None`) the same operators run on the CPU. Only the device
arguments differ.

Sample selection and epochs (see docs/loader.md):

* Training selects samples by GLOBAL POSITION, as the torch loader does: the epoch's global
  order is a function of (seed, epoch) only (`order.training_plan`), global micro-batch j holds
  positions [jB, (j+1)B) and rank r takes its b = B/world slice. `PlanSource` feeds those
  samples' encoded members (read by offset through the `.idx` files) into the pipeline through
  `fn.external_source`, so a run resumed on another number of ranks continues the same order at
  the same position, and both loaders put the same sample at every position. An epoch is whole
  optimizer steps (the ragged tail dropped), the same length on every rank.
* Evaluation reads with `fn.readers.webdataset` (`num_shards` = world size, `shard_id` = GLOBAL
  rank; DALI's contiguous shards [i*N//W, (i+1)*N//W)), pads (`pad_last_batch`) and marks the
  padding `valid=False`. Validity comes from the reader's per-shard sizes (sample ordinal <
  shard size) and is cross-checked against the sample keys DALI reports (`source_info`), so
  each val/test sample is counted exactly once.
* Augmentation draws by GLOBAL POSITION too: every per-sample random parameter (flip coins,
  rotation, zoom, shift, gamma, brightness, contrast, the noise's std and its field) is drawn
  on the host by `draws.sample_draws`, seeded by (seed, epoch, position), the function the
  torch loader uses, and `PlanSource` emits them as extra external_source outputs (`DRAWS`)
  that the graph applies; nothing in the graph is random (no fn.random.*). So a position holds
  the same sample AND the same augmentation on any world size, and `--loader dali` and
  `--loader torch` get identical draws for the same (seed, epoch, position). The DALI
  conditionals still gate gamma and noise, now on host-drawn coins.
* The pipeline is rebuilt at the start of every epoch (its own seed, from (seed, epoch, rank),
  now drives nothing random).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..dist import DistInfo
from .augment import AugmentParams
from .batch import LUMA, Batch, LoaderSpec
from .draws import position_seed, sample_draws
from .geometry import place
from .order import epoch_length, training_plan
from .shards import decode_mask, label_classes, read_index
from .shards import IMAGE_EXT, ShardError, read_manifest, shard_paths, split_shards

PREFETCH = 2            # batches DALI prepares ahead


@dataclass(frozen=True)
class RawLayout:
    """What every `.npy` image in a raw split looks like (DALI needs it uniform per batch)."""

    dtype: str       # numpy dtype name, e.g. "uint8"
    ndim: int        # 2 (H×W) or 3 (H×W×C)
    channels: int

    @property
    def scale(self) -> float:
        # Same rule as shards.decode_image: 16-bit scaled by 65535, everything else by 255.
        return 65535.0 if self.dtype == "uint16" else 255.0


@dataclass(frozen=True)
class SplitLayout:
    """The split as DALI will see it: tars, indexes, keys in reader order, codec."""

    tars: tuple[Path, ...]
    indexes: tuple[Path, ...]
    keys: tuple[str, ...]
    image_ext: str
    raw: RawLayout | None
    grey: bool       # every image has one channel (decoded and augmented as one channel)
    eight_bit: bool = False   # every image is 8-bit PNG/JPEG: decoded as uint8 (see `seg_pipeline`)
    labels: bool = False      # masks are class ids (pack --classes, K > 2): kept as they are, not > 0

    def shard_range(self, shard_id: int, num_shards: int) -> tuple[int, int]:
        """DALI's contiguous split of the concatenated samples (`start_index` in DALI's loader)."""
        n = len(self.keys)
        return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def _npy_header(data: bytes, where: str) -> tuple[str, tuple[int, ...]]:
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged member
        raise ShardError(f"{where} is not a valid .npy member ({e}); re-run pack with --overwrite") from e
    return np.dtype(dtype).name, tuple(shape)


def _is_eight_bit(f, ref, codec: str) -> bool:
    """JPEG is always 8-bit; a PNG says its bit depth in byte 24 (IHDR). 16-bit PNGs keep the
    float decode, which scales them by 65535 without losing precision."""
    if codec != "png":
        return codec == "jpeg"
    _, off, size = next(m for m in ref.members if m[0] == "image.png")
    f.seek(off)
    head = f.read(min(size, 26))
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] <= 8


def inspect_split(shard_dir: Path, split: str) -> SplitLayout:
    """Check the split's shards and indexes before DALI opens them (DALI would abort or hang on
    a bad file) and collect what the pipeline needs. Every error names the file and the fix."""
    manifest = read_manifest(shard_dir)
    codec = manifest.get("codec", "png")
    if codec not in IMAGE_EXT:
        raise ShardError(f"{shard_dir}/manifest.json: unknown codec {codec!r}; re-run pack")
    tars = shard_paths(shard_dir, split, manifest)
    listed = {sh["name"]: sh["samples"] for sh in split_shards(manifest, split, shard_dir)}
    keys: list[str] = []
    raw_seen: set[tuple[str, int, int]] = set()
    grey = True
    eight_bit = codec in ("png", "jpeg")
    for tar in tars:
        refs = read_index(tar)
        if listed.get(tar.name, len(refs)) != len(refs):
            raise ShardError(f"{tar.with_suffix('.idx')} lists {len(refs)} samples but manifest.json says "
                             f"{listed[tar.name]}; rebuild it with `wds2idx {tar} {tar.with_suffix('.idx')}` "
                             f"or re-run pack with --overwrite")
        exts = [{e for e, _, _ in r.members} for r in refs]
        for r, e in zip(refs, exts):
            if IMAGE_EXT[codec] not in e or "mask.png" not in e:
                raise ShardError(f"sample {r.key} in {tar} lacks {IMAGE_EXT[codec]} or mask.png; "
                                 f"re-run pack with --overwrite")
        keys += [r.key for r in refs]
        with open(tar, "rb") as f:
            for r in refs:   # KEY.json holds the image's channel count (written by pack)
                eight_bit &= _is_eight_bit(f, r, codec)
                meta = next((m for m in r.members if m[0] == "json"), None)
                if meta is None:
                    grey = False
                    continue
                f.seek(meta[1])
                try:
                    grey &= int(json.loads(f.read(meta[2])).get("channels", 3)) == 1
                except (ValueError, AttributeError) as e:
                    raise ShardError(f"{tar}: {r.key}.json is not valid JSON ({e}); re-run pack with --overwrite") from e
        if codec == "raw":
            with open(tar, "rb") as f:
                for r in refs:
                    _, off, size = next(m for m in r.members if m[0] == "image.npy")
                    f.seek(off)
                    dtype, shape = _npy_header(f.read(min(size, 4096)), f"{tar}:{r.key}.image.npy")
                    raw_seen.add((dtype, len(shape), shape[2] if len(shape) == 3 else 1))
    raw = None
    if codec == "raw":
        if len(raw_seen) > 1:
            raise ShardError(f"{shard_dir}: raw split {split!r} mixes image layouts {sorted(raw_seen)} "
                             f"(dtype, ndim, channels); DALI needs one per batch. Re-pack with --codec png or jp2")
        if raw_seen:
            dtype, ndim, channels = raw_seen.pop()
            if ndim not in (2, 3) or channels not in (1, 3, 4):
                raise ShardError(f"{shard_dir}: raw images must be H×W or H×W×{{1,3,4}}, got ndim={ndim} "
                                 f"channels={channels}; re-pack with --codec png")
            raw = RawLayout(dtype, ndim, channels)
    return SplitLayout(tuple(tars), tuple(t.with_suffix(".idx") for t in tars), tuple(keys),
                       IMAGE_EXT[codec], raw, grey, eight_bit, label_classes(manifest) is not None)


# ---------------------------------------------------------------- the pipeline definition

# Per-sample draws as `PlanSource` emits them, after the three encoded members: (name, DALI
# dtype name, ndim). Scalars unless said; `field` is the noise field (H×W×C, 0×0×C when off).
DRAWS = (("flip_h", "INT32", 0), ("flip_v", "INT32", 0), ("angle", "FLOAT", 0), ("zoom", "FLOAT", 0),
         ("shift", "FLOAT", 1), ("gamma", "FLOAT", 0), ("gamma_on", "BOOL", 0),
         ("brightness", "FLOAT", 0), ("contrast", "FLOAT", 0), ("noise", "FLOAT", 0),
         ("noise_on", "BOOL", 0), ("field", "FLOAT", 3),
         ("shrink", "BOOL", 0), ("shrink_hw", "FLOAT", 1), ("matrix", "FLOAT", 2))
# shrink, shrink_hw, matrix: --geometry letterbox|crop, `geometry.place` worked out on the host
# (flips and affine inside the matrix, half-pixel centres); replace flip_h .. shift there.
GEOMETRY_DRAWS = ("shrink", "shrink_hw", "matrix")


def used_draws(p: AugmentParams, geometry: str = "squash") -> tuple[str, ...]:
    """The `DRAWS` names the graph applies for `p` and `geometry` (only those are emitted)."""
    if geometry != "squash":
        rest = used_draws(p) if p.enabled else ()
        return tuple(n for n in rest if n not in ("flip_h", "flip_v", "angle", "zoom", "shift")) + GEOMETRY_DRAWS
    if not p.enabled:
        return ()
    on = {"flip_h": p.flip_p > 0, "flip_v": p.flip_p > 0, "angle": has_affine(p), "zoom": has_affine(p),
          "shift": has_affine(p), "gamma": p.gamma_p > 0 and p.gamma > 0,
          "brightness": p.brightness_p > 0 and p.brightness > 0, "contrast": p.contrast_p > 0 and p.contrast > 0,
          "noise": p.noise_p > 0 and p.noise > 0}
    on.update(gamma_on=on["gamma"], noise_on=on["noise"], field=on["noise"])
    return tuple(name for name, _, _ in DRAWS if on.get(name))


def draw_outputs(d: dict, size: int, channels: int, placed=None) -> dict[str, np.ndarray]:
    """One sample's `draws.sample_draws` as the arrays of `DRAWS` (`placed`: `geometry.place`'s
    (shrink, matrix), or None for squash). The DALI angle is the drawn one negated: DALI rotates
    clockwise on screen, OpenCV counter-clockwise."""
    angle, zoom, tx, ty = d["affine"] or (0.0, 1.0, 0.0, 0.0)
    f32, on = np.float32, d["field"] is not None
    geo = {}
    if placed is not None:
        shrink, m = placed
        geo = {"shrink": np.bool_(shrink is not None), "shrink_hw": np.array(shrink or (1, 1), f32),
               "matrix": np.ascontiguousarray(m[:2], f32)}
    return geo | {"flip_h": np.int32(d["hflip"]), "flip_v": np.int32(d["vflip"]), "angle": f32(-angle),
            "zoom": f32(zoom), "shift": np.array([tx * size, ty * size], f32),
            "gamma": f32(1.0 if d["gamma"] is None else d["gamma"]), "gamma_on": np.bool_(d["gamma"] is not None),
            "brightness": f32(d["brightness"]), "contrast": f32(d["contrast"]), "noise": f32(d["noise"]),
            "noise_on": np.bool_(on), "field": d["field"] if on else np.zeros((0, 0, channels), f32)}


def geometry_matrix(p: AugmentParams, size: int, draws: dict, params: dict):
    """Per-sample 2×3 forward (source -> destination) matrix in DALI's pixel-centre coordinates:
    the flips (mirror about the centre), then scale and rotate about the centre, then translate,
    from the host's draws. One matrix, so image and mask are resampled once for all of them; it
    is `torch_loader._geometry_matrix` moved to half-pixel centres."""
    from nvidia.dali import fn
    from nvidia.dali import types
    c = [size / 2.0, size / 2.0]
    steps = []
    if p.flip_p:
        params.update(flip_h=draws["flip_h"], flip_v=draws["flip_v"])
        fx = 1.0 - 2.0 * fn.cast(draws["flip_h"], dtype=types.FLOAT)
        fy = 1.0 - 2.0 * fn.cast(draws["flip_v"], dtype=types.FLOAT)
        steps.append((fn.transforms.scale, dict(scale=fn.stack(fx, fy), center=c)))
    z = draws["zoom"]
    steps.append((fn.transforms.scale, dict(scale=fn.stack(z, z), center=c)))
    steps.append((fn.transforms.rotation, dict(angle=draws["angle"], center=c)))
    steps.append((fn.transforms.translation, dict(offset=draws["shift"])))
    m = None
    for op, kw in steps:   # each transform is applied after the previous one
        m = op(**kw) if m is None else op(m, **kw)
    params.update(affine=m)
    return m


def has_affine(p: AugmentParams) -> bool:
    return bool(p.affine_p and (p.rotate_deg or p.scale or p.translate))


def flips(image, mask, draws: dict, params: dict):
    """Flips alone (no affine, e.g. the `light` preset): `fn.flip` moves pixels without
    resampling, far cheaper than a warp. Same coins and meaning as in `geometry_matrix`."""
    from nvidia.dali import fn
    h, v = draws["flip_h"], draws["flip_v"]
    params.update(flip_h=h, flip_v=v)
    return fn.flip(image, horizontal=h, vertical=v), fn.flip(mask, horizontal=h, vertical=v)


def resize(image, mask, size: int, to_float: bool = True):
    """Image: linear with antialiasing (= torch bilinear antialias=True), computed in float and
    returned as float (or in the input's type with `to_float=False`); mask: nearest neighbour at
    pixel centres (= torch "nearest-exact"), so it stays exactly binary."""
    from nvidia.dali import fn, types
    size = [size, size] if isinstance(size, int) else size   # or a per-sample (h, w) node
    image = fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=True,
                      dtype=types.FLOAT if to_float else None)
    mask = fn.resize(mask, size=size, interp_type=types.INTERP_NN)
    return image, mask


def place_nodes(image, mask, size: int, draws: dict | None, params: dict):
    """--geometry letterbox|crop: (image float, mask, pad) on the size × size output, the pad a
    warped ones-image (1 = source pixel). Training (`draws`): the host's `geometry.place` (the
    antialiased shrink where a side shrinks, then one warp whose matrix holds the placement,
    flips and affine). Evaluation (None): letterbox, the same numbers in graph arithmetic from
    the decoded shape: resize to the scaled size, then a whole-pixel shift (no resampling)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    if draws is not None:
        if draws["shrink"]:
            image, mask = resize(image, mask, draws["shrink_hw"], to_float=False)   # both branches: one dtype
        m = draws["matrix"]
        params.update(geometry=m)
    else:
        hw = image.shape(dtype=types.FLOAT)
        s = size / dmath.max(hw[0], hw[1])
        ly, lx = dmath.floor(hw[0] * s + 0.5), dmath.floor(hw[1] * s + 0.5)
        image, mask = resize(image, mask, fn.stack(ly, lx))
        m = fn.transforms.translation(offset=fn.stack(-dmath.floor((lx - size) * 0.5 + 0.5),
                                                      -dmath.floor((ly - size) * 0.5 + 0.5)))
    ones = fn.cast(mask >= 0, dtype=types.UINT8)

    def warp(x, interp, dtype=None):
        return fn.warp_affine(x, matrix=m, size=[size, size], fill_value=0, inverse_map=False,
                              interp_type=interp, dtype=dtype)
    return warp(image, types.INTERP_LINEAR, types.FLOAT), warp(mask, types.INTERP_NN), warp(ones, types.INTERP_NN)


def augment(image, mask, p: AugmentParams, size: int, gpu: bool, draws: dict, params: dict,
            resized: bool = True, unit: float = 1.0, placed: bool = False):
    """Apply one sample's host draws (`draws`: the `DRAWS` nodes of `PlanSource`; see
    augment.py for the order and formulas). Returns (image, mask, intensity) where `intensity`
    is None or the per-sample (scale, offset) of brightness and contrast, x -> x*scale + offset,
    for `normalise` to fold into its one pass.

    Geometry: one `warp_affine` for image (linear) and mask (nearest) with the same matrix, or
    with flips alone (no affine) `fn.flip`, which needs no resampling. With `resized=False` the
    inputs are still at the source size: samples no larger than size×size have the resize
    folded into that matrix (one bilinear resample instead of two; no antialiasing is needed
    when not shrinking), larger ones are first resized with antialiasing.
    Gamma and noise run only on the samples whose coin came up (DALI conditionals); the noise is
    the host's field (`draws.noise_field`) times its std, in the units of the final image, so it
    is divided by the scale that follows it. Intensities are in `unit`s (255 for a uint8 decode,
    else 1): the warp turns uint8 into float without rescaling, and every intensity constant is
    scaled instead. `params` receives the per-sample parameters (tests check them against
    OpenCV, numpy and the torch loader). `placed`: letterbox or crop, whose flips and affine
    `place_nodes` already applied (intensities only here)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    def dev(node):   # per-sample host values join GPU arithmetic on the GPU
        return node.gpu() if gpu else node

    if placed:
        pass
    elif not has_affine(p) and p.flip_p:
        image, mask = flips(image, mask, draws, params)   # inputs already resized (no fold)
    elif has_affine(p):
        m = geometry_matrix(p, size, draws, params)
        if not resized:
            hw = image.shape(dtype=types.FLOAT)
            if (hw[0] > size) | (hw[1] > size):   # shrinking needs the antialiased resize
                image, mask = resize(image, mask, size, to_float=False)   # both branches: one dtype
            hw = image.shape(dtype=types.FLOAT)
            to_size = fn.transforms.scale(scale=fn.stack(size / hw[1], size / hw[0]))
            m = fn.transforms.combine(to_size, m)   # resize first, then the geometry
        image = fn.warp_affine(image, matrix=m, size=[size, size], fill_value=0.0, inverse_map=False,
                               interp_type=types.INTERP_LINEAR, dtype=types.FLOAT)
        mask = fn.warp_affine(mask, matrix=m, size=[size, size], fill_value=0, inverse_map=False,
                              interp_type=types.INTERP_NN)
    if p.gamma_p and p.gamma:
        g = draws["gamma"]
        params.update(gamma=g)
        if draws["gamma_on"]:
            image = dmath.pow(dmath.clamp(image * (1.0 / unit), 0.0, 1.0), dev(g)) * unit
    intensity = None
    bright = p.brightness_p and p.brightness
    contrast = p.contrast_p and p.contrast
    if bright or contrast:
        # x*b, then (y - mean(y))*c + mean(y) with y = x*b: x*(b*c) + b*mean(x)*(1 - c).
        b = draws["brightness"] if bright else 1.0
        c = draws["contrast"] if contrast else 1.0
        params.update({k: v for k, v in (("brightness", b), ("contrast", c)) if not isinstance(v, float)})
        scale = b * c
        if contrast:
            mean = fn.reductions.mean(image)
            offset = b * (mean.cpu() if gpu else mean) * (1.0 - c)   # per-sample scalars, on the CPU
        else:
            offset = scale * 0.0
        intensity = (scale, offset)
        params.update(intensity_scale=intensity[0], intensity_offset=intensity[1])
    if p.noise_p and p.noise:
        sigma = draws["noise"] * unit
        if intensity is not None:
            sigma = sigma / intensity[0]
        if draws["noise_on"]:
            image = image + dev(draws["field"]) * dev(sigma)
    return image, mask, intensity


def normalise(image, mean, std, intensity, unit: float = 1.0):
    """(x*scale + offset - mean) / std in one `crop_mirror_normalize` pass, H×W×C out: the
    brightness/contrast map is folded into per-sample normalisation constants. `mean` and `std`
    are in [0, 1] units, the image in `unit`s."""
    from nvidia.dali import fn, types
    mean, std = np.asarray(mean, np.float32) * unit, np.asarray(std, np.float32) * unit
    if intensity is None:
        return fn.crop_mirror_normalize(image, mean=mean.tolist(), std=std.tolist(), dtype=types.FLOAT,
                                        output_layout="HWC")
    scale, offset = intensity
    return fn.crop_mirror_normalize(image, mean=(types.Constant(mean) - offset) / scale,
                                    std=types.Constant(std) / scale, dtype=types.FLOAT, output_layout="HWC")


def _to_channels(image, have: int, want: int):
    """H×W×have float -> H×W×want: grey repeated, colour -> BT.601 luma, alpha dropped."""
    from nvidia.dali import fn
    if have == want:
        return image
    if want == 1:
        r, g, b = (fn.slice(image, start=[i], shape=[1], axes=[2]) for i in range(3))
        return r * LUMA[0] + g * LUMA[1] + b * LUMA[2]
    if have == 1:
        return fn.cat(*([image] * want), axis=2)
    return fn.slice(image, start=[0], shape=[want], axes=[2])  # RGBA -> RGB


def read_encoded(layout: SplitLayout, source, shard_id: int, num_shards: int):
    """(encoded image, encoded mask, source_info, draws) per sample: from `source` (a
    `PlanSource`: training, samples by global position, with their augmentation draws as a
    {name: node} dict of `DRAWS`) or, without one, DALI's reader over this rank's contiguous
    shard in file order (evaluation; draws None)."""
    from nvidia.dali import fn, types
    if source is not None:
        kinds = [(name, t, n) for name, t, n in DRAWS if name in source.names]
        outs = fn.external_source(source=source, num_outputs=3 + len(kinds), batch=True, batch_info=True,
                                  dtype=[types.UINT8] * 3 + [getattr(types, t) for _, t, _ in kinds],
                                  ndim=[1] * 3 + [n for _, _, n in kinds])
        return (*outs[:3], {name: node for (name, _, _), node in zip(kinds, outs[3:])})
    encoded, encoded_mask = fn.readers.webdataset(
        paths=[str(p) for p in layout.tars], index_paths=[str(p) for p in layout.indexes],
        ext=[layout.image_ext, "mask.png"], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True,
        random_shuffle=False, name="reader")
    return encoded, encoded_mask, fn.get_property(encoded, key="source_info"), None


class SplitMembers:
    """Where each sample's encoded image and mask members lie (from the `.idx` files, in
    `layout.keys` order), over memory-mapped tars; made once per loader."""

    def __init__(self, layout: SplitLayout):
        self.ext = layout.image_ext
        self.where = []   # (tar, image offset, image size, mask offset, mask size, source_info)
        for t, tar in enumerate(layout.tars):
            for ref in read_index(tar):
                members = {m[0]: m[1:] for m in ref.members}
                (io, isz), (mo, msz) = members[self.ext], members["mask.png"]
                self.where.append((t, io, isz, mo, msz, f"{tar}:{io}:{ref.key}.{self.ext}".encode()))
        self.maps = [np.memmap(tar, dtype=np.uint8, mode="r") for tar in layout.tars]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, io, isz, mo, msz, info = self.where[i]
        return self.maps[t][io:io + isz], self.maps[t][mo:mo + msz], np.frombuffer(info, np.uint8)


class PlanSource:
    """`fn.external_source` callback: batch `iteration` of this rank's training plan as the
    samples' encoded image and mask members and a DALI-style source_info ('TAR:OFFSET:KEY.EXT'),
    read by offset from the memory-mapped tars, then each sample's augmentation draws (`DRAWS`),
    drawn on the host from its global position (`draws.py`: the torch loader's draws)."""

    def __init__(self, members: SplitMembers, plan: list[list[tuple[int, int]]], aug: AugmentParams,
                 seed: int, epoch: int, size: int, channels: int, geometry: str = "squash",
                 crop_scale: str = "resize", crop_foreground: float = 0.0):
        self.members, self.plan, self.aug = members, plan, aug
        self.seed, self.epoch, self.size, self.channels = seed, epoch, size, channels
        self.geometry, self.crop_scale, self.crop_foreground = geometry, crop_scale, crop_foreground
        self.names = used_draws(aug, geometry)   # the outputs after the three members, in `DRAWS` order

    def draws(self, position: int, mask: np.ndarray) -> dict:
        """The position's `draws.sample_draws`; `mask` (the encoded mask.png) is decoded only
        for a foreground-centred crop."""
        rng = np.random.default_rng(position_seed(self.seed, self.epoch, position))
        fg = self.crop_foreground if self.geometry == "crop" else None
        return sample_draws(self.aug, rng, self.size, self.channels, fg, lambda: decode_mask(mask.tobytes()))

    def __call__(self, info):
        if info.iteration >= len(self.plan):
            raise StopIteration
        rows = []
        for pos, i in self.plan[info.iteration]:
            image, mask, where = self.members.sample(i)
            d = {}
            if self.names:
                d = self.draws(pos, mask)
                placed = None
                if self.geometry != "squash":
                    placed = place(*png_size(mask, where), self.size, self.geometry, self.crop_scale, d)
                d = draw_outputs(d, self.size, self.channels, placed)
            rows.append((image, mask, where, *(d[k] for k in self.names)))
        return tuple(map(list, zip(*rows)))


def png_size(data: np.ndarray, where: np.ndarray) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR (bytes 16..24), without decoding it."""
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ShardError(f"{bytes(where).decode()}: the mask is not a PNG; re-run pack with --overwrite")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def work_channels(layout: SplitLayout, in_channels: int) -> int:
    """The channels the pipeline resizes and augments in: the source's (alpha dropped), or one
    when the model takes one or the split is grey."""
    if layout.raw is not None:
        return 1 if in_channels == 1 else min(layout.raw.channels, 3)
    return 1 if in_channels == 1 or layout.grey else 3


def seg_pipeline(layout: SplitLayout, *, size: int, in_channels: int, training: bool,
                 aug: AugmentParams, mean, std, shard_id: int, num_shards: int, gpu: bool,
                 source=None, with_params: bool = False, geometry: str = "squash"):
    """The graph (build it with `pipeline_def(enable_conditionals=True)`). Outputs: image float
    H×W×C normalised, with C = in_channels, or 1 for a grey split when the model's channels are
    that one channel repeated (`DaliLoader` repeats it while copying into torch); mask bool
    H×W×1; source_info bytes; then any augmentation parameters (sorted by name) when
    `with_params`. The layout the model wants (NCHW or NHWC) is made by that same copy.
    The samples come from `read_encoded` (`source`: training's plan; None: the reader)."""
    from nvidia.dali import fn, types
    encoded, encoded_mask, info, draws = read_encoded(layout, source, shard_id, num_shards)
    decode_on = "mixed" if gpu else "cpu"
    have = work_channels(layout, in_channels)
    # Work in the source's channels (grey stays one channel through resize and augmentation,
    # 3× less work) and expand to the model's channels only before normalising.
    if layout.raw is not None:
        image = fn.decoders.numpy(encoded)   # CPU-only in DALI: copied to the GPU right after
        if gpu:
            image = image.gpu()
        if layout.raw.ndim == 2:
            image = fn.expand_dims(image, axes=[2])
        image = fn.reshape(fn.cast(image, dtype=types.FLOAT) * (1.0 / layout.raw.scale), layout="HWC")
        if layout.raw.channels == 4:       # alpha dropped
            image = fn.slice(image, start=[0], shape=[3], axes=[2])
        if in_channels == 1 and layout.raw.channels != 1:
            image = _to_channels(image, 3, 1)
        unit = 1.0
    else:
        # GRAY: colour -> BT.601 luma (alpha dropped); RGB: grey replicated, alpha dropped.
        # 8-bit splits decode as uint8 (a quarter of the bytes through decode and warp) and become
        # float in the resize or warp, in units of 255 (`unit`, folded into every intensity
        # constant). Otherwise FLOAT: [0, 1], 16-bit scaled by 65535, like shards.decode_image.
        unit = 255.0 if layout.eight_bit else 1.0
        image = fn.decoders.image(encoded, device=decode_on, dtype=types.UINT8 if layout.eight_bit else types.FLOAT,
                                  output_type=types.GRAY if have == 1 else types.RGB)
    mask = fn.decoders.image(encoded_mask, device=decode_on, output_type=types.GRAY)
    # Resize (see `resize`). When augmenting with the affine, the resize is folded into the warp.
    # On a GPU that reads the per-sample shape on the CPU (metadata, no copy), and the contrast
    # mean is copied to the CPU: both need DALI's dynamic executor (`exec_dynamic=True`).
    placed = geometry != "squash"
    fold = training and aug.enabled and has_affine(aug) and not placed
    params: dict = {}
    pad = None
    if placed:
        image, mask, pad = place_nodes(image, mask, size, draws if training else None, params)
    elif not fold:
        image, mask = resize(image, mask, size)
    intensity = None
    if training and aug.enabled:
        image, mask, intensity = augment(image, mask, aug, size, gpu, draws, params, resized=not fold, unit=unit,
                                         placed=placed)
    if have == 1 and in_channels > 1 and len(set(mean)) == 1 and len(set(std)) == 1:
        # Normalise the one channel and leave the repeat to the loader's copy into torch: the
        # same values, without a pass that writes in_channels× the data only to be copied again.
        image = normalise(image, mean[:1], std[:1], intensity, unit)
    else:
        image = normalise(_to_channels(image, have, in_channels), mean, std, intensity, unit)
    # bool (binary) or the class ids (label masks, moved by nearest neighbour only); the copy
    # into torch makes either float
    mask = mask if layout.labels else mask > 0
    outs = [image, mask, info] + ([pad > 0] if placed else [])
    if with_params:
        outs += [params[k] for k in sorted(params)]
    return tuple(outs)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _key(info) -> str:
    """`source_info` of a webdataset sample: 'TAR:OFFSET:KEY.image.ext' -> KEY."""
    s = bytes(np.asarray(info)).decode()
    return s.rsplit(":", 1)[-1].partition(".")[0]


# ---------------------------------------------------------------- the loader

class HostBuffers:
    """Output tensors on the CPU, reused once nobody else holds them.

    A fresh 16×3×640×640 float tensor per batch costs more in page faults (the kernel zeroing
    new pages) than the copy into it: about 20 ms against 7 ms on the 2-core box. A buffer is
    handed out again only when its storage has no other user (no tensor, view or numpy array of
    it is alive), so a batch kept by the caller is never overwritten; when every pooled buffer is
    still held, a new tensor is allocated. On a GPU torch's caching allocator already does this."""

    def __init__(self, keep: int = 6):   # 2 batches of image + mask in flight, and slack
        self.keep, self.pool = keep, []
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)   # without it: no reuse

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
        """A tensor to fill. The caller gets a new tensor object on a pooled storage (never the
        pool's own), so everything that holds the batch, view or not, counts as a storage user."""
        for t in self.pool:
            # Free: the storage's only users are the pool's tensor and the temporary storage
            # object made for this check.
            if (t.shape == shape and t.dtype == dtype and t.is_contiguous(memory_format=memory_format)
                    and self._use_count(t.untyped_storage()._cdata) <= 2):
                return t.detach()
        t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        if self._use_count is not None and len(self.pool) < self.keep:
            self.pool.append(t)
            return t.detach()
        return t


class DaliLoader:
    """`Loader` over a DALI pipeline; see the module docstring for sharding and epochs."""

    def __init__(self, spec: LoaderSpec, dist: DistInfo):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(or -cuda120), or use --loader torch") from e
        self.spec, self.dist = spec, dist
        self.layout = inspect_split(spec.shard_dir, spec.split)
        n, w = len(self.layout.keys), dist.world_size
        if n < w:
            raise ShardError(f"{spec.shard_dir}: split {spec.split!r} has {n} samples, fewer than the "
                             f"{w} ranks; every rank needs at least one. Use fewer processes or more data")
        self.gpu = dist.device.type == "cuda"
        self.epoch = 0
        self.batches_per_epoch = self._batches()
        self._pipe = None
        self._members = None   # SplitMembers, made by the first training pipeline
        self._host = HostBuffers()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> int:
        # Same formulas as TorchLoader: training, whole optimizer steps of the global order;
        # evaluation, from the largest shard, ceil(N / W).
        n, b, w = len(self.layout.keys), self.spec.batch_size, self.dist.world_size
        if self.spec.training:
            return epoch_length(n, b * w * self.spec.grad_accum) // (b * w)
        return math.ceil(math.ceil(n / w) / b)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Training: this rank's (global position, sample index into `layout.keys`) per batch of
        `epoch`."""
        s, d = self.spec, self.dist
        return training_plan(len(self.layout.keys), s.seed, epoch, s.batch_size * d.world_size, s.grad_accum,
                             d.rank, d.world_size)

    def build_pipeline(self, epoch: int, with_params: bool = False):
        """A fresh pipeline for one epoch; its seeds depend only on (seed, epoch, rank). Returns
        it and the [lo, hi) reader shard of an evaluation (training: the whole split)."""
        from nvidia.dali import pipeline_def
        s, sid = self.spec, self.dist.rank
        lo, hi = (0, len(self.layout.keys)) if s.training else self.layout.shard_range(sid, self.dist.world_size)
        if s.training and self._members is None:
            self._members = SplitMembers(self.layout)
        source = PlanSource(self._members, self.plan(epoch), s.augment, s.seed, epoch, s.size,
                            work_channels(self.layout, s.in_channels), s.geometry, s.crop_scale,
                            s.crop_foreground) if s.training else None
        dev_id = None
        if self.gpu:
            dev_id = self.dist.device.index if self.dist.device.index is not None else torch.cuda.current_device()
        make = pipeline_def(seg_pipeline, enable_conditionals=True)
        pipe = make(self.layout, size=s.size, in_channels=s.in_channels, training=s.training,
                    aug=s.augment, mean=s.mean, std=s.std, shard_id=sid,
                    num_shards=self.dist.world_size, gpu=self.gpu, source=source,
                    with_params=with_params, geometry=s.geometry,
                    batch_size=s.batch_size, num_threads=max(1, s.num_workers), device_id=dev_id,
                    seed=_seed(s.seed, epoch, self.dist.rank, 1), prefetch_queue_depth=PREFETCH,
                    exec_dynamic=True)
        pipe.build()
        return pipe, (lo, hi)

    def _to_torch(self, tl, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """One copy from DALI's N×H×W×c buffers (reused by the next run) into an N×`channels`×H×W
        tensor of our own, in the dtype and layout the model wants. A one-channel image is
        repeated to `channels`, a bool mask becomes {0, 1} and float32 becomes `dtype` within
        that copy."""
        t = tl.as_tensor()   # a view when the batch is already contiguous
        n, h, w, _ = t.shape()
        fmt = self.spec.memory_format
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
            out = torch.empty((n, channels, h, w), dtype=dtype, device=self.dist.device, memory_format=fmt)
            src = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.dist.device)
            feed_ndarray(t, src, cuda_stream=torch.cuda.current_stream(self.dist.device))
        else:
            out = self._host.empty((n, channels, h, w), dtype, fmt)
            src = torch.from_numpy(np.asarray(t))   # zero-copy view of DALI's buffer
        return out.copy_(src.permute(0, 3, 1, 2).expand(n, channels, h, w))

    def __iter__(self) -> Iterator[Batch]:
        s = self.spec
        self._pipe = None  # release the previous epoch's pipeline (threads, buffers) first
        pipe, (lo, hi) = self.build_pipeline(self.epoch)
        self._pipe = pipe
        shard_keys = self.layout.keys[lo:hi]
        per_rank = math.ceil(len(self.layout.keys) / self.dist.world_size)
        try:
            for b in range(self.batches_per_epoch):
                try:
                    image, mask, info, *rest = pipe.run()
                except RuntimeError as e:
                    raise ShardError(f"DALI failed reading {s.shard_dir} split {s.split!r} (shard {lo}..{hi} "
                                     f"of {len(self.layout.keys)} samples): {e}\nIf a shard is damaged, re-run "
                                     f"pack with --overwrite") from e
                keys = [_key(info.at(i)) for i in range(len(info))]
                if s.training:
                    valid = [True] * len(keys)
                else:
                    ordinals = range(b * s.batch_size, b * s.batch_size + len(keys))
                    valid = [k < len(shard_keys) for k in ordinals]
                    for k, key, ok in zip(ordinals, keys, valid):
                        if ok and key != shard_keys[k]:
                            raise RuntimeError(f"DALI returned sample {key!r} where {shard_keys[k]!r} was "
                                               f"expected (shard {lo}..{hi}); the evaluation could count "
                                               f"samples twice, so stopping")
                    keys = [k if ok else "" for k, ok in zip(keys, valid)]
                img = self._to_torch(image, s.in_channels, s.image_dtype)
                msk = self._to_torch(mask, 1, torch.float32)
                pad = None if s.geometry == "squash" else self._to_torch(rest[0], 1, torch.float32)
                if not s.training:
                    # Same batch shapes as the torch loader: the last one holds per_rank - b*B.
                    take = min(len(keys), per_rank - b * s.batch_size)
                    img, msk, keys, valid = img[:take], msk[:take], keys[:take], valid[:take]
                    pad = None if pad is None else pad[:take]
                yield Batch(image=img, mask=msk,
                            valid=torch.tensor(valid, device=self.dist.device), keys=keys, pad=pad)
        finally:
            self._pipe = None
            del pipe
