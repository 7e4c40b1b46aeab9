"""`python -m phivision.data validate DATA`: checks a data folder or file (jsonl, LLaVA JSON, CSV, preference data)
before training."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .converted import MAX_PROBLEMS_SHOWN, SPLITS, FileReport, Problem, ValidationError, check_records, find_split_file
from .formats import SUFFIXES, data_files, is_preference_data, read_records
from .preference import check_preference_records, rejected_conversation

DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"


def load_processor(model_name_or_path: str):
    from ..families import family_of

    return family_of(model_name_or_path, "--model_name_or_path").load_processor(model_name_or_path)


def token_report(report: FileReport, processor, num_crops: int, max_seq_length: int | None,
                 progress: bool = False, preference: bool = False) -> tuple[list[str], list[Problem]]:
    """Lines describing the token counts of a file's (valid) records, and records the processor rejects.

    With `preference` each record is two sequences, its chosen and its rejected one
    (`preference.rejected_conversation`), and a record is over the budget when either is."""
    from tqdm.auto import tqdm

    names = ("chosen ", "rejected ") if preference else ("",)  # how the lines name each sequence
    counts: dict[str, list[int]] = {name: [] for name in names}
    problems, over = [], []
    items = zip(report.records, report.image_sizes, report.lines)
    for record, sizes, line in tqdm(items, total=len(report.records), desc=f"Counting tokens {report.path.name}",
                                    unit="record", disable=not progress):
        sequences = [record["conversations"]] + ([rejected_conversation(record["conversations"])] if preference else [])
        try:
            ns = [processor.num_conversation_tokens(sequence, sizes, num_crops) for sequence in sequences]
        except ValueError as e:
            problems.append(Problem(str(report.path), line, f"the processor rejects it: {e}"))
            continue
        for name, n in zip(names, ns):
            counts[name].append(n)
        if max_seq_length is not None and max(ns) > max_seq_length:
            over.append((line, record["id"], ns))
    if not counts[names[0]]:
        return [], problems
    text = [f"  tokens at num_crops {num_crops}: " + "; ".join(
        f"{name}max {max(c)}, mean {sum(c) / len(c):.0f}, min {min(c)}" for name, c in counts.items())]
    if max_seq_length is not None:
        total = len(counts[names[0]])
        why = "the chosen or the rejected sequence; training skips them" if preference else "training skips them"
        text.append(f"  {len(over)} of {total} record(s) over --max_seq_length {max_seq_length} ({why})"
                    + (":" if over else ""))
        text += [f"    line {line} (id {rid}): {', '.join(f'{name}{n}' for name, n in zip(names, ns))} tokens"
                 for line, rid, ns in over[:10]]
        if len(over) > 10:
            text.append(f"    ... and {len(over) - 10} more")
    return text, problems


def _split_order(path: Path) -> tuple[int, str]:
    """train, val, test first, then any other file, by name."""
    split = path.stem.rsplit("_", 1)[-1]
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), path.name)


def validate_command(args: argparse.Namespace) -> int:
    path = Path(args.data)
    try:
        if path.is_file():
            files = [path]
        elif args.splits:
            files = [find_split_file(path, split, SUFFIXES) for split in args.splits]
        else:
            files = sorted(data_files(path), key=_split_order) if path.is_dir() else []
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not files:
        print(f"error: {path}: no data files ({', '.join('*' + s for s in SUFFIXES)})", file=sys.stderr)
        return 1
    images_dir = Path(args.image_folder) if args.image_folder else (path if path.is_dir() else path.parent) / "images"

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
        try:
            items = read_records(file)
        except ValidationError as e:
            print(f"error: {e}", file=sys.stderr)
            all_problems += e.problems
            continue
        preference = is_preference_data(items)  # a file of chosen and rejected answers: checked as such
        check = check_preference_records if preference else check_records
        report = check(file, items, images_dir, full_check=args.full_check, progress=not args.no_tqdm)
        images = sum(len(s) for s in report.image_sizes)
        lines = []
        if processor is not None and report.records:
            lines, rejected = token_report(report, processor, num_crops, args.max_seq_length,
                                           progress=not args.no_tqdm, preference=preference)
            report.problems += rejected
        status = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
        kind = "preference data (chosen and rejected answers), " if preference else ""
        print(f"{file}: {kind}{len(report.records)} valid record(s), {images} image(s): {status}")
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
    parser = argparse.ArgumentParser(prog="python -m phivision.data", description="Tools for your own data.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate", help="Check a data folder or file: every record, every image, and the token counts.",
        description="Checks every record of every data file in DATA (a folder: its *.jsonl, *.json and *.csv; or "
                    "one file): that it parses and has the schema (converted jsonl, LLaVA/ShareGPT JSON, or CSV with "
                    "image, question, answer columns), that every image exists, opens and lies inside the image "
                    "folder, that image tags match the images, and reports the tokens per sample. A jsonl or JSON "
                    "file of preference records (chosen and rejected answers, for finetune_hf_trainer_dpo.py) is "
                    "checked as preference data, with the tokens of both answers' sequences. Exit status 1 when "
                    "anything is wrong.")
    validate.add_argument("data", metavar="DATA", help="A data folder (images/ and the data files) or one data file.")
    validate.add_argument("--image_folder", default=None,
                          help="Folder the image paths are relative to (default: images/ beside the data files).")
    validate.add_argument("--splits", nargs="+", metavar="SPLIT",
                          help="Check only these splits (train val test); default: every data file in DATA.")
    validate.add_argument("--num_crops", type=int, default=None,
                          help="Crops per image for the token counts (default: the processor's, 4 for Phi-3.5-vision; "
                               "use the value you will train with, e.g. 4 for video frames, 16 for documents).")
    validate.add_argument("--max_seq_length", type=int, default=None,
                          help="Token budget: report the records longer than this (training skips them; for "
                               "preference data, those whose chosen or rejected sequence is longer).")
    validate.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                          help=f"Hub id or local folder of the processor (tokenizer) for token counts (default {DEFAULT_MODEL}).")
    validate.add_argument("--no_token_count", action="store_true", help="Skip the token counts (no processor needed).")
    validate.add_argument("--full_check", action="store_true",
                          help="Decode every image fully (slower; finds truncated files that only the header check misses).")
    validate.add_argument("--no-tqdm", "--no_tqdm", dest="no_tqdm", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    for flag in ("num_crops", "max_seq_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return validate_command(args)
