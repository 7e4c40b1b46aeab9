"""Reading images: their upright size from the header alone, or the decoded image, with errors that name the file.

A photo stored sideways with an EXIF orientation (phones do this) is used the way it is shown:
turned upright (`upright`), and counted with its upright size (`upright_size`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

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
