"""The converted-data format (what convert_ucf101.py writes; also the format for your own data).

    data_dir/images/...                       the images, in any sub-folders
    data_dir/ucf101_{split}.jsonl             one record per line ({split}.jsonl or one *_{split}.jsonl also do)

A record is `{"id": str, "source": str (optional), "conversations": [turn, ...]}` and a turn
`{"images": [paths relative to images/] (optional), "user": str, "assistant": str}`. Images are
numbered 1, 2, ... over the whole conversation; a user text may place its turn's images with the
tags `<|image_N|>` (all of that turn's images, each once, in order), otherwise they go before the text.

Check a folder (schema, images, token counts) before training:

    python -m phi3v.data validate DATA_DIR [--num_crops 4 --max_seq_length 8192 --model_name_or_path M]

The training scripts run the same checks through `load_jsonl_dataset` and stop at a bad line with
FILE:LINE and what is wrong.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
SPLITS = ("train", "val", "test")
TURN_KEYS = {"user", "assistant", "images"}
DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, at FILE:LINE (line None: the file or folder as a whole)."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line is not None else f"{self.path}: {self.message}"


class ValidationError(ValueError):
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


def _schema_problem(record: Any) -> str | None:
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
        unknown = sorted(set(turn) - TURN_KEYS)
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
        numbers = [int(n) for n in IMAGE_TAG.findall(turn["user"])]
        expected = list(range(first_image, first_image + len(images)))
        if numbers and numbers != expected:
            tags = ", ".join(f"<|image_{n}|>" for n in numbers)
            wanted = ", ".join(f"<|image_{n}|>" for n in expected) or "no tags"
            return (f"{where}['user'] has the image tags {tags} but the turn has {len(images)} image(s): "
                    f"expected {wanted} (each once, in order; images are numbered over the whole conversation)")
        if IMAGE_TAG.search(turn["assistant"]):
            return f"{where}['assistant'] has an image tag: tags belong in the user text"
        first_image += len(images)
    return None


def image_size(path: Path, full_check: bool = False) -> tuple[int, int]:
    """(width, height) from the file header (no pixel decoding unless full_check). Raises ValueError."""
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


def validate_record(
    record: Any,
    images_dir: str | Path | None = None,
    *,
    path: str | Path | None = None,
    line: int | None = None,
    full_check: bool = False,
    size_cache: dict[str, tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Checks one record; returns the (width, height) of its images (empty without images_dir).

    Schema, image paths (relative, inside images/), image tags; with `images_dir` also that every
    image exists and opens (header only; `full_check` decodes the pixels too). Raises ValidationError
    naming `path:line` when given.
    """
    problem = _schema_problem(record)
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
            raise ValidationError(f"image {rel!r} {e}", path, line) from None
        if size_cache is not None:
            size_cache[rel] = size
        sizes.append(size)
    return sizes


def count_tokens(
    record: dict,
    processor,
    num_crops: int,
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    images_dir: str | Path | None = None,
) -> int:
    """Tokens of one record (prompts, image tokens, answers) at `num_crops`, without pixel work.

    Image sizes (width, height) come from `image_sizes`, else from the files' headers under `images_dir`.
    """
    from .collator import count_tokens as count_conversation_tokens

    if image_sizes is None:
        paths = record_images(record)
        if paths and images_dir is None:
            raise ValueError("count_tokens needs image_sizes or images_dir for a record with images")
        image_sizes = [image_size(Path(images_dir) / p) for p in paths]
    return count_conversation_tokens(processor, record["conversations"], image_sizes, num_crops)


# ----------------------------------------------------------------------------- files and folders

def find_split_file(data_dir: str | Path, split: str) -> Path:
    """The jsonl of a split: ucf101_{split}.jsonl, else {split}.jsonl, else the one *_{split}.jsonl."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValidationError(f"no such folder (expected images/ and {split} jsonl files in it)", data_dir)
    for name in (f"ucf101_{split}.jsonl", f"{split}.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    matches = sorted(data_dir.glob(f"*_{split}.jsonl"))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValidationError(f"several {split} files ({', '.join(m.name for m in matches)}): keep one", data_dir)
    raise ValidationError(f"no {split} data: expected ucf101_{split}.jsonl (or {split}.jsonl) in it", data_dir)


@dataclass
class FileReport:
    """What validating one jsonl file found."""

    path: Path
    records: list[dict] = field(default_factory=list)
    image_sizes: list[list[tuple[int, int]]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def validate_file(
    jsonl: str | Path,
    images_dir: str | Path | None = None,
    *,
    check_images: bool = True,
    full_check: bool = False,
    progress: bool = False,
) -> FileReport:
    """Checks every line of a jsonl file (JSON, schema, unique ids, images under images_dir, which
    defaults to the images/ folder beside the file). Collects all problems instead of stopping."""
    jsonl = Path(jsonl)
    images_dir = Path(images_dir) if images_dir is not None else jsonl.parent / "images"
    report = FileReport(jsonl)
    where = str(jsonl)
    no_images_dir = check_images and not images_dir.is_dir()
    if no_images_dir:
        check_images = False  # reported once below, if any record has images
    ids: dict[str, int] = {}
    cache: dict[str, tuple[int, int]] = {}
    lines = jsonl.read_bytes().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the final newline
    from tqdm.auto import tqdm

    for number, raw in enumerate(tqdm(lines, desc=f"Checking {jsonl.name}", unit="line", disable=not progress), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            report.problems.append(Problem(where, number, f"not UTF-8 text ({e})"))
            continue
        except json.JSONDecodeError as e:
            report.problems.append(Problem(where, number, f"not valid JSON ({e})"))
            continue
        try:
            sizes = validate_record(record, images_dir if check_images else None, path=where, line=number,
                                    full_check=full_check, size_cache=cache)
        except ValidationError as e:
            report.problems.extend(e.problems)
            continue
        key = str(record["id"])
        if key in ids:
            report.problems.append(Problem(where, number, f"id {key!r} already used on line {ids[key]}"))
            continue
        ids[key] = number
        report.records.append(record)
        report.image_sizes.append(sizes)
        report.lines.append(number)
    if no_images_dir and any(record_images(r) for r in report.records):
        report.problems.insert(0, Problem(where, None, f"no images folder {images_dir} (image paths are relative to it)"))
    return report


def load_jsonl_dataset(data_dir: str | Path, split: str, *, check_images: bool = True,
                       full_check: bool = False) -> list[dict]:
    """The records of one split (`find_split_file`), all validated (see `validate_file`).

    Raises ValidationError listing every bad line as FILE:LINE: what is wrong."""
    report = validate_file(find_split_file(data_dir, split), Path(data_dir) / "images",
                           check_images=check_images, full_check=full_check)
    if report.problems:
        raise ValidationError(report.problems)
    if not report.records:
        raise ValidationError("no records", report.path)
    return report.records


# ----------------------------------------------------------------------------- Hub datasets and local copies

SPLIT_FILE = re.compile(r"^(train|test|val|validation|dev)[-_.]")


def load_hf_dataset(name_or_path: str, config_name: str | None = None, split: str = "train"):
    """One split of a Hub dataset, or of a local copy with the same schema.

    A local copy is a directory written by `DatasetDict.save_to_disk` (a single `Dataset` there
    counts as its train split), or a folder of parquet files named by split (`train-*.parquet`,
    `test-*.parquet`...); parquet files named after no split are all the train split.
    """
    import datasets

    path = Path(name_or_path)
    if not path.exists():
        return datasets.load_dataset(name_or_path, config_name, split=split)
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({"train": loaded})
        if split not in loaded:
            raise ValueError(f"{path} has splits {list(loaded)}, not {split!r}")
        return loaded[split]
    files = sorted(path.rglob("*.parquet"))
    parquet = [p for p in files if p.name.startswith((f"{split}-", f"{split}_", f"{split}."))]
    if not parquet and split == "train" and not any(SPLIT_FILE.match(p.name) for p in files):
        parquet = files  # unnamed files: one split
    if not parquet:
        found = sorted({m.group(1) for p in files if (m := SPLIT_FILE.match(p.name))})
        raise FileNotFoundError(
            f"{path}: no saved dataset (dataset_dict.json) and no parquet files for split {split!r}"
            + (f" (parquet splits found: {found})" if found else "")
        )
    return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")


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


def _open_images(value):
    if isinstance(value, dict):
        if value.keys() == {"bytes", "path"}:  # how datasets stores an image
            return Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"])
        return {key: _open_images(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_open_images(item) for item in value]
    return value


# ----------------------------------------------------------------------------- the validate command

def load_processor(model_name_or_path: str):
    from .processing import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(model_name_or_path)


def token_report(report: FileReport, processor, num_crops: int, max_seq_length: int | None,
                 progress: bool = False) -> tuple[list[str], list[Problem]]:
    """Lines describing the token counts of a file's (valid) records, and records the processor rejects."""
    from tqdm.auto import tqdm

    counts, problems, over = [], [], []
    items = zip(report.records, report.image_sizes, report.lines)
    for record, sizes, line in tqdm(items, total=len(report.records), desc=f"Counting tokens {report.path.name}",
                                    unit="record", disable=not progress):
        try:
            n = count_tokens(record, processor, num_crops, image_sizes=sizes)
        except ValueError as e:
            problems.append(Problem(str(report.path), line, f"the processor rejects it: {e}"))
            continue
        counts.append(n)
        if max_seq_length is not None and n > max_seq_length:
            over.append((line, record["id"], n))
    if not counts:
        return [], problems
    text = [f"  tokens at num_crops {num_crops}: max {max(counts)}, mean {sum(counts) / len(counts):.0f}, "
            f"min {min(counts)}"]
    if max_seq_length is not None:
        text.append(f"  {len(over)} of {len(counts)} record(s) over --max_seq_length {max_seq_length} "
                    f"(training skips them)" + (":" if over else ""))
        text += [f"    line {line} (id {rid}): {n} tokens" for line, rid, n in over[:10]]
        if len(over) > 10:
            text.append(f"    ... and {len(over) - 10} more")
    return text, problems


def _split_order(path: Path) -> tuple[int, str]:
    """train, val, test first, then any other file, by name."""
    split = path.stem.rsplit("_", 1)[-1]
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), path.name)


def validate_command(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    try:
        files = ([find_split_file(data_dir, s) for s in args.splits] if args.splits
                 else sorted(data_dir.glob("*.jsonl"), key=_split_order) if data_dir.is_dir() else [])
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not files:
        print(f"error: {data_dir}: no *.jsonl files (is it the folder convert_ucf101.py wrote?)", file=sys.stderr)
        return 1

    processor = None
    if not args.no_token_count:
        try:
            processor = load_processor(args.model_name_or_path)
        except Exception as e:  # noqa: BLE001 - offline, missing files...
            message = f"cannot load the processor of {args.model_name_or_path} ({type(e).__name__}: {e})"
            if args.model_name_or_path != DEFAULT_MODEL:
                print(f"error: {message}", file=sys.stderr)
                return 1
            print(f"Token counts skipped: {message}. Pass --model_name_or_path DIR (a local copy) or "
                  f"--no_token_count.", file=sys.stderr)
    num_crops = args.num_crops
    if processor is not None and num_crops is None:
        num_crops = processor.image_processor.num_crops

    all_problems = []
    for file in files:
        report = validate_file(file, data_dir / "images", full_check=args.full_check, progress=not args.no_tqdm)
        images = sum(len(s) for s in report.image_sizes)
        lines = []
        if processor is not None and report.records:
            lines, rejected = token_report(report, processor, num_crops, args.max_seq_length,
                                           progress=not args.no_tqdm)
            report.problems += rejected
        status = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
        print(f"{file}: {len(report.records)} valid record(s), {images} image(s): {status}")
        for text in lines + [f"  {p}" for p in report.problems[:MAX_PROBLEMS_SHOWN]]:
            print(text)
        if len(report.problems) > MAX_PROBLEMS_SHOWN:
            print(f"  ... and {len(report.problems) - MAX_PROBLEMS_SHOWN} more")
        all_problems += report.problems
    if all_problems:
        print(f"{len(all_problems)} problem(s) found.", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3v.data", description="Tools for the converted-data format.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate", help="Check a data folder: every jsonl line, every image, and the token counts.",
        description="Checks that every line of every *.jsonl in DATA_DIR parses and has the schema, that every "
                    "image exists, opens and lies inside DATA_DIR/images, that image tags match the images, and "
                    "reports the tokens per sample. Exit status 1 when anything is wrong.")
    validate.add_argument("data_dir", metavar="DATA_DIR", help="Folder with images/ and the *.jsonl files.")
    validate.add_argument("--splits", nargs="+", metavar="SPLIT",
                          help="Check only these splits (train val test); default: every *.jsonl in DATA_DIR.")
    validate.add_argument("--num_crops", type=int, default=None,
                          help="Crops per image for the token counts (default: the processor's, 4 for Phi-3.5-vision; "
                               "use the value you will train with, e.g. 4 for video frames, 16 for documents).")
    validate.add_argument("--max_seq_length", type=int, default=None,
                          help="Token budget: report the records longer than this (training skips them).")
    validate.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                          help=f"Hub id or local folder of the processor (tokenizer) for token counts (default {DEFAULT_MODEL}).")
    validate.add_argument("--no_token_count", action="store_true", help="Skip the token counts (no processor needed).")
    validate.add_argument("--full_check", action="store_true",
                          help="Decode every image fully (slower; finds truncated files that only the header check misses).")
    validate.add_argument("--no-tqdm", "--no_tqdm", dest="no_tqdm", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    if args.num_crops is not None and args.num_crops < 1:
        parser.error("--num_crops must be at least 1")
    return validate_command(args)


if __name__ == "__main__":
    sys.exit(main())
