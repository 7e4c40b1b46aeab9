"""phivision.data.llava: LLaVA / ShareGPT records as converted records; broken records named FILE:LINE: record [N]."""

import json
from pathlib import Path

import pytest
from PIL import Image

from phivision.data.converted import ValidationError, valid_records, validate_record
from phivision.data.formats import validate_data_file
from phivision.data.llava import convert_llava_record, is_llava_record, read_json_list


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


GOOD = [
    {"id": "single", "image": "a.png", "conversations": [human("<image>\nWhat is shown?"), gpt("A square.")]},
    {"id": "two images", "image": ["a.png", "sub/b.jpg"],
     "conversations": [human("<image>\n<image>\nSame size?"), gpt("No.")]},
    {"id": 7, "image": ["a.png", "sub/b.jpg"], "conversations": [  # multi-turn, an image per question
        human("Describe <image>."), gpt("A square."), human("And <image>?"), gpt("A rectangle."),
        {"from": "user", "value": "Thanks."}, {"from": "assistant", "value": "You're welcome."}]},
    {"id": "text only", "conversations": [human("Say hi."), gpt("Hi.")]},
    {"id": "no placeholder", "image": ["a.png", "sub/b.jpg"], "conversations": [human("Compare."), gpt("Same.")]},
]

CONVERTED = [
    {"id": "single", "conversations": [
        {"images": ["a.png"], "user": "<|image_1|>\nWhat is shown?", "assistant": "A square."}]},
    {"id": "two images", "conversations": [
        {"images": ["a.png", "sub/b.jpg"], "user": "<|image_1|>\n<|image_2|>\nSame size?", "assistant": "No."}]},
    {"id": 7, "conversations": [
        {"images": ["a.png"], "user": "Describe <|image_1|>.", "assistant": "A square."},
        {"images": ["sub/b.jpg"], "user": "And <|image_2|>?", "assistant": "A rectangle."},
        {"user": "Thanks.", "assistant": "You're welcome."}]},
    {"id": "text only", "conversations": [{"user": "Say hi.", "assistant": "Hi."}]},
    {"id": "no placeholder", "conversations": [
        {"images": ["a.png", "sub/b.jpg"], "user": "Compare.", "assistant": "Same."}]},
]


def write_llava(root: Path, records, name="train.json") -> Path:
    """A folder with images/ and `records` as a JSON list, indented as LLaVA's files are (a record spans lines)."""
    (root / "images/sub").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), "red").save(root / "images/a.png")
    Image.new("RGB", (60, 30), "blue").save(root / "images/sub/b.jpg")
    (root / name).write_text(json.dumps(records, indent=2))
    return root / name


def test_records_convert_to_the_converted_form():
    assert [convert_llava_record(r) for r in GOOD] == CONVERTED
    assert all(is_llava_record(r) for r in GOOD) and not any(is_llava_record(r) for r in CONVERTED)
    for record in CONVERTED:
        validate_record(record)  # the converted format's own checks (schema, tags per turn) pass


def test_a_file_reads_with_the_line_each_record_starts_on(tmp_path):
    path = write_llava(tmp_path, GOOD)
    items = read_json_list(path)
    lines = path.read_text().splitlines()
    assert [index for _, index, _ in items] == list(range(len(GOOD)))
    assert [record for _, _, record in items] == GOOD
    for line, index, _ in items:
        assert lines[line - 1].strip() == "{" and f'"id": {json.dumps(GOOD[index]["id"])}' in lines[line]
    report = validate_data_file(path)
    assert report.problems == [] and report.records == CONVERTED
    assert report.image_sizes[2] == [(40, 40), (60, 30)]


BROKEN = {
    "system prompt": ({"id": "x", "conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hi")]},
                      ("conversations[0]: 'from' 'system' is not human or gpt (user or assistant): the recipes train "
                       "without a system prompt")),
    "two questions in a row": ({"id": "x", "conversations": [human("Hi"), human("Hello?"), gpt("Hi")]},
                               "conversations[1] is a 'human' message where a gpt one was expected"),
    "question without answer": ({"id": "x", "conversations": [human("Hi"), gpt("Hi"), human("Bye?")]},
                                "conversations[2]: the last human message has no gpt answer after it"),
    "more placeholders than images": ({"id": "x", "image": "a.png", "conversations": [human("<image> <image>"), gpt("A")]},
                                      "2 <image> placeholder(s) but 1 image(s)"),
    "placeholder without image": ({"id": "x", "conversations": [human("<image>\nWhat?"), gpt("A")]},
                                  "1 <image> placeholder(s) but 0 image(s)"),
    "placeholder in the answer": ({"id": "x", "image": "a.png", "conversations": [human("<image>"), gpt("<image>")]},
                                  "conversations[1]: <image> in a gpt message"),
    "empty answer": ({"id": "x", "conversations": [human("Hi"), gpt("  ")]},
                     "conversations[1]: the gpt answer is empty"),
    "value not text": ({"id": "x", "conversations": [human(["Hi"]), gpt("Hi")]},
                       'conversations[0] must be {"from": ..., "value": text}'),
    "absolute image path": ({"id": "x", "image": "/etc/passwd", "conversations": [human("<image>"), gpt("A")]},
                            "'image': image path '/etc/passwd' is absolute"),
    "image not a path": ({"id": "x", "image": {"path": "a.png"}, "conversations": [human("<image>"), gpt("A")]},
                         "'image' must be a path or a list of paths"),
    "missing image file": ({"id": "x", "image": "nope.png", "conversations": [human("<image>"), gpt("A")]},
                           "image 'nope.png' not found"),
    "video": ({"id": "x", "video": "clip.mp4", "conversations": [human("<video>"), gpt("A")]},
              "'video' records are not supported"),
    "no id": ({"image": "a.png", "conversations": [human("<image>"), gpt("A")]}, "missing 'id'"),
    "duplicate id": (GOOD[0], "id 'single' already used on record [0] (line 2)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_record_is_named_by_file_line_and_position(tmp_path, case):
    record, message = BROKEN[case]
    path = write_llava(tmp_path, [GOOD[0], GOOD[3], record])
    report = validate_data_file(path)
    assert len(report.problems) == 1 and report.records == CONVERTED[:1] + CONVERTED[3:4]
    problem = report.problems[0]
    start = 1 + len(json.dumps([GOOD[0], GOOD[3]], indent=2).splitlines()) - 1  # the line the third record opens on
    assert (problem.line, problem.record) == (start, 2)
    assert str(problem).startswith(f"{path}:{start}: record [2]: ") and message in str(problem)


def test_files_that_are_not_a_json_list(tmp_path):
    write_llava(tmp_path, [])
    (tmp_path / "records.json").write_text('{"id": "x"}')
    assert "expected a JSON list of records" in str(validate_data_file(tmp_path / "records.json").problems[0])
    (tmp_path / "cut.json").write_text(json.dumps(GOOD[:2], indent=2)[:-40])
    report = validate_data_file(tmp_path / "cut.json")
    assert report.records == CONVERTED[:1]  # the records before the damage still read
    assert [p.line for p in report.problems] == [len(json.dumps(GOOD[:2], indent=2)[:-40].splitlines())]
    assert "not valid JSON" in report.problems[0].message
    with pytest.raises(ValidationError, match="no records"):
        valid_records(validate_data_file(tmp_path / "train.json"))  # an empty list
