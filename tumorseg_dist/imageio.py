"""Reading image files: the one reader `pack`, `predict` and `export` use for a user's files.

Ground floor (imports nothing from the package), so the data formats and the entry points can
both use it. A file that cannot be read is an `ImageFileError` naming the file, the problem and
the fix; `pack` turns it into a skipped sample, `predict` into a line of skipped.csv.
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
            import tifffile
            with tifffile.TiffFile(io.BytesIO(data)) as tf:
                arr = tf.pages[0].asarray()
        elif ext == ".png" and _png_is_16bit_colour(data):
            import imagecodecs
            arr = imagecodecs.png_decode(data)
        else:
            with Image.open(io.BytesIO(data)) as im:
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
