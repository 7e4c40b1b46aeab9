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


def name_rows(rows: Any, name: str, first_row: int = 0) -> Any:
    """Tells `row_location` how to name the rows of a dataset: "NAME row N", N counted from `first_row`."""
    rows.row_names = (name, first_row)
    return rows


def row_location(rows: Sequence[Any], index: int) -> str:
    """FILE:LINE of a converted record, "DATASET [split] row N" of a Hub dataset's row, else "row N"."""
    locations = getattr(rows, "locations", None)
    if locations is not None:
        return locations[index]
    name, first_row = getattr(rows, "row_names", ("", 0))
    return f"{name} row {first_row + index}" if name else f"row {index}"


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
