"""A CSV table of image, question and answer, read as converted records (one single-turn sample per row).

    image,question,answer
    photos/cat.jpg,What animal is this?,A cat.
    ,Say hello.,Hello.                                   (no image: a text-only sample)

The header row names the columns, in any order and case; `question` and `answer` are needed, `image` (a
path relative to the image folder, empty for a text-only row) and `id` (default: the row's line number)
may be there, and other columns are ignored. `<image>` in a question places the image, as in LLaVA data;
without it the image goes before the question.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .converted import NumberedRecords, Problem, image_path_problem
from .llava import tagged_question

REQUIRED = ("question", "answer")


def read_csv(path: str | Path) -> NumberedRecords:
    """Every non-empty row of the table as a converted record (or the Problem with it), with its line."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(_numbered_rows(csv.reader(f)))
    except UnicodeDecodeError as e:
        return [(None, None, Problem(where, None, f"not UTF-8 text ({e})"))]
    except csv.Error as e:
        return [(None, None, Problem(where, None, f"not a valid CSV file ({e})"))]
    if not rows:
        return []
    header_line, header = rows[0][0], [name.strip().lower() for name in rows[0][1]]
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        message = (f"no {' or '.join(map(repr, missing))} column: the header row has {', '.join(map(repr, header))} "
                   "(expected image, question, answer)")
        return [(header_line, None, Problem(where, header_line, message))]
    items: NumberedRecords = []
    for line, cells in rows[1:]:
        if len(cells) > len(header):
            items.append((line, None, Problem(where, line, f"{len(cells)} cells but the header has {len(header)}")))
            continue
        row = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        try:
            items.append((line, None, _record(row, line)))
        except ValueError as e:
            items.append((line, None, Problem(where, line, str(e))))
    return items


def _numbered_rows(reader):
    """(line where the row starts, cells) of every row with any text (a quoted cell may span lines)."""
    line = 1
    for cells in reader:
        if any(cell.strip() for cell in cells):
            yield line, cells
        line = reader.line_num + 1


def _record(row: dict[str, str], line: int) -> dict:
    image = row.get("image", "").strip()
    if image:
        problem = image_path_problem(image)
        if problem:
            raise ValueError(f"'image': {problem}")
    images = [image] if image else []
    question = tagged_question(row["question"], len(images))
    if not row["answer"].strip():
        raise ValueError("'answer' is empty: nothing to learn")
    turn = {"user": question, "assistant": row["answer"]}
    if images:
        turn = {"images": images, **turn}
    return {"id": row.get("id", "").strip() or str(line), "conversations": [turn]}
