"""Your own data in the formats it usually comes in: which reader reads a file, and a dataset from a folder or a file.

| file     | what it holds                                                                          |
|----------|----------------------------------------------------------------------------------------|
| `.jsonl` | one record per line: the converted format (`converted`), or LLaVA / ShareGPT records   |
| `.json`  | one JSON list of LLaVA / ShareGPT records (`llava`), or of converted records            |
| `.csv`   | a table with image, question and answer columns (`csv_table`)                          |

A record's own keys say which form it has. Every reader turns its records into the converted form, which
`converted.check_records` checks the same way for all: schema, image tags, every image opening inside the
image folder, unique ids; problems are named FILE:LINE (plus `record [N]` in a JSON list). A record with a
"chosen" or "rejected" answer is preference data (`preference`, finetune_hf_trainer_dpo.py): the supervised
recipes refuse its file in one line.

A dataset is a folder (`train.EXT`, optionally `test.EXT`, and the images under `images/`) or a single file;
without test data, evaluation rows are held out from the training ones (`load_own_data`).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .converted import (FileReport, NumberedRecords, Problem, ValidationError, check_records, find_split_file,
                        read_jsonl, record_images, valid_records)
from .csv_table import read_csv
from .llava import convert_llava_record, is_llava_record, read_json_list
from .rows import Records

SUFFIXES = (".jsonl", ".json", ".csv")
# A preference record's answers (`phivision.data.preference`), and the recipe that trains on them.
CHOSEN, REJECTED = "chosen", "rejected"
DPO_RECIPE = "finetune_hf_trainer_dpo.py"
# Samples with this many images or more are taken for video frames (UCF-101's are 8 frames).
VIDEO_FRAMES = 4


def read_records(path: str | Path) -> NumberedRecords:
    """The records of a data file in the converted form (or the Problem with each bad one), with their lines."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path)
    if suffix not in SUFFIXES:
        raise ValidationError(f"not a data file: expected {', '.join(SUFFIXES)}", path)
    items = read_jsonl(path) if suffix == ".jsonl" else read_json_list(path)
    return [(line, index, _converted(record, path, line, index)) for line, index, record in items]


def _converted(record, path: Path, line: int | None, index: int | None):
    if not is_llava_record(record):
        return record  # a converted record, a Problem, or something check_records rejects with its reason
    try:
        return convert_llava_record(record)
    except ValueError as e:
        return Problem(str(path), line, str(e), index)


def is_preference_record(record: Any) -> bool:
    """Whether a JSON record is preference data (a "chosen" or "rejected" answer, flat or in a turn), which
    `phivision.data.preference` reads and finetune_hf_trainer_dpo.py trains on."""
    if not isinstance(record, dict):
        return False
    turns = record.get("conversations")
    turns = turns if isinstance(turns, list) else []
    return any(isinstance(item, dict) and (CHOSEN in item or REJECTED in item) for item in [record, *turns])


def is_preference_data(items: NumberedRecords) -> bool:
    """Whether any record read from a file is a preference record: the file is preference data."""
    return any(is_preference_record(record) for _, _, record in items)


def refuse_preference_data(path: str | Path, items: NumberedRecords) -> None:
    """Raises a one-line ValidationError at the first preference record: the supervised recipes learn one
    answer per question, and would silently drop the rejected one."""
    for line, index, record in items:
        if is_preference_record(record):
            raise ValidationError([Problem(str(path), line, f"a preference record ('{CHOSEN}' and '{REJECTED}' "
                                           f"answers): train on preference data with {DPO_RECIPE}", index)])


def validate_data_file(path: str | Path, images_dir: str | Path | None = None, *, check_images: bool = True,
                       full_check: bool = False, progress: bool = False,
                       unreadable_images_ok: bool = False) -> FileReport:
    """Reads and checks a data file of any format; images_dir defaults to the images/ folder beside it
    (`unreadable_images_ok`: see `converted.validate_record`). Preference data is refused in one line."""
    items = read_records(path)
    refuse_preference_data(path, items)
    return check_records(path, items, images_dir, check_images=check_images, full_check=full_check,
                         progress=progress, unreadable_images_ok=unreadable_images_ok)


def data_files(folder: str | Path) -> list[Path]:
    """The data files (.jsonl, .json, .csv) in a folder, by name."""
    return sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in SUFFIXES and path.is_file())


class OwnData(NamedTuple):
    """A dataset ready for a recipe: its records in the converted form and where their images are."""

    train: list[dict]
    eval: list[dict]
    images_dir: Path
    eval_source: str  # where the evaluation rows come from, in words


def load_own_data(path: str | Path, images_dir: str | Path | None = None, eval_fraction: float = 0.05,
                  seed: int = 0) -> OwnData:
    """The training and evaluation records of a data folder or a single data file, all checked.

    A folder holds `train.EXT` and optionally `test.EXT` (EXT: jsonl, json or csv; `NAME_train.EXT` also
    does) and, by default, the images in `images/`; a file's images are by default in `images/` beside it.
    Without test data, `eval_fraction` of the training records (at least one, chosen with `seed`) are held
    out for evaluation; 0 means no evaluation. Raises ValidationError naming every problem (an image that is
    there but cannot be read is left to the run, which names and skips its record), or in one line that the
    data is preference data (`refuse_preference_data`).
    """
    return load_split_files(path, images_dir, eval_fraction, seed, SUFFIXES, validate_data_file)


def load_split_files(path: str | Path, images_dir: str | Path | None, eval_fraction: float, seed: int,
                     suffixes: Sequence[str], validate: Callable[..., FileReport]) -> OwnData:
    """`load_own_data` with the data files' `suffixes` and the `validate(file, images_dir, unreadable_images_ok=)`
    that reads and checks one (`validate_data_file`, or `preference.validate_preference_file`)."""
    path = Path(path)
    if not path.exists():
        raise ValidationError("no such file or folder", path)
    folder = path if path.is_dir() else path.parent
    images_dir = Path(images_dir) if images_dir is not None else folder / "images"
    train_file = find_split_file(path, "train", suffixes) if path.is_dir() else path
    test_file = find_split_file(path, "test", suffixes, missing_ok=True) if path.is_dir() else None
    train = valid_records(validate(train_file, images_dir, unreadable_images_ok=True))
    if test_file is not None:
        test = valid_records(validate(test_file, images_dir, unreadable_images_ok=True))
        return OwnData(train, test, images_dir, f"the {len(test)} record(s) of {test_file.name}")
    train, held_out = hold_out_at_random(train, eval_fraction, seed)
    source = (f"{len(held_out)} record(s) held out from {train_file.name} (--eval_fraction {eval_fraction})"
              if held_out else "nothing (no test file, and nothing held out)")
    return OwnData(train, held_out, images_dir, source)


def hold_out_at_random(records: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held out): `fraction` of the records (at least one, and never all) picked at random with `seed`,
    both in their original order (Records keep the FILE:LINE of each, for the run's messages). A fraction of 0
    holds out nothing."""
    count = min(max(1, round(len(records) * fraction)), len(records) - 1) if fraction > 0 else 0
    chosen = set(random.Random(seed).sample(range(len(records)), count))
    kept, held_out = [i for i in range(len(records)) if i not in chosen], sorted(chosen)
    locations = getattr(records, "locations", None)
    if locations is None:
        return [records[i] for i in kept], [records[i] for i in held_out]
    return tuple(Records([records[i] for i in part], [locations[i] for i in part]) for part in (kept, held_out))


def is_video_like(records: Sequence[dict]) -> bool:
    """Whether most samples with images have VIDEO_FRAMES or more (frames of clips rather than photos)."""
    counts = [n for n in (len(record_images(record)) for record in records) if n]
    return bool(counts) and statistics.median(counts) >= VIDEO_FRAMES
