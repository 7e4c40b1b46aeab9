"""Reading image files: their size from the header alone, or the decoded image, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def image_size(path: str | Path, full_check: bool = False) -> tuple[int, int]:
    """(width, height) from the file header (no pixel decoding unless `full_check`). Raises ValueError."""
    try:
        with Image.open(path) as image:
            if full_check:
                image.load()
            width, height = image.size
    except FileNotFoundError:
        raise ValueError("not found") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise ValueError(f"cannot be read as an image ({type(e).__name__}: {e})") from None
    if width < 1 or height < 1:
        raise ValueError(f"has size {width}x{height}")
    return width, height


def open_image(path: str | Path, flag: str = "--image") -> Image.Image:
    """The image at `path`, decoded (errors are ValueErrors naming the flag and the file)."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise ValueError(f"{flag} {path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    return image
