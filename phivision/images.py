"""Reading images: their upright size from the header alone, or the decoded image, with errors that name the file.

A photo stored sideways with an EXIF orientation (phones do this) is used the way it is shown:
turned upright (`upright`), and counted with its upright size (`upright_size`). `model_image` is an
image as every family's image processor takes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb

ORIENTATION = 0x0112  # the EXIF tag; values 5 to 8 turn the image by 90 degrees


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: show the image as stored
        return 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown, from the header (no pixel decoding)."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (itself when it has none)."""
    return ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def decoded(image: Image.Image) -> Image.Image:
    """`image` with its pixels decoded. A file whose pixels cannot be decoded (a truncated JPEG) raises an OSError
    that names the file: PIL's own message ("image file is truncated") does not, and the file is what to fix."""
    try:
        image.load()
    except (OSError, SyntaxError) as e:  # what PIL raises for broken image data
        if not getattr(image, "filename", None):  # decoded from bytes (a Hub row): its row names it
            raise
        raise OSError(f"{image.filename}: {e}") from e
    return image


def image_size(path: str | Path, full_check: bool = False) -> tuple[int, int]:
    """Upright (width, height) from the file header (no pixel decoding unless `full_check`). Raises ValueError."""
    try:
        with Image.open(path) as image:
            if full_check:
                image.load()
            width, height = upright_size(image)
    except FileNotFoundError:
        raise ValueError("not found") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise ValueError(f"cannot be read as an image ({type(e).__name__}: {e})") from None
    if width < 1 or height < 1:
        raise ValueError(f"has size {width}x{height}")
    return width, height


def open_image(path: str | Path, flag: str = "--image") -> Image.Image:
    """The image at `path`, decoded and upright (errors are ValueErrors naming the flag and the file)."""
    try:
        image = Image.open(path)
        image.load()
        image = upright(image)
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise ValueError(f"{flag} {path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    return image


_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(
        f"expected a PIL image, a path or an HxW(xC) numpy array, got {type(image).__name__}; "
        "load tensors or other objects with PIL first"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a PIL image of any mode.

    Transparency is composited onto white (the colour of the HD padding), as transformers' `convert_to_rgb`
    does; the original processor dropped the alpha channel, which gives the same pixels for opaque images.
    16-bit and 32-bit greyscale is scaled to 8 bits rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def model_image(image: Any) -> Image.Image:
    """An image as the image processors take it: opened (a path or an array), decoded, upright, RGB."""
    return to_rgb(upright(decoded(to_pil(image))))
