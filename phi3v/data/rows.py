"""Where a row comes from, for messages about it, and which errors mean the row itself is unreadable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

# What decoding a broken image (or a record the processor rejects) raises: the row is bad, not the program.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class Records(list):
    """Records of a jsonl file, with the FILE:LINE each one came from."""

    def __init__(self, records: Sequence[dict], locations: Sequence[str]):
        super().__init__(records)
        self.locations = list(locations)


def row_location(rows: Sequence[Any], index: int) -> str:
    """FILE:LINE of a converted record, "DATASET split row N" of a Hub dataset row, else "row N"."""
    locations = getattr(rows, "locations", None)
    if locations is not None:
        return locations[index]
    info = getattr(rows, "info", None)
    if info is None:
        return f"row {index}"
    mapping = getattr(rows, "_indices", None)  # a .select()ed dataset: name the row of the whole split
    original = mapping.column(0)[index].as_py() if mapping is not None else index
    name = " ".join(str(part) for part in (info.dataset_name, info.config_name, getattr(rows, "split", None)) if part)
    return f"{name or 'dataset'} row {original}"


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
