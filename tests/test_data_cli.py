"""`python -m phivision.data validate`: reports, exit status, token counts with the real Phi-3.5-vision tokenizer files."""

import json
from pathlib import Path

import pytest
from test_data_converted import BROKEN, GOOD, write_dataset

from phivision.data import cli
from phivision.data.cli import main
from phivision.data.converted import validate_record

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
HUB_FILES = REFERENCE / "phi35v_hub_files"


def test_cli_good_and_broken(tmp_path, capsys):
    write_dataset(tmp_path)
    write_dataset(tmp_path, GOOD[:1], name="ucf101_test.jsonl")
    assert main(["validate", str(tmp_path), "--no_token_count", "--no-tqdm"]) == 0
    out = capsys.readouterr().out
    assert "ucf101_train.jsonl: 4 valid record(s), 5 image(s): OK" in out
    assert out.index("ucf101_train.jsonl") < out.index("ucf101_test.jsonl")  # train, val, test order

    write_dataset(tmp_path, GOOD[:1], name="ucf101_test.jsonl", extra_lines=[BROKEN["escape with .."][0]])
    assert main(["validate", str(tmp_path), "--no_token_count", "--no-tqdm"]) == 1
    captured = capsys.readouterr()
    assert "ucf101_test.jsonl: 1 valid record(s), 1 image(s): 1 problem(s)" in captured.out
    assert f"{tmp_path / 'ucf101_test.jsonl'}:2: conversations[0]: image path 'sub/../../secret.png' has '..'" in captured.out
    assert main(["validate", str(tmp_path), "--splits", "train", "--no_token_count", "--no-tqdm"]) == 0
    assert main(["validate", str(tmp_path / "nowhere"), "--no_token_count", "--no-tqdm"]) == 1


def test_cli_without_a_processor(tmp_path, capsys, monkeypatch):
    def offline(name):
        raise OSError("offline")

    monkeypatch.setattr(cli, "load_processor", offline)
    write_dataset(tmp_path)
    assert main(["validate", str(tmp_path), "--no-tqdm"]) == 0  # the default model: a warning
    assert "Token counts skipped" in capsys.readouterr().err
    assert main(["validate", str(tmp_path), "--no-tqdm", "--model_name_or_path", "somewhere"]) == 1


@pytest.fixture(scope="module")
def processor():
    if not (HUB_FILES / "tokenizer.json").is_file():
        pytest.skip(f"no reference tokenizer files in {HUB_FILES}")
    pytest.importorskip("phivision.phi3v.processing")
    return cli.load_processor(str(HUB_FILES))


def test_token_counts_of_records(tmp_path, processor):
    """Token counts from the records' image headers equal the encoded conversations' lengths."""
    write_dataset(tmp_path)
    images = tmp_path / "images"
    for record in GOOD:
        sizes = validate_record(record, images)
        counts = [processor.image_processor.num_image_tokens(w, h, 4) for w, h in sizes]
        expected = len(processor.encode_conversation(record["conversations"], counts)[0])
        assert processor.num_conversation_tokens(record["conversations"], sizes, 4) == expected
    # one small image at num_crops 4 is 757 tokens (global view + 2x2 crops + separators), 1 at 313
    sizes = validate_record(GOOD[0], images)
    turns = GOOD[0]["conversations"]
    assert processor.num_conversation_tokens(turns, sizes, 4) - processor.num_conversation_tokens(turns, sizes, 1) == 757 - 313


def test_cli_token_report(tmp_path, processor, capsys):
    write_dataset(tmp_path)
    assert main(["validate", str(tmp_path), "--model_name_or_path", str(HUB_FILES), "--num_crops", "4",
                 "--max_seq_length", "1000", "--no-tqdm"]) == 0
    out = capsys.readouterr().out
    counts = [processor.num_conversation_tokens(r["conversations"], validate_record(r, tmp_path / "images"), 4)
              for r in GOOD]
    assert f"tokens at num_crops 4: max {max(counts)}, mean {sum(counts) / 4:.0f}, min {min(counts)}" in out
    over = [r["id"] for r, n in zip(GOOD, counts) if n > 1000]
    assert f"{len(over)} of 4 record(s) over --max_seq_length 1000" in out and over == ["train-1", "train-2"]
    assert "line 2 (id train-1)" in out


def test_cli_reads_llava_json_and_csv(tmp_path, capsys):
    from test_data_csv_table import GOOD as CSV_GOOD
    from test_data_csv_table import write_csv
    from test_data_llava import BROKEN as LLAVA_BROKEN
    from test_data_llava import GOOD as LLAVA_GOOD
    from test_data_llava import write_llava

    path = write_llava(tmp_path / "llava", LLAVA_GOOD)
    assert main(["validate", str(path.parent), "--no_token_count", "--no-tqdm"]) == 0
    assert f"{path}: 5 valid record(s), 7 image(s): OK" in capsys.readouterr().out
    write_llava(tmp_path / "llava", [LLAVA_GOOD[0], LLAVA_BROKEN["system prompt"][0]])
    assert main(["validate", str(path), "--no_token_count", "--no-tqdm"]) == 1  # one file
    line = len(json.dumps([LLAVA_GOOD[0]], indent=2).splitlines())  # where the second record opens
    assert f"{path}:{line}: record [1]: conversations[0]: 'from' 'system'" in capsys.readouterr().out

    table = write_csv(tmp_path / "table", CSV_GOOD, name="photos.csv")
    (tmp_path / "table" / "images").rename(tmp_path / "pictures")
    assert main(["validate", str(table), "--no_token_count", "--no-tqdm"]) == 1  # images/ beside it: none
    assert "no images folder" in capsys.readouterr().out
    assert main(["validate", str(table), "--image_folder", str(tmp_path / "pictures"), "--no_token_count",
                 "--no-tqdm"]) == 0
    assert f"{table}: 3 valid record(s), 2 image(s): OK" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--max_seq_length", "--num_crops"])
def test_cli_refuses_a_count_below_1(tmp_path, capsys, flag):
    write_dataset(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(tmp_path), flag, "-1", "--no-tqdm"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {flag} must be at least 1, got -1")
