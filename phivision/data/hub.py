"""Datasets from the Hugging Face Hub or local copies of them, and the_cauldron's row layout."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..distributed import main_process_first
from ..errors import SetupError, first_line
from .rows import name_rows

SPLIT_FILE = re.compile(r"^(train|test|val|validation|dev)[-_.]")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class DatasetError(SetupError, ValueError):
    """A dataset that cannot be loaded as given."""


def looks_like_a_path(name_or_path: str) -> bool:
    """True for what cannot be a Hub id (`name` or `org/name`): ./x, /x, ~/x, a/b/c, C:\\x."""
    return not HUB_ID.match(name_or_path) or name_or_path.startswith(".")


def missing_local_folder(name_or_path: str) -> bool:
    """True for a local path that is not there (the Hub would answer it with "Repo id must be in the form ...")."""
    return looks_like_a_path(name_or_path) and not Path(name_or_path).expanduser().exists()


def load_hf_dataset(name_or_path: str, config_name: str | None = None, split: str = "train"):
    """One split of a Hub dataset, or of a local copy with the same schema.

    A local copy is a directory written by `DatasetDict.save_to_disk` (a single `Dataset` there
    counts as its train split), or a folder of parquet files named by split (`train-*.parquet`,
    `test-*.parquet`...); parquet files named after no split are all the train split. Messages
    name its rows "NAME [split] row N". Under torchrun the first process of each node loads first
    (downloads, builds the cache), then the others read it.
    """
    local = Path(name_or_path).expanduser().exists()  # a local copy: its config name plays no part
    label = name_or_path if local else " ".join(part for part in (name_or_path, config_name) if part)
    with main_process_first():  # a job's N nodes (x GPUs) don't fetch the same dataset N times at once
        rows = _load(name_or_path, config_name, split)
    return name_rows(rows, f"{label} [{split}]")


def _load(name_or_path: str, config_name: str | None, split: str):
    import datasets

    path = Path(name_or_path).expanduser()
    if not path.exists():
        if looks_like_a_path(name_or_path):
            raise DatasetError(f"{name_or_path}: no such folder")
        try:
            return datasets.load_dataset(name_or_path, config_name, split=split)
        except Exception as e:  # noqa: BLE001 - offline, no such dataset or config, no such split...
            raise DatasetError(f"{name_or_path}: not a local folder, and loading it from the Hub failed "
                               f"({first_line(e)})") from None
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder (a saved dataset or a folder of parquet files)")
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({"train": loaded})
        if split not in loaded:
            raise DatasetError(f"{path} has splits {list(loaded)}, not {split!r}")
        return loaded[split]
    files = sorted(path.rglob("*.parquet"))
    parquet = [p for p in files if p.name.startswith((f"{split}-", f"{split}_", f"{split}."))]
    if not parquet and split == "train" and not any(SPLIT_FILE.match(p.name) for p in files):
        parquet = files  # unnamed files: one split
    if not parquet:
        found = sorted({m.group(1) for p in files if (m := SPLIT_FILE.match(p.name))})
        raise DatasetError(
            f"{path}: no saved dataset (dataset_dict.json) and no parquet files for split {split!r}"
            + (f" (parquet splits found: {found})" if found else "")
        )
    return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")


def hold_out_first(rows, num_eval: int):
    """(train rows, eval rows): the first `num_eval` rows evaluate, the rest train."""
    if len(rows) <= num_eval:
        raise DatasetError(f"the dataset has {len(rows)} rows, and its first {num_eval} are held out for evaluation: "
                           "no row is left to train on")
    name, first_row = getattr(rows, "row_names", ("dataset", 0))
    return (name_rows(rows.select(range(num_eval, len(rows))), name, first_row + num_eval),
            name_rows(rows.select(range(num_eval)), name, first_row))


def cauldron_example(row: dict) -> tuple[list[dict], list]:
    """A HuggingFaceM4/the_cauldron row (`images`, `texts` [{user, assistant}]) -> (conversation, images).

    The row's images belong to its first question, as the_cauldron lays them out.
    """
    turns = [{"user": t["user"], "assistant": t["assistant"]} for t in row["texts"]]
    turns[0]["images"] = row["images"]
    return turns, row["images"]


def sizes_only(rows):
    """`rows` as seen for counting tokens: a datasets.Dataset's images opened, not decoded.

    datasets decodes every image it returns; token counts need only the sizes, which PIL reads
    from the file header. Other sequences (lists of records) are returned as they are.
    """
    import datasets

    return _HeaderOnlyRows(rows) if isinstance(rows, datasets.Dataset) else rows


class _HeaderOnlyRows(Sequence):
    """Rows of a datasets.Dataset read as Arrow, with every image struct opened lazily by PIL."""

    def __init__(self, dataset):
        self.arrow = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, index: int) -> dict:
        return _open_images(self.arrow[index].to_pylist()[0])


def open_hub_image(image):
    """A Hub row's image opened (not decoded): a PIL image as it is, or datasets' stored form, a dict with the
    file's "bytes" or its "path"."""
    if isinstance(image, dict):
        data = image.get("bytes")
        return Image.open(io.BytesIO(data) if data is not None else image["path"])
    return image


def _open_images(value):
    if isinstance(value, dict):
        if value.keys() == {"bytes", "path"}:  # how datasets stores an image
            return open_hub_image(value)
        return {key: _open_images(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_open_images(item) for item in value]
    return value
