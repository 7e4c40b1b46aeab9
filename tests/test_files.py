"""phivision.files: outputs are written whole or not at all, with the permissions the umask gives."""

import json
import os
import stat

import pytest

from phivision.files import write_atomically, write_json, write_jsonl


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_json_and_jsonl_round_trip(tmp_path):
    write_json(tmp_path / "deep" / "summary.json", {"score": 0.5, "text": "naïve"})
    assert json.loads((tmp_path / "deep" / "summary.json").read_text(encoding="utf-8")) == {"score": 0.5, "text": "naïve"}
    rows = [{"id": 1, "text": "line\u2028separator"}, {"id": 2}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    lines = (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows  # U+2028 escaped: splitlines sees two lines


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "eval.json"
    write_json(path, {"old": True})

    def fails_midway(f):
        f.write('{"new": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomically(path, fails_midway)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_binary_write(tmp_path):
    write_atomically(tmp_path / "picture.png", lambda f: f.write(b"\x89PNG\r\n"), binary=True)
    assert (tmp_path / "picture.png").read_bytes() == b"\x89PNG\r\n"  # no newline translation


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {})
        write_jsonl(tmp_path / "b.jsonl", [{}])
        plain = tmp_path / "plain.txt"
        plain.write_text("")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.jsonl") == mode(plain) == 0o666 & ~umask


def test_every_file_of_a_lora_run_a_merge_and_generate_follows_the_umask(tiny, tmp_path, capsys):
    """Weights included: safetensors writes its files 0600 unless we give them the umask's mode."""
    from helpers import modes_under
    from test_recipe_custom import SCRIPT, shapes
    from test_recipes import run_recipe

    from phivision import generate, merge_lora

    data = tmp_path / "data"
    records = [{"id": f"r{k}", "conversations": [{"images": [path], "user": "Colour?", "assistant": colour}]}
               for k, (path, colour) in enumerate(shapes(data / "images", 4, seed=1))]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    old = os.umask(0o022)
    try:
        run_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir",
                   str(tmp_path / "run"), "--use_lora", "--lora_rank", "4", "--batch_size", "2",
                   "--batch_size_per_gpu", "2", "--max_steps", "1", "--save_steps", "1", "--max_eval_samples", "1",
                   "--max_new_tokens", "2")
        assert merge_lora.main(["--base", str(tiny), "--adapter", str(tmp_path / "run"), "--out",
                                str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
        assert generate.main(["--model", str(tmp_path / "merged"), "--input", str(data / "test.jsonl"), "--output",
                              str(tmp_path / "predictions" / "p.jsonl"), "--max_new_tokens", "2", "--no_tqdm"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    for folder in ("run", "merged", "predictions"):
        assert modes_under(tmp_path / folder, 0o022) == {}, folder


@pytest.mark.parametrize("family", ["phi3v", "phi4mm"])
def test_a_tiny_checkpoint_follows_the_umask(tmp_path, family):
    from helpers import modes_under

    from phivision import tiny

    old = os.umask(0o022)
    try:
        tiny.main([str(tmp_path / "tiny"), "--family", family, "--num_crops", "1"])
    finally:
        os.umask(old)
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert modes_under(tmp_path / "tiny", 0o022) == {}
