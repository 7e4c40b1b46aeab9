"""phivision.data.formats: any data file by its suffix, a dataset from a folder or a file, held-out evaluation rows."""

import json

import pytest
from test_data_converted import GOOD as CONVERTED_GOOD
from test_data_converted import write_dataset
from test_data_csv_table import write_csv
from test_data_llava import CONVERTED, GOOD, write_llava

from phivision.data.converted import ValidationError
from phivision.data.formats import hold_out_at_random, is_video_like, load_own_data, read_records


def test_a_folder_with_train_and_test_files_of_any_format(tmp_path):
    write_csv(tmp_path, "image,question,answer\na.png,What?,A.\n,Hi?,Hi.\n")
    write_llava(tmp_path, GOOD[:2], name="test.json")
    data = load_own_data(tmp_path)
    assert [r["id"] for r in data.train] == ["2", "3"] and data.eval == CONVERTED[:2]
    assert data.images_dir == tmp_path / "images" and data.eval_source == "the 2 record(s) of test.json"
    (tmp_path / "mine_train.jsonl").write_text("")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ValidationError, match=r"several train files \(train.jsonl, train.csv\)"):
        load_own_data(tmp_path)


def test_records_of_either_form_in_jsonl_and_json(tmp_path):
    """LLaVA records one per line, converted records in a JSON list: the record's keys say which it is."""
    write_llava(tmp_path, [])
    (tmp_path / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    assert [record for _, _, record in read_records(tmp_path / "llava.jsonl")] == CONVERTED
    (tmp_path / "converted.json").write_text(json.dumps(CONVERTED))
    assert [record for _, _, record in read_records(tmp_path / "converted.json")] == CONVERTED
    with pytest.raises(ValidationError, match="not a data file"):
        read_records(tmp_path / "data.txt")


def test_a_single_file_holds_out_its_evaluation_rows(tmp_path):
    write_dataset(tmp_path, name="all.jsonl")
    data = load_own_data(tmp_path / "all.jsonl", eval_fraction=0.25, seed=1)
    assert len(data.train) == 3 and len(data.eval) == 1 and data.eval[0] in CONVERTED_GOOD
    assert data.eval_source == "1 record(s) held out from all.jsonl (--eval_fraction 0.25)"
    assert load_own_data(tmp_path / "all.jsonl", eval_fraction=0.25, seed=1) == data  # the same rows every run
    none = load_own_data(tmp_path / "all.jsonl", eval_fraction=0)
    assert none.train == CONVERTED_GOOD and none.eval == [] and none.eval_source.startswith("nothing")
    elsewhere = tmp_path / "pictures"
    (tmp_path / "images").rename(elsewhere)
    assert load_own_data(tmp_path / "all.jsonl", elsewhere).images_dir == elsewhere
    with pytest.raises(ValidationError, match="no images folder"):
        load_own_data(tmp_path / "all.jsonl")
    with pytest.raises(ValidationError, match="no such file or folder"):
        load_own_data(tmp_path / "nowhere")


def test_hold_out():
    records = [{"id": i} for i in range(100)]
    kept, held = hold_out_at_random(records, 0.1, seed=0)
    assert len(held) == 10 and kept + held != records and sorted(kept + held, key=lambda r: r["id"]) == records
    assert held == sorted(held, key=lambda r: r["id"])  # original order
    assert hold_out_at_random(records, 0.1, seed=1)[1] != held
    assert len(hold_out_at_random(records, 0.001, seed=0)[1]) == 1  # at least one...
    assert hold_out_at_random(records[:1], 0.5, seed=0) == (records[:1], [])  # ...but never all


def test_video_like_data_is_many_images_per_sample():
    def record(images):
        return {"conversations": [{"images": [f"{k}.jpg" for k in range(images)], "user": "?", "assistant": "A"}]}

    assert is_video_like([record(8), record(8), record(0), record(0), record(0)])  # text-only rows do not count
    assert not is_video_like([record(1), record(2), record(8)])
    assert not is_video_like([record(0)])


def test_held_out_and_kept_records_keep_their_file_and_line(tmp_path):
    """The run names an unreadable record by FILE:LINE (`rows.row_location`), also after holding out."""
    from phivision.data.rows import row_location

    write_dataset(tmp_path, name="all.jsonl")
    data = load_own_data(tmp_path / "all.jsonl", eval_fraction=0.25, seed=1)
    for part in (data.train, data.eval):
        lines = [CONVERTED_GOOD.index(record) + 1 for record in part]
        assert [row_location(part, i) for i in range(len(part))] == [f"{tmp_path / 'all.jsonl'}:{n}" for n in lines]
