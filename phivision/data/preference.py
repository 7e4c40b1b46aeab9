"""Preference data: a chosen and a rejected answer to the same question, which finetune_hf_trainer_dpo.py trains on.

Local files are jsonl (one record per line) or one JSON list, with the converted format's image rules (paths
relative to the image folder, by default images/ beside the data; `<|image_N|>` tags, or LLaVA's `<image>` in a
flat question). A record has one of two layouts:

    flat (RLAIF-V's columns):
        {"id": "p1", "image": "a.png", "question": "What is shown?", "chosen": "A red square.", "rejected": "A cat."}
    conversation (earlier turns as in the converted format, the answers in the last one):
        {"id": "p2", "conversations": [{"images": ["a.png"], "user": "Describe it.", "assistant": "A red square."},
                                       {"user": "Its colour?", "chosen": "Red.", "rejected": "Blue."}]}

"id" is optional (default: the record's line); a flat "image" is one path, a list of paths, or absent (text only).
Either layout is read into the converted form (`phivision.data.converted`) whose last turn carries the chosen
answer as "assistant" and the rejected one as "rejected" (`REJECTED`), as `phivision.chat` describes a preference
row: every supervised tool (token counts, evaluation against the reference answer) sees the chosen answer.
The converted format's checks apply, plus the answers' own: both present, non-empty strings, different.

From the Hub: openbmb/RLAIF-V-Dataset's rows (image, question, chosen, rejected), `rlaif_v_example`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..chat import IMAGE_TAG, Conversation
from .converted import FileReport, NumberedRecords, Problem, ValidationError, check_records, record_example
from .formats import CHOSEN, REJECTED, OwnData, is_preference_data, load_split_files, read_records
from .hub import open_hub_image
from .llava import image_field, tagged_question

__all__ = ["REJECTED", "load_preference_data", "preference_example", "rejected_conversation", "rlaif_v_example",
           "validate_preference_file"]

SUFFIXES = (".jsonl", ".json")
SUPERVISED_RECIPE = "finetune_hf_trainer_custom.py"
FLAT_KEYS = ("id", "image", "question", CHOSEN, REJECTED)
# RLAIF-V's other columns, kept by an export of the Hub rows to jsonl; they play no part.
RLAIF_V_COLUMNS = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")


def _answers_problem(chosen: Any, rejected: Any, chosen_key: str = CHOSEN) -> str | None:
    """Why a chosen and a rejected answer cannot train (None when they can)."""
    for key, answer in ((chosen_key, chosen), (REJECTED, rejected)):
        if not isinstance(answer, str):
            return f"'{key}' must be a string, got {answer!r:.80}"
        if not answer.strip():
            return f"'{key}' is empty: nothing to compare"
        if IMAGE_TAG.search(answer):
            return f"'{key}' has an image tag: tags belong in the user text"
    if chosen.strip() == rejected.strip():
        return f"'{chosen_key}' and '{REJECTED}' are the same answer: nothing to prefer"
    return None


def flat_conversation(record: dict, images: Sequence[Any]) -> Conversation:
    """The one-turn conversation of a flat record (question, chosen, rejected) about `images` (ValueError naming
    the bad field)."""
    for key in ("question", CHOSEN, REJECTED):
        if key not in record:
            raise ValueError(f"missing '{key}'")
    if not isinstance(record["question"], str):
        raise ValueError(f"'question' must be a string, got {record['question']!r:.80}")
    problem = _answers_problem(record[CHOSEN], record[REJECTED])
    if problem:
        raise ValueError(problem)
    turn = {"user": tagged_question(record["question"], len(images)), "assistant": record[CHOSEN],
            REJECTED: record[REJECTED]}
    return [{"images": list(images), **turn} if images else turn]


def _last_turn(turn: dict, where: str) -> dict:
    """The last turn of a conversation layout with its answers as "assistant" (chosen) and "rejected"."""
    if CHOSEN in turn and "assistant" in turn:
        raise ValueError(f"{where} has both 'chosen' and 'assistant': the last turn's answers are 'chosen' and "
                         f"'rejected'")
    chosen_key = CHOSEN if CHOSEN in turn or "assistant" not in turn else "assistant"
    for key in (chosen_key, REJECTED):
        if key not in turn:
            raise ValueError(f"{where} is missing '{key}' (the last turn has 'user', 'chosen' and 'rejected')")
    problem = _answers_problem(turn[chosen_key], turn[REJECTED], chosen_key)
    if problem:
        raise ValueError(f"{where}: {problem}")
    others = {key: value for key, value in turn.items() if key not in (CHOSEN, "assistant", REJECTED)}
    return {**others, "assistant": turn[chosen_key], REJECTED: turn[REJECTED]}


def converted_preference_record(record: Any, default_id: str | None = None) -> dict:
    """A local preference record of either layout in the converted form (last turn: "assistant" = chosen,
    "rejected"); a record already in that form comes back as it is. Raises ValueError naming the bad field;
    what the converted format checks (ids, user texts, image paths and tags) is left to `check_records`."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
            raise ValueError(f"'conversations' must be a non-empty list of turns, the last with 'user', 'chosen' and "
                             f"'rejected', got {turns!r:.80}")
        last = _last_turn(turns[-1], f"conversations[{len(turns) - 1}]")
        converted = {**record, "conversations": [*turns[:-1], last]}
    else:
        unknown = sorted(set(record) - set(FLAT_KEYS) - set(RLAIF_V_COLUMNS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} (a flat preference record has "
                             f"{', '.join(map(repr, FLAT_KEYS))}; or give 'conversations')")
        converted = {"conversations": flat_conversation(record, image_field(record))}
    record_id = record.get("id", default_id)
    return converted if record_id is None else {"id": record_id, **converted}


def rejected_conversation(conversation: Conversation) -> Conversation:
    """The rejected sequence of a preference conversation: the same turns, the last "assistant" replaced by
    its "rejected"."""
    last = {key: value for key, value in conversation[-1].items() if key != REJECTED}
    return [*conversation[:-1], {**last, "assistant": conversation[-1][REJECTED]}]


# ----------------------------------------------------------------------------- recipe rows

def rlaif_v_example(row: dict) -> tuple[Conversation, list]:
    """An openbmb/RLAIF-V-Dataset row (image, question, chosen, rejected) -> (conversation, images).

    The image is a PIL image or datasets' stored {"bytes", "path"} (opened, not decoded); a row without one is
    text only. Raises ValueError naming the bad field (the run names and skips the row).
    """
    image = row.get("image")
    images = [] if image is None else [open_hub_image(image)]
    return flat_conversation(row, images), images


def preference_example(record: dict, image_root: str | Path) -> tuple[Conversation, list]:
    """A local preference record (either layout, or as `load_preference_data` returns it) -> (conversation,
    images), its images under `image_root` opened, not decoded (as `converted.record_example`)."""
    return record_example(converted_preference_record(record), image_root)


# ----------------------------------------------------------------------------- files

def refuse_supervised_data(path: str | Path, items: NumberedRecords) -> None:
    """Raises a one-line ValidationError when no record is preference data: the file is supervised data."""
    records = [(line, index) for line, index, record in items if isinstance(record, dict)]
    if records and not is_preference_data(items):
        line, index = records[0]
        raise ValidationError([Problem(str(path), line, f"a supervised record (no '{CHOSEN}' and '{REJECTED}' "
                                       f"answers), as is every record of the file: train on it with "
                                       f"{SUPERVISED_RECIPE}", index)])


def check_preference_records(path: str | Path, items: NumberedRecords, images_dir: str | Path | None = None,
                             **check: Any) -> FileReport:
    """`converted.check_records` for preference records read from `path` (`check`: its keyword arguments):
    each one in the converted form, or the one-line Problem with it; a file of supervised records is refused."""
    refuse_supervised_data(path, items)
    converted: NumberedRecords = []
    for line, index, record in items:
        if not isinstance(record, Problem):
            try:
                record = converted_preference_record(record, default_id=str(line))
            except ValueError as e:
                record = Problem(str(path), line, str(e), index)
        converted.append((line, index, record))
    return check_records(path, converted, images_dir, last_turn_keys=(REJECTED,), **check)


def validate_preference_file(path: str | Path, images_dir: str | Path | None = None, **check: Any) -> FileReport:
    """Reads and checks a preference file (.jsonl or a .json list); images_dir defaults to the images/ folder
    beside it; `check`: `converted.check_records`'s keyword arguments."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValidationError(f"not a preference data file: expected {' or '.join(SUFFIXES)}", path)
    return check_preference_records(path, read_records(path), images_dir, **check)


def load_preference_data(path: str | Path, image_folder: str | Path | None = None, eval_fraction: float = 0.05,
                         seed: int = 0) -> OwnData:
    """The training and evaluation preference records of a folder or a single file, all checked, in the converted
    form (`preference_example` makes recipe rows of them).

    As `formats.load_own_data`: a folder holds train.jsonl or train.json (optionally test.*) and images/; without
    test data `eval_fraction` of the records (chosen with `seed`) are held out. Raises ValidationError naming every
    problem as FILE:LINE, or in one line that the file is supervised data.
    """
    return load_split_files(path, image_folder, eval_fraction, seed, SUFFIXES, validate_preference_file)
