"""phivision.data.csv_table: a CSV of image, question, answer as converted records; bad rows named FILE:LINE."""

from pathlib import Path

import pytest
from PIL import Image

from phivision.data.formats import validate_data_file

GOOD = """\
Image,Question,Answer,notes
a.png,What is shown?,A square.,ignored
,Say hi.,Hi.,text only
sub/b.jpg,"Two lines:
what is <image> showing?",A rectangle.,
"""


def write_csv(root: Path, text: str, name="train.csv") -> Path:
    (root / "images/sub").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), "red").save(root / "images/a.png")
    Image.new("RGB", (60, 30), "blue").save(root / "images/sub/b.jpg")
    (root / name).write_text(text, encoding="utf-8")
    return root / name


def test_rows_become_single_turn_records(tmp_path):
    report = validate_data_file(write_csv(tmp_path, GOOD))
    assert report.problems == []
    assert report.records == [
        {"id": "2", "conversations": [{"images": ["a.png"], "user": "What is shown?", "assistant": "A square."}]},
        {"id": "3", "conversations": [{"user": "Say hi.", "assistant": "Hi."}]},
        {"id": "4", "conversations": [{"images": ["sub/b.jpg"], "user": "Two lines:\nwhat is <|image_1|> showing?",
                                       "assistant": "A rectangle."}]},
    ]
    assert report.lines == [2, 3, 4] and report.image_sizes == [[(40, 40)], [], [(60, 30)]]
    with_ids = validate_data_file(write_csv(tmp_path, "id,question,answer\nq1,Hi?,Hi.\n", "ids.csv"))
    assert with_ids.records[0]["id"] == "q1"


BROKEN = {
    "empty answer": ("a.png,What?, ", "'answer' is empty"),
    "absolute path": ("/etc/passwd,What?,A", "'image': image path '/etc/passwd' is absolute"),
    "two placeholders, one image": ("a.png,<image> or <image>?,A", "2 <image> placeholder(s) but the row has 1 image"),
    "placeholder without image": (",<image>?,A", "1 <image> placeholder(s) but the row has 0 image"),
    "too many cells": ("a.png,What?,A,B,C", "5 cells but the header has 4"),
    "missing image": ("nope.png,What?,A", "image 'nope.png' not found"),
    "duplicate id": ("a.png,What?,A", None),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_row_is_named(tmp_path, case):
    row, message = BROKEN[case]
    text = "image,question,answer,id\na.png,What?,A,x\n" + row + (",x" if case == "duplicate id" else "") + "\n"
    path = write_csv(tmp_path, text)
    report = validate_data_file(path)
    assert len(report.records) == 1 and len(report.problems) == 1
    message = message or "id 'x' already used on line 2"
    assert str(report.problems[0]).startswith(f"{path}:3: ") and message in str(report.problems[0])


def test_header_must_name_question_and_answer(tmp_path):
    path = write_csv(tmp_path, "picture,prompt,answer\na.png,What?,A\n")
    [problem] = validate_data_file(path).problems
    assert str(problem) == (f"{path}:1: no 'question' column: the header row has 'picture', 'prompt', 'answer' "
                            "(expected image, question, answer)")
