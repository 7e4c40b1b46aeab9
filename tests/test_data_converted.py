"""phivision.data.converted: load_jsonl_dataset and validate_record on good and broken datasets."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from phivision.data.converted import (ValidationError, find_split_file, load_jsonl_dataset, valid_records, validate_file,
                                  validate_record)


GOOD = [
    {"id": "train-0", "source": "mine", "conversations": [
        {"images": ["a.png"], "user": "What is shown?", "assistant": "A square."}]},
    {"id": "train-1", "source": "mine", "conversations": [
        {"images": ["a.png", "sub/b.jpg"], "user": "<|image_1|>\n<|image_2|>\nSame size?", "assistant": "No."}]},
    {"id": "train-2", "conversations": [  # multi-turn: images numbered over the whole conversation
        {"images": ["a.png"], "user": "Describe.", "assistant": "A square."},
        {"images": ["sub/b.jpg"], "user": "And <|image_2|>?", "assistant": "A rectangle."},
        {"user": "Thanks.", "assistant": "You're welcome."}]},
    {"id": "train-3", "conversations": [{"user": "Text only.", "assistant": "Fine."}]},
]


def write_dataset(root: Path, records=GOOD, name="ucf101_train.jsonl", extra_lines=()) -> Path:
    (root / "images/sub").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), "red").save(root / "images/a.png")
    Image.new("RGB", (60, 30), "blue").save(root / "images/sub/b.jpg", quality=90)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def one_turn(**turn) -> dict:
    return {"id": "x", "conversations": [{"images": ["a.png"], "user": "Hi", "assistant": "Ok", **turn}]}


BROKEN = {
    "not json": ('{"id": "x", "conversations": [', "not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "no id": (json.dumps({"conversations": GOOD[0]["conversations"]}), "missing 'id'"),
    "no conversations": (json.dumps({"id": "x", "messages": []}), "missing 'conversations'"),
    "empty conversations": (json.dumps({"id": "x", "conversations": []}), "non-empty list"),
    "typo in a turn key": (json.dumps({"id": "x", "conversations": [{"image": ["a.png"], "user": "Hi", "assistant": "Ok"}]}),
                           "unknown key(s) 'image'"),
    "no answer": (json.dumps({"id": "x", "conversations": [{"user": "Hi"}]}), "missing 'assistant'"),
    "empty answer": (json.dumps(one_turn(assistant=" ")), "'assistant'] is empty"),
    "user not a string": (json.dumps(one_turn(user=["Hi"])), "['user'] must be a string"),
    "images not a list": (json.dumps(one_turn(images="a.png")), "must be a list of paths"),
    "absolute path": (json.dumps(one_turn(images=["/etc/passwd"])), "is absolute"),
    "escape with ..": (json.dumps(one_turn(images=["sub/../../secret.png"])), "'..'"),
    "backslash": (json.dumps(one_turn(images=["sub\\b.jpg"])), "backslash"),
    "missing image": (json.dumps(one_turn(images=["missing.png"])), "'missing.png' not found"),
    "not an image": (json.dumps(one_turn(images=["notes.txt"])), "cannot be read as an image"),
    "tag for a missing image": (json.dumps(one_turn(user="<|image_1|> <|image_2|> Hi")), "Expected the tags <|image_1|>"),
    "tag without images": (json.dumps(one_turn(images=[], user="<|image_1|> Hi")), "Expected no image tags"),
    "tag in the answer": (json.dumps(one_turn(assistant="<|image_1|>")), "tags belong in the user text"),
    "duplicate id": (json.dumps({**GOOD[0], "id": "train-0"}), "id 'train-0' already used on line 1"),
}


def test_good_dataset_loads(tmp_path):
    write_dataset(tmp_path)
    assert load_jsonl_dataset(tmp_path, "train") == GOOD
    sizes = validate_record(GOOD[2], tmp_path / "images")
    assert sizes == [(40, 40), (60, 30)]
    assert validate_record(GOOD[2]) == []  # schema only


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_line_is_named(tmp_path, case):
    line, fragment = BROKEN[case]
    write_dataset(tmp_path, GOOD[:1], extra_lines=[line])
    (tmp_path / "images/notes.txt").write_text("not an image")
    with pytest.raises(ValidationError) as info:
        valid_records(validate_file(tmp_path / "ucf101_train.jsonl"))  # the validator's (and python -m phivision.data's)
    error = info.value
    assert len(error.problems) == 1
    assert (Path(error.path).name, error.line) == ("ucf101_train.jsonl", 2)
    assert fragment in error.message
    assert str(error).startswith(f"{tmp_path / 'ucf101_train.jsonl'}:2: ")


def test_training_leaves_an_image_that_cannot_be_read_to_the_run(tmp_path):
    """A record whose image is there but unreadable loads (the run names and skips it within --max_bad_samples, as
    it does a Hub row's); every other mistake still stops the load."""
    write_dataset(tmp_path, GOOD[:1], extra_lines=[BROKEN["not an image"][0]])
    (tmp_path / "images/notes.txt").write_text("not an image")
    records = load_jsonl_dataset(tmp_path, "train")
    assert len(records) == 2 and records.locations[1] == f"{tmp_path / 'ucf101_train.jsonl'}:2"
    write_dataset(tmp_path, GOOD[:1], extra_lines=[BROKEN["missing image"][0]])
    with pytest.raises(ValidationError, match="'missing.png' not found"):
        load_jsonl_dataset(tmp_path, "train")


def test_every_bad_line_is_reported(tmp_path):
    write_dataset(tmp_path, GOOD, extra_lines=[BROKEN["not json"][0], BROKEN["absolute path"][0], BROKEN["missing image"][0]])
    with pytest.raises(ValidationError) as info:
        load_jsonl_dataset(tmp_path, "train")
    assert [p.line for p in info.value.problems] == [5, 6, 7]
    assert str(info.value).startswith("3 problems in the data:")
    assert ":6: conversations[0]: image path '/etc/passwd' is absolute" in str(info.value)


def test_full_check_finds_truncated_images(tmp_path):
    write_dataset(tmp_path, [one_turn(images=["sub/b.jpg"])])
    jpeg = tmp_path / "images/sub/b.jpg"
    Image.effect_noise((200, 150), 60).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    assert len(load_jsonl_dataset(tmp_path, "train")) == 1  # the header alone is fine
    with pytest.raises(ValidationError, match="cannot be read as an image"):
        load_jsonl_dataset(tmp_path, "train", full_check=True)


def test_find_split_file(tmp_path):
    write_dataset(tmp_path, name="train.jsonl")
    assert find_split_file(tmp_path, "train").name == "train.jsonl"
    (tmp_path / "train.jsonl").rename(tmp_path / "mine_train.jsonl")
    assert find_split_file(tmp_path, "train").name == "mine_train.jsonl"
    (tmp_path / "other_train.jsonl").write_text("")
    with pytest.raises(ValidationError, match="several train files"):
        find_split_file(tmp_path, "train")
    with pytest.raises(ValidationError, match="no test data"):
        find_split_file(tmp_path, "test")
    (tmp_path / "ucf101_train.jsonl").write_text("")
    assert find_split_file(tmp_path, "train").name == "ucf101_train.jsonl"
    with pytest.raises(ValidationError, match="no records"):
        load_jsonl_dataset(tmp_path, "train")


def test_missing_images_folder(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "images").rename(tmp_path / "pictures")
    with pytest.raises(ValidationError, match="no images folder"):
        load_jsonl_dataset(tmp_path, "train")
    write_dataset(tmp_path, GOOD[3:])  # text only: no images folder needed
    shutil.rmtree(tmp_path / "images")
    assert load_jsonl_dataset(tmp_path, "train") == GOOD[3:]
