"""Reading image files: the one reader `pack`, `predict` and `export` use for a user's files.

Ground floor (imports nothing from the package), so the data formats and the entry points can
both use it. A file that cannot be read is an `ImageFileError` naming the file, the problem and
the fix; `pack` turns it into a skipped sample, `predict` into a line of skipped.csv.

What counts as an image is decided here, once: one 2D picture per file, grey, grey+alpha, RGB or
RGBA. For TIFF the file's own tags decide, never the array's shape (a (3, H, W) array is colour
planes or a 3-slice stack only by its tags): one page (a multi-page file is a stack and is
refused, whatever its shape), whose samples per pixel are 1 (grey), 3 marked RGB (or YCbCr), 4
marked RGB + alpha, or 2 marked grey + alpha, stored interleaved (H, W, C) or planar (C, H, W);
planar samples are moved to channels-last. Anything else (5 channels, 4 unmarked planes, CMYK)
is refused with the file, its shape and what is supported. The same holds for every other
format: a file of several frames (an animated PNG, a multi-frame GIF saved as .png) is a stack
and refused. A multi-picture JPEG (MPO: the photo plus previews or a depth map of the same
scene) is the one exception: its first picture is the image.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
TIFF_EXTS = {".tif", ".tiff"}
JPEG_EXTS = {".jpg", ".jpeg"}


class ImageFileError(ValueError):
    """One input file is not a usable image: names the file, says what is wrong and the fix."""

    def __init__(self, source: str, reason: str, fix: str = ""):
        self.source, self.reason, self.fix = source, reason, fix
        super().__init__(f"{source}: {reason}" + (f"; {fix}" if fix else ""))


def _png_is_16bit_colour(data: bytes) -> bool:
    # IHDR: bit depth at byte 24, colour type at byte 25 (2 = RGB, 6 = RGBA, 4 = grey+alpha).
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 26 and data[24] == 16 and data[25] in (2, 4, 6)


def read_array(path: Path, source: str, *, as_mask: bool = False) -> np.ndarray:
    """Decode an image file to H×W or H×W×C, keeping dtype and channels.

    TIFF goes through tifffile (uncompressed, LZW, deflate, ... via imagecodecs), 16-bit colour
    PNG through imagecodecs (Pillow would drop it to 8 bit), everything else through Pillow.
    For masks, palette images keep their indices and alpha channels are dropped."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageFileError(source, f"cannot be read ({e.strerror})", "check the path and permissions") from e
    if size == 0:
        raise ImageFileError(source, "is an empty (0-byte) file", "re-copy it from the original data or remove it")
    ext = path.suffix.lower()
    try:
        data = path.read_bytes()
        if ext in TIFF_EXTS:
            arr = _read_tiff(data, source)
        elif ext == ".png" and _png_is_16bit_colour(data):
            import imagecodecs
            arr = imagecodecs.png_decode(data)
        else:
            with Image.open(io.BytesIO(data)) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1 and im.format != "MPO":
                    raise ImageFileError(source, f"is a stack of {frames} frames ({im.format}, each "
                                                 f"{im.width}x{im.height}), not one 2D image: one picture per file is read",
                                         "save each frame as its own file")
                im.load()
                arr = _pil_to_array(im, as_mask)
    except ImageFileError:
        raise
    except Exception as e:  # PIL/tifffile raise many types for corrupt data
        raise ImageFileError(source, f"cannot be decoded as an image ({type(e).__name__}: {e}); "
                                     f"it is truncated, corrupt or not an image",
                             "re-export or re-copy it, or remove it") from e
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageFileError(source, f"has shape {arr.shape}, not a 2D image", "export one 2D slice per file")
    if as_mask and arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[:, :, :-1]   # drop alpha: LA -> L, RGBA -> RGB
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


SUPPORTED = ("supported: one 2D image per file, grey (H, W), or grey+alpha, RGB or RGBA as the "
             "TIFF's photometric/extra-sample tags mark them, interleaved (H, W, C) or planar (C, H, W)")


def _read_tiff(data: bytes, source: str) -> np.ndarray:
    """The file's one image as H×W or H×W×C, by the rule in the module docstring."""
    import tifffile
    from tifffile import EXTRASAMPLE, PHOTOMETRIC, PLANARCONFIG
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        series = tf.series[0]
        if len(series.pages) > 1:
            raise ImageFileError(source, f"is a stack of {len(series.pages)} images (shape "
                                         f"{tuple(series.shape)}, axes {series.axes}), not one 2D image; "
                                 + SUPPORTED, "save each slice as its own file, e.g. "
                                 "tifffile.imwrite(path, plane, photometric='minisblack')")
        page = series.pages[0]
        arr = page.asarray()
        spp, photo = page.samplesperpixel, page.photometric
        extras = tuple(page.extrasamples)
    alpha = extras in ((EXTRASAMPLE.ASSOCALPHA,), (EXTRASAMPLE.UNASSALPHA,))
    grey = photo in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE, PHOTOMETRIC.PALETTE)
    colour = photo in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR)
    if not (spp == 1 or (spp == 2 and grey and alpha) or (spp == 3 and colour and not extras)
            or (spp == 4 and colour and alpha)):
        name = getattr(PHOTOMETRIC(photo), "name", photo)
        raise ImageFileError(source, f"has {spp} samples per pixel (shape {arr.shape}, photometric "
                                     f"{name}{', no alpha tag' if spp in (2, 4) and not alpha else ''}), "
                                     f"not a grey or colour image; " + SUPPORTED,
                             "save each channel as its own grey file, or the image as RGB/RGBA "
                             "(tifffile.imwrite(path, rgb, photometric='rgb'))")
    if spp > 1 and page.planarconfig == PLANARCONFIG.SEPARATE:
        arr = np.moveaxis(arr, 0, -1)   # planar (C, H, W) -> (H, W, C)
    return arr


def _pil_to_array(im: Image.Image, as_mask: bool) -> np.ndarray:
    mode = im.mode
    if mode == "P" and as_mask:
        return np.asarray(im)                  # label indices: non-zero = tumour
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "I":
        arr = np.asarray(im)
        if arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        return arr
    return np.asarray(im)


def read_image(path: Path) -> np.ndarray:
    """Read an image file as float32 H×W or H×W×C in [0, 1]; ImageFileError if it cannot be.

    Decoded exactly as `pack` decodes it and scaled as the loader scales packed images (16-bit /
    65535, else / 255), so a raw file reaches the model with the values it had in training."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(str(path), "no such file")
    arr = read_array(path, str(path))
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return arr.astype(np.float32) / scale
