"""The converted-data format (what convert_ucf101.py writes; also the format for your own data).

    data_dir/images/...                       the images, in any sub-folders
    data_dir/ucf101_{split}.jsonl             one record per line ({split}.jsonl or one *_{split}.jsonl also do)

A record is `{"id": str, "source": str (optional), "conversations": [turn, ...]}` and a turn
`{"images": [paths relative to images/] (optional), "user": str, "assistant": str}`. Images are
numbered 1, 2, ... over the whole conversation; a user text may place its turn's images with the
tags `<|image_N|>` (all of that turn's images, each once, in order), otherwise they go before the text.

Check a folder (schema, images, token counts) before training:

    python -m phivision.data validate DATA_DIR [--num_crops 4 --max_seq_length 8192 --model_name_or_path M]

The training scripts run the same checks through `load_jsonl_dataset` and stop at a bad line with
FILE:LINE and what is wrong (an image that is there but cannot be read is named and skipped instead, within
--max_bad_samples). LLaVA JSON and CSV files are read into this form (`phivision.data.formats`) and
checked by the same code (`check_records`), and so is preference data (`preference`), whose last turn also has
"rejected".
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from ..chat import IMAGE_TAG, image_tag_problem
from ..errors import SetupError
from ..images import image_size
from .rows import Records

SPLITS = ("train", "val", "test")
TURN_KEYS = {"user", "assistant", "images"}
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, at FILE:LINE (line None: the file or folder as a whole).

    `record`: the record's position in a JSON list (LLaVA files), counted from 0 as in `data[3]`; its line
    is the one where the record starts.
    """

    path: str
    line: int | None
    message: str
    record: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        record = f"record [{self.record}]: " if self.record is not None else ""
        return f"{where}: {record}{self.message}"


class ValidationError(SetupError, ValueError):
    """Bad data. `problems` lists them all; `path`, `line` and `message` are the first one's."""

    def __init__(self, problems: Sequence[Problem] | str, path: str | Path | None = None, line: int | None = None):
        if isinstance(problems, str):
            problems = [Problem(str(path) if path is not None else "<record>", line, problems)]
        self.problems = list(problems)
        first = self.problems[0]
        self.path, self.line, self.message = first.path, first.line, first.message
        if len(self.problems) == 1:
            text = str(first)
        else:
            shown = "\n".join(f"  {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN])
            more = len(self.problems) - MAX_PROBLEMS_SHOWN
            text = f"{len(self.problems)} problems in the data:\n{shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(text)


# ----------------------------------------------------------------------------- one record

def record_images(record: dict) -> list[str]:
    """The image paths of a record, over all turns, in order (image 1, 2, ...)."""
    return [path for turn in record["conversations"] for path in (turn.get("images") or [])]


def image_path_problem(path: Any) -> str | None:
    """Why an image path is not a plain relative path inside images/ (None when it is)."""
    if not isinstance(path, str) or not path.strip():
        return f"image path must be a non-empty string, got {path!r}"
    if "\\" in path:
        return f"image path {path!r} has a backslash: use '/' between folders"
    if PurePosixPath(path).is_absolute() or re.match(r"^[A-Za-z]:", path):
        return f"image path {path!r} is absolute: paths are relative to the images/ folder"
    if ".." in PurePosixPath(path).parts:
        return f"image path {path!r} has '..': paths must stay inside the images/ folder"
    return None


def _schema_problem(record: Any, last_turn_keys: Collection[str] = ()) -> str | None:
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if "id" not in record:
        return "missing 'id'"
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool) or record["id"] == "":
        return f"'id' must be a non-empty string, got {record['id']!r}"
    if "source" in record and not isinstance(record["source"], str):
        return f"'source' must be a string, got {record['source']!r}"
    turns = record.get("conversations")
    if "conversations" not in record:
        return "missing 'conversations' (a list of {\"images\", \"user\", \"assistant\"} turns)"
    if not isinstance(turns, list) or not turns:
        return f"'conversations' must be a non-empty list of turns, got {turns!r:.80}"
    first_image = 1
    for t, turn in enumerate(turns):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            return f"{where} must be an object with 'user' and 'assistant', got {turn!r:.80}"
        unknown = sorted(set(turn) - TURN_KEYS - (set(last_turn_keys) if t == len(turns) - 1 else set()))
        if unknown:
            return f"{where} has unknown key(s) {', '.join(map(repr, unknown))} (a turn has 'images', 'user', 'assistant')"
        for key in ("user", "assistant"):
            if key not in turn:
                return f"{where} is missing '{key}'"
            if not isinstance(turn[key], str):
                return f"{where}['{key}'] must be a string, got {turn[key]!r:.80}"
        if not turn["assistant"].strip():
            return f"{where}['assistant'] is empty: nothing to learn"
        images = turn.get("images")
        images = [] if images is None else images
        if not isinstance(images, list):
            return f"{where}['images'] must be a list of paths, got {images!r:.80}"
        for path in images:
            problem = image_path_problem(path)
            if problem:
                return f"{where}: {problem}"
        # Tags, as the processor reads them: none (the turn's images go first), or exactly this turn's.
        if IMAGE_TAG.search(turn["user"]):
            problem = image_tag_problem(turn["user"], len(images), first_image)
            if problem:
                return f"{where}['user']: {problem}"
        if IMAGE_TAG.search(turn["assistant"]):
            return f"{where}['assistant'] has an image tag: tags belong in the user text"
        first_image += len(images)
    return None


def validate_record(
    record: Any,
    images_dir: str | Path | None = None,
    *,
    path: str | Path | None = None,
    line: int | None = None,
    full_check: bool = False,
    size_cache: dict[str, tuple[int, int]] | None = None,
    unreadable_images_ok: bool = False,
    last_turn_keys: Collection[str] = (),
) -> list[tuple[int, int]]:
    """Checks one record; returns the (width, height) of its images (empty without images_dir).

    Schema, image paths (relative, inside images/), image tags; with `images_dir` also that every
    image exists and opens (header only; `full_check` decodes the pixels too). Raises ValidationError
    naming `path:line` when given. With `unreadable_images_ok` an image that is there but cannot be read
    is no problem here (and has no size): a training run names and skips its record, as it does a Hub row's.
    `last_turn_keys`: keys the last turn may have besides TURN_KEYS, checked by the record's reader (a
    preference record's "rejected", `phivision.data.preference`).
    """
    problem = _schema_problem(record, last_turn_keys)
    if problem:
        raise ValidationError(problem, path, line)
    if images_dir is None:
        return []
    sizes = []
    for rel in record_images(record):
        if size_cache is not None and rel in size_cache:
            sizes.append(size_cache[rel])
            continue
        file = Path(images_dir) / rel
        if not file.is_file():
            raise ValidationError(f"image {rel!r} not found ({file})", path, line)
        try:
            size = image_size(file, full_check)
        except ValueError as e:
            if unreadable_images_ok:
                continue
            raise ValidationError(f"image {rel!r} {e}", path, line) from None
        if size_cache is not None:
            size_cache[rel] = size
        sizes.append(size)
    return sizes


# ----------------------------------------------------------------------------- files and folders

def find_split_file(data_dir: str | Path, split: str, suffixes: Sequence[str] = (".jsonl",),
                    missing_ok: bool = False) -> Path | None:
    """The data file of a split: ucf101_{split}.jsonl, else {split}.EXT, else the one *_{split}.EXT (EXT one of
    `suffixes`). None when there is none and `missing_ok`; several are an error."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValidationError(f"no such folder (expected images/ and {split} data files in it)", data_dir)
    if ".jsonl" in suffixes and (data_dir / f"ucf101_{split}.jsonl").is_file():
        return data_dir / f"ucf101_{split}.jsonl"
    matches = [data_dir / f"{split}{suffix}" for suffix in suffixes if (data_dir / f"{split}{suffix}").is_file()]
    if not matches:
        matches = sorted(path for suffix in suffixes for path in data_dir.glob(f"*_{split}{suffix}"))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValidationError(f"several {split} files ({', '.join(m.name for m in matches)}): keep one", data_dir)
    if missing_ok:
        return None
    names = " or ".join(f"{split}{suffix}" for suffix in suffixes)
    raise ValidationError(f"no {split} data: expected {names} (or NAME_{split}{suffixes[0]}) in it", data_dir)


@dataclass
class FileReport:
    """What validating one data file found: its valid records (converted form), their image sizes and lines."""

    path: Path
    records: list[dict] = field(default_factory=list)
    image_sizes: list[list[tuple[int, int]]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# What a reader makes of a file: per record (its line, its position in a JSON list or None, the record in the
# converted form or the Problem with it).
NumberedRecords = list[tuple[int | None, int | None, Any]]


def read_jsonl(jsonl: str | Path) -> NumberedRecords:
    """The JSON object of every non-empty line, or the Problem of a line that is not JSON."""
    jsonl = Path(jsonl)
    lines = jsonl.read_bytes().split(b"\n")
    items: NumberedRecords = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            items.append((number, None, json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))))
        except UnicodeDecodeError as e:
            items.append((number, None, Problem(str(jsonl), number, f"not UTF-8 text ({e})")))
        except json.JSONDecodeError as e:
            items.append((number, None, Problem(str(jsonl), number, f"not valid JSON ({e})")))
    return items


def check_records(
    path: str | Path,
    items: NumberedRecords,
    images_dir: str | Path | None = None,
    *,
    check_images: bool = True,
    full_check: bool = False,
    progress: bool = False,
    unreadable_images_ok: bool = False,
    last_turn_keys: Collection[str] = (),
) -> FileReport:
    """Checks records read from `path` (`validate_record`, unique ids, images under images_dir, which defaults
    to the images/ folder beside the file). Collects all problems instead of stopping."""
    from tqdm.auto import tqdm

    path = Path(path)
    images_dir = Path(images_dir) if images_dir is not None else path.parent / "images"
    report = FileReport(path)
    where = str(path)
    no_images_dir = check_images and not images_dir.is_dir()
    if no_images_dir:
        check_images = False  # reported once below, if any record has images
    seen: dict[str, str] = {}
    cache: dict[str, tuple[int, int]] = {}
    for line, index, record in tqdm(items, desc=f"Checking {path.name}", unit="record", disable=not progress):
        if isinstance(record, Problem):
            report.problems.append(record)
            continue
        try:
            sizes = validate_record(record, images_dir if check_images else None, path=where, line=line,
                                    full_check=full_check, size_cache=cache,
                                    unreadable_images_ok=unreadable_images_ok, last_turn_keys=last_turn_keys)
        except ValidationError as e:
            report.problems.extend(replace(problem, record=index) for problem in e.problems)
            continue
        key = str(record["id"])
        if key in seen:
            report.problems.append(Problem(where, line, f"id {key!r} already used on {seen[key]}", index))
            continue
        seen[key] = f"line {line}" if index is None else f"record [{index}] (line {line})"
        report.records.append(record)
        report.image_sizes.append(sizes)
        report.lines.append(line)
    if no_images_dir and any(record_images(r) for r in report.records):
        report.problems.insert(0, Problem(where, None, f"no images folder {images_dir} (image paths are relative to it)"))
    return report


def validate_file(
    jsonl: str | Path,
    images_dir: str | Path | None = None,
    *,
    check_images: bool = True,
    full_check: bool = False,
    progress: bool = False,
    unreadable_images_ok: bool = False,
) -> FileReport:
    """Checks every line of a jsonl file (JSON, schema, unique ids, images under images_dir, which
    defaults to the images/ folder beside the file). Collects all problems instead of stopping."""
    return check_records(jsonl, read_jsonl(jsonl), images_dir, check_images=check_images, full_check=full_check,
                         progress=progress, unreadable_images_ok=unreadable_images_ok)


def valid_records(report: FileReport) -> Records:
    """The report's records with the FILE:LINE of each; raises ValidationError listing every problem
    (FILE:LINE: what is wrong), or saying the file has no records."""
    if report.problems:
        raise ValidationError(report.problems)
    if not report.records:
        raise ValidationError("no records", report.path)
    return Records(report.records, [f"{report.path}:{line}" for line in report.lines])


def load_jsonl_dataset(data_dir: str | Path, split: str, *, check_images: bool = True,
                       full_check: bool = False) -> Records:
    """The records of one split (`find_split_file`), all validated (see `validate_file`), with their FILE:LINE.

    Raises ValidationError listing every bad line as FILE:LINE: what is wrong. An image that is there but cannot
    be read is left to the run, which names and skips its record within --max_bad_samples (with `full_check`,
    which decodes every image, it is a bad line too)."""
    return valid_records(validate_file(find_split_file(data_dir, split), Path(data_dir) / "images",
                                       check_images=check_images, full_check=full_check,
                                       unreadable_images_ok=not full_check))


def record_example(record: dict, images_dir: str | Path) -> tuple[list[dict], list]:
    """A converted record -> (conversation, images), as a recipe's `format_example` returns it.

    Images are opened, not decoded: counting tokens at start reads only their sizes, and the
    processor decodes (and converts to RGB) the ones it trains on.
    """
    return record["conversations"], [Image.open(Path(images_dir) / path) for path in record_images(record)]


def first_image(records: Sequence[dict], images_dir: str | Path) -> str | None:
    """The path of the first image of the records (for the "Try it with" command), None without images."""
    return next((str(Path(images_dir) / path) for record in records for path in record_images(record)), None)
