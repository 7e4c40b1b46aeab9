"""phivision.data.preference: preference rows (chosen and rejected answers) from local files and RLAIF-V's Hub rows."""

import io
import json

import pytest
from PIL import Image
from test_data_converted import GOOD as SUPERVISED
from test_data_converted import write_dataset
from test_data_cli import HUB_FILES
from test_data_hub import datasets_cache  # noqa: F401 - a fixture

from phivision.data import cli
from phivision.data.converted import ValidationError
from phivision.data.formats import load_own_data
from phivision.data.preference import (REJECTED, load_preference_data, preference_example, rejected_conversation,
                                       rlaif_v_example)

FLAT = [
    {"id": "one", "image": "a.png", "question": "What is shown?", "chosen": "A red square.", "rejected": "A cat."},
    {"id": "two", "image": ["a.png", "sub/b.jpg"], "question": "<image>\n<image>\nSame size?", "chosen": "No.",
     "rejected": "Yes."},
    {"question": "Say hi.", "chosen": "Hi.", "rejected": "Go away."},  # text only, no id
]
CONVERSATION = [
    {"id": "multi", "conversations": [
        {"images": ["a.png"], "user": "Describe it.", "assistant": "A red square."},
        {"images": ["sub/b.jpg"], "user": "And <|image_2|>?", "chosen": "A blue rectangle.", "rejected": "A dog."}]},
]
# What both layouts are read as: the last turn's "assistant" is the chosen answer, "rejected" the other.
CONVERTED = [
    {"id": "one", "conversations": [
        {"images": ["a.png"], "user": "What is shown?", "assistant": "A red square.", REJECTED: "A cat."}]},
    {"id": "two", "conversations": [
        {"images": ["a.png", "sub/b.jpg"], "user": "<|image_1|>\n<|image_2|>\nSame size?", "assistant": "No.",
         REJECTED: "Yes."}]},
    {"id": "3", "conversations": [{"user": "Say hi.", "assistant": "Hi.", REJECTED: "Go away."}]},
    {"id": "multi", "conversations": [
        {"images": ["a.png"], "user": "Describe it.", "assistant": "A red square."},
        {"images": ["sub/b.jpg"], "user": "And <|image_2|>?", "assistant": "A blue rectangle.", REJECTED: "A dog."}]},
]


def write_preference(root, records=FLAT + CONVERSATION, name="train.jsonl", extra_lines=()):
    """A data folder with images/ and `records` one per line (.jsonl) or as a JSON list (.json, one per line)."""
    write_dataset(root, [], name="unused.jsonl")  # the images
    (root / "unused.jsonl").unlink()
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    text = "\n".join(lines) + "\n" if name.endswith(".jsonl") else "[\n" + ",\n".join(lines) + "\n]\n"
    (root / name).write_text(text)
    return root / name


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_both_layouts_in_jsonl_and_a_json_list(tmp_path, name):
    write_preference(tmp_path, name=name)
    data = load_preference_data(tmp_path, eval_fraction=0)
    lines = (1, 2, 3, 4) if name.endswith(".jsonl") else (2, 3, 4, 5)
    expected = [*CONVERTED[:2], {**CONVERTED[2], "id": str(lines[2])}, CONVERTED[3]]  # no id: the line's number
    assert data.train == expected and data.eval == [] and data.images_dir == tmp_path / "images"
    assert data.train.locations == [f"{tmp_path / name}:{line}" for line in lines]


def test_a_single_file_holds_out_evaluation_rows_and_a_test_file_evaluates(tmp_path):
    file = write_preference(tmp_path, name="all.jsonl")
    data = load_preference_data(file, eval_fraction=0.25, seed=1)
    assert len(data.train) == 3 and len(data.eval) == 1 and data.eval[0] in CONVERTED
    assert load_preference_data(file, eval_fraction=0.25, seed=1) == data
    write_preference(tmp_path, FLAT[:1], name="test.json")
    file.rename(tmp_path / "train.jsonl")
    data = load_preference_data(tmp_path)
    assert data.train == CONVERTED and data.eval == CONVERTED[:1]
    assert data.eval_source == "the 1 record(s) of test.json"


def test_preference_example_opens_the_images_and_gives_the_contract_conversation(tmp_path):
    write_preference(tmp_path)
    images = tmp_path / "images"
    for record, converted in zip(FLAT + CONVERSATION, CONVERTED):
        for given in (record, converted):  # a record as written, or as load_preference_data returns it
            conversation, opened = preference_example({"id": "x", **given}, images)
            assert conversation == converted["conversations"]
            assert [image.filename for image in opened] == [
                str(images / path) for turn in conversation for path in turn.get("images", [])]
    conversation, opened = preference_example(FLAT[1], images)
    assert [image.size for image in opened] == [(40, 40), (60, 30)] and opened[0].fp is not None  # not decoded yet
    rejected = rejected_conversation(conversation)
    assert rejected == [{"images": ["a.png", "sub/b.jpg"], "user": "<|image_1|>\n<|image_2|>\nSame size?",
                         "assistant": "Yes."}]


def png_bytes(size=(32, 24)):
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return buffer.getvalue()


def test_rlaif_v_hub_rows():
    row = {"ds_name": "RLAIF-V", "image": Image.new("RGB", (20, 10)), "question": "What colour?", "chosen": "Black.",
           "rejected": "White.", "origin_dataset": "OK-VQA", "origin_split": "train", "idx": 3, "image_path": "x.png"}
    conversation, images = rlaif_v_example(row)
    assert images == [row["image"]]
    assert conversation == [{"images": images, "user": "What colour?", "assistant": "Black.", REJECTED: "White."}]
    conversation, images = rlaif_v_example({**row, "image": {"bytes": png_bytes()}})
    assert images[0].size == (32, 24) and conversation[0]["images"] == images
    conversation, images = rlaif_v_example({**row, "image": None})  # text only
    assert images == [] and conversation == [{"user": "What colour?", "assistant": "Black.", REJECTED: "White."}]
    with pytest.raises(ValueError, match="'chosen' and 'rejected' are the same answer"):
        rlaif_v_example({**row, "rejected": "Black. "})
    with pytest.raises(ValueError, match="missing 'rejected'"):
        rlaif_v_example({key: value for key, value in row.items() if key != "rejected"})


def test_a_local_copy_of_rlaif_v_loads_and_its_rows_read(tmp_path, datasets_cache):
    """RLAIF-V's parquet files (RLAIF-V-Dataset_000.parquet, its columns and Image feature) through load_hf_dataset:
    rows decoded for training, and as token counting reads them (`sizes_only`)."""
    import datasets

    from phivision.data import load_hf_dataset, sizes_only

    columns = ("ds_name", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path")
    features = datasets.Features({"image": datasets.Image(), **{c: datasets.Value("string") for c in columns}})
    values = {c: [f"{c} {i}" for i in range(2)] for c in columns}
    images = [{"bytes": png_bytes((32, 24)), "path": None}, {"bytes": png_bytes((8, 16)), "path": None}]
    (tmp_path / "rlaif_v").mkdir()
    datasets.Dataset.from_dict({"image": images, **values}, features=features).to_parquet(
        str(tmp_path / "rlaif_v" / "RLAIF-V-Dataset_000.parquet"))
    rows = load_hf_dataset(str(tmp_path / "rlaif_v"))
    for view in (rows, sizes_only(rows)):
        conversation, opened = rlaif_v_example(view[1])
        assert [image.size for image in opened] == [(8, 16)]
        assert conversation == [{"images": opened, "user": "question 1", "assistant": "chosen 1",
                                 REJECTED: "rejected 1"}]


BAD = {
    "missing rejected": ({k: v for k, v in FLAT[0].items() if k != "rejected"}, "missing 'rejected'"),
    "missing chosen (conversation)": (
        {"id": "c", "conversations": [{"user": "Hi", "rejected": "Go."}]}, "conversations[0] is missing 'chosen'"),
    "chosen == rejected": ({**FLAT[0], "rejected": "A red square."}, "'chosen' and 'rejected' are the same answer"),
    "empty chosen": ({**FLAT[0], "chosen": "  "}, "'chosen' is empty"),
    "empty rejected": ({"id": "c", "conversations": [{"user": "Hi", "chosen": "Hi.", "rejected": ""}]},
                       "conversations[0]: 'rejected' is empty"),
    "rejected not a string": ({**FLAT[0], "rejected": ["A cat."]}, "'rejected' must be a string"),
    "question not a string": ({**FLAT[0], "question": None}, "'question' must be a string"),
    "image not a path": ({**FLAT[0], "image": 3}, "'image' must be a path or a list of paths"),
    "image outside images/": ({**FLAT[0], "image": "../a.png"}, "'image': image path '../a.png' has '..'"),
    "missing image": ({**FLAT[0], "image": "nowhere.png"}, "image 'nowhere.png' not found"),
    "typo in a key": ({**FLAT[0], "images": ["a.png"]}, "unknown key(s) 'images'"),
    "both chosen and assistant": (
        {"id": "c", "conversations": [{"user": "Hi", "assistant": "A", "chosen": "B", "rejected": "C"}]},
        "has both 'chosen' and 'assistant'"),
    "answers in an earlier turn": (
        {"id": "c", "conversations": [{"user": "Hi", "chosen": "A", "rejected": "B"},
                                      {"user": "Hi", "chosen": "A", "rejected": "B"}]},
        "conversations[0] has unknown key(s) 'chosen', 'rejected'"),
    "tag for a missing image": ({**FLAT[2], "question": "<|image_1|> Hi"}, "Expected no image tags"),
    "not an object": ([1, 2], "a record must be a JSON object"),
    "duplicate id": ({**FLAT[1], "chosen": "Maybe."}, "id 'two' already used on "),
}


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_is_one_line_naming_file_line_and_field(tmp_path, case, name):
    record, message = BAD[case]
    file = write_preference(tmp_path, FLAT[:2] + [record], name=name)
    with pytest.raises(ValidationError) as error:
        load_preference_data(tmp_path)
    line = 3 if name.endswith(".jsonl") else 4
    where = f"{file}:{line}: " + ("record [2]: " if name.endswith(".json") else "")
    assert "\n" not in str(error.value) and str(error.value).startswith(where) and message in str(error.value)


def test_every_bad_record_is_named(tmp_path):
    file = write_preference(tmp_path, [BAD["missing rejected"][0], FLAT[2], BAD["empty chosen"][0]],
                            extra_lines=["{not json"])
    with pytest.raises(ValidationError) as error:
        load_preference_data(tmp_path)
    assert [(p.line, p.message.split(" (")[0]) for p in error.value.problems] == [
        (1, "missing 'rejected'"), (3, "'chosen' is empty: nothing to compare"), (4, "not valid JSON")]
    assert all(p.path == str(file) for p in error.value.problems)


def test_the_supervised_and_the_preference_loaders_refuse_each_other_s_data(tmp_path):
    write_preference(tmp_path)
    with pytest.raises(ValidationError) as error:
        load_own_data(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'train.jsonl'}:1: a preference record ('chosen' and 'rejected' "
                                "answers): train on preference data with finetune_hf_trainer_dpo.py")
    supervised = tmp_path / "supervised"
    write_dataset(supervised, name="train.jsonl")
    with pytest.raises(ValidationError) as error:
        load_preference_data(supervised)
    assert str(error.value) == (f"{supervised / 'train.jsonl'}:1: a supervised record (no 'chosen' and 'rejected' "
                                "answers), as is every record of the file: train on it with "
                                "finetune_hf_trainer_custom.py")
    # One supervised record among preference ones is a bad preference record, named by its line.
    write_preference(tmp_path, FLAT + SUPERVISED[:1])
    with pytest.raises(ValidationError, match=r"train.jsonl:4: conversations\[0\] is missing 'rejected'"):
        load_preference_data(tmp_path)
    (tmp_path / "train.csv").write_text("image,question,answer\n")
    with pytest.raises(ValidationError, match="not a preference data file: expected .jsonl or .json"):
        load_preference_data(tmp_path / "train.csv")


def test_an_unreadable_image_is_left_to_the_run_which_names_and_skips_it(tmp_path):
    """As with supervised data: the record loads, and counting tokens names it (FILE:LINE) and skips it."""
    from phivision.data.rows import UNREADABLE
    from phivision.training.trainer import filter_by_length

    write_preference(tmp_path, FLAT[:1] + [{**FLAT[2], "image": "notes.png", "id": "bad"}])
    (tmp_path / "images/notes.png").write_text("not an image")
    data = load_preference_data(tmp_path, eval_fraction=0)
    assert [r["id"] for r in data.train] == ["one", "bad"]
    with pytest.raises(UNREADABLE, match="notes.png"):
        preference_example(data.train[1], data.images_dir)

    class Counter:  # stands in for a processor: a token per image side and a word
        def num_conversation_tokens(self, conversation, sizes, num_crops):
            return sum(w + h for w, h in sizes) + sum(len(t["user"].split()) for t in conversation)

    rows = filter_by_length(data.train, lambda r: preference_example(r, data.images_dir), Counter(), 4, None,
                            disable_tqdm=True)
    assert rows.indices == [0] and len(rows.unreadable) == 1
    assert rows.unreadable[0].startswith(f"{tmp_path / 'train.jsonl'}:2: UnidentifiedImageError")


def test_validate_cli_on_a_good_and_a_bad_preference_file(tmp_path, capsys):
    file = write_preference(tmp_path)
    assert cli.main(["validate", str(tmp_path), "--no_token_count", "--no-tqdm"]) == 0
    assert f"{file}: preference data (chosen and rejected answers), 4 valid record(s), 5 image(s): OK" in (
        capsys.readouterr().out)
    (tmp_path / "images/notes.png").write_text("not an image")
    write_preference(tmp_path, FLAT + [BAD["missing rejected"][0], {**FLAT[0], "id": "u", "image": "notes.png"}],
                     name="train.json")
    assert cli.main(["validate", str(tmp_path / "train.json"), "--no_token_count", "--no-tqdm"]) == 1
    out = capsys.readouterr().out
    assert "train.json: preference data (chosen and rejected answers), 3 valid record(s), 3 image(s): 2 problem(s)" in out
    assert f"  {tmp_path / 'train.json'}:5: record [3]: missing 'rejected'\n" in out
    assert f"  {tmp_path / 'train.json'}:6: record [4]: image 'notes.png' cannot be read as an image" in out
    (tmp_path / "notes.txt").write_text("")
    assert cli.main(["validate", str(tmp_path / "notes.txt"), "--no_token_count", "--no-tqdm"]) == 1
    assert "not a data file" in capsys.readouterr().err


def test_validate_cli_counts_the_tokens_of_both_sequences(tmp_path, capsys):
    """With the real Phi-3.5-vision tokenizer: the chosen and the rejected sequence each against --max_seq_length."""
    if not (HUB_FILES / "tokenizer.json").is_file():
        pytest.skip(f"no reference tokenizer files in {HUB_FILES}")
    processor = cli.load_processor(str(HUB_FILES))
    long_rejected = {**FLAT[2], "id": "long", "rejected": "No, " * 100 + "go away."}
    write_preference(tmp_path, [FLAT[2], long_rejected])
    sequences = [preference_example(record, tmp_path / "images")[0] for record in (FLAT[2], long_rejected)]
    chosen = [processor.num_conversation_tokens(s, [], 4) for s in sequences]
    rejected = [processor.num_conversation_tokens(rejected_conversation(s), [], 4) for s in sequences]
    assert chosen[1] < 100 < rejected[1]  # only the rejected sequence is over a budget of 100
    assert cli.main(["validate", str(tmp_path), "--model_name_or_path", str(HUB_FILES), "--num_crops", "4",
                     "--max_seq_length", "100", "--no-tqdm"]) == 0
    out = capsys.readouterr().out
    assert (f"tokens at num_crops 4: chosen max {max(chosen)}, mean {sum(chosen) / 2:.0f}, min {min(chosen)}; "
            f"rejected max {max(rejected)}, mean {sum(rejected) / 2:.0f}, min {min(rejected)}") in out
    assert "1 of 2 record(s) over --max_seq_length 100 (the chosen or the rejected sequence; training skips them)" in out
    assert f"line 2 (id long): chosen {chosen[1]}, rejected {rejected[1]} tokens" in out
