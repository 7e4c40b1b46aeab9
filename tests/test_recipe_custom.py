"""finetune_hf_trainer_custom.py end to end on CPU: LLaVA JSON, CSV and converted jsonl; what the saved folder offers
to vLLM and the original remote code; defaults picked from the data; bad data named before any model loads."""

import csv
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from helpers import check_loads_elsewhere, modes_under
from PIL import Image
from test_recipes import ROOT, check_eval_file, run_recipe

from phivision import Phi3VForCausalLM, Phi3VProcessor
from phivision.synthetic import COLOURS, shape_image

SCRIPT = "finetune_hf_trainer_custom.py"
QUESTION = "What colour is the shape? Answer red, green or blue."


def shapes(images_dir: Path, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` shape images written under images_dir: (path relative to it, colour)."""
    rng = random.Random(seed)
    images_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(count):
        colour = rng.choice(sorted(COLOURS))
        shape_image(colour, rng).save(images_dir / f"{seed}-{k}.png")
        out.append((f"{seed}-{k}.png", colour))
    return out


def llava_records(images_dir: Path, count: int, seed: int) -> list[dict]:
    """Single-image, two-image two-turn and text-only records, in turn."""
    pictures = iter(shapes(images_dir, 2 * count, seed))
    records = []
    for k in range(count):
        (a, colour_a), (b, colour_b) = next(pictures), next(pictures)
        if k % 3 == 0:
            records.append({"id": f"{seed}-{k}", "image": a, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": colour_a}]})
        elif k % 3 == 1:
            records.append({"id": f"{seed}-{k}", "image": [a, b], "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": colour_a},
                {"from": "human", "value": "And in <image>?"}, {"from": "gpt", "value": colour_b}]})
        else:
            records.append({"id": f"{seed}-{k}", "conversations": [
                {"from": "human", "value": f"Say the word {colour_a}."}, {"from": "gpt", "value": colour_a}]})
    return records


def test_llava_folder_full_finetuning_saves_a_folder_that_loads_elsewhere(tiny, tmp_path):
    data = tmp_path / "llava"
    (data / "train.json").parent.mkdir()
    (data / "train.json").write_text(json.dumps(llava_records(data / "images", 9, seed=1), indent=2))
    (data / "test.json").write_text(json.dumps(llava_records(data / "images", 3, seed=2), indent=2))
    out = tmp_path / "out"
    run_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out),
               "--deepspeed", "none", "--batch_size", "3", "--batch_size_per_gpu", "3", "--max_steps", "2",
               "--skip_eval_before")
    summary = check_eval_file(out / "eval_after.json", "accuracy", 3)
    assert [e["question"] for e in summary["examples"]] == [f"<|image_1|>\n{QUESTION}", "And in <|image_2|>?",
                                                           "Say the word " + summary["examples"][2]["answers"][0] + "."]
    # A full checkpoint whose files name the Hub's code (vLLM, transformers 4.x), and that we load natively...
    check_loads_elsewhere(out)
    assert not list(out.glob("*.py"))
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert isinstance(processor, Phi3VProcessor) and processor.image_processor.num_crops == 1  # as trained
    inputs = processor(f"<|user|>\n<|image_1|>\n{QUESTION}<|end|>\n<|assistant|>\n", [Image.open(data / "images/2-0.png")])
    with torch.no_grad():
        direct = Phi3VForCausalLM.from_pretrained(out).eval()(**inputs).logits
        auto = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(**inputs).logits
    assert torch.equal(direct, auto)  # ...to the same logits


def test_csv_with_lora_anls_and_held_out_rows(tiny, tmp_path):
    data = tmp_path / "table"
    rows = shapes(data / "images", 8, seed=3)
    with open(data / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        writer.writerows([path, QUESTION, colour] for path, colour in rows)
        writer.writerow(["", "Say the word red.", "red"])
    out = tmp_path / "out"
    run_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_file", str(data / "train.csv"), "--output_dir",
               str(out), "--use_lora", "--lora_rank", "4", "--batch_size", "2", "--batch_size_per_gpu", "2",
               "--max_steps", "2", "--metric", "anls", "--eval_fraction", "0.3")
    check_eval_file(out / "eval_before.json", "anls", 3)
    summary = check_eval_file(out / "eval_after.json", "anls", 3)
    assert 0 <= summary["score"] <= 1
    assert (out / "adapter_model.safetensors").exists()
    check_loads_elsewhere(out, model=False)  # the processor files a merge will carry over


def test_converted_jsonl_with_metric_none(tiny, tmp_path):
    data = tmp_path / "converted"
    records = [{"id": f"r{k}", "conversations": [{"images": [path], "user": QUESTION, "assistant": colour}]}
               for k, (path, colour) in enumerate(shapes(data / "images", 6, seed=4))]
    (data / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    run_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_file", str(data / "mine.jsonl"), "--output_dir",
               str(out), "--deepspeed", "none", "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "1",
               "--metric", "none", "--eval_fraction", "0.34", "--skip_eval_before", "--max_new_tokens", "4")
    summary = check_eval_file(out / "eval_after.json", "none", 2)
    assert summary["score"] is None and all(e["score"] is None and "prediction" in e for e in summary["examples"])


def test_eval_fraction_0_trains_without_evaluating_and_draws_the_curves(tiny, tmp_path, capsys):
    """"--eval_fraction 0 with no test file trains without evaluating": the run ends with its curves, and so does
    the re-run; every file it writes (weights and checkpoints included) has the mode the umask gives."""
    data = tmp_path / "data"
    (data / "train.json").parent.mkdir()
    (data / "train.json").write_text(json.dumps(llava_records(data / "images", 4, seed=8)))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out), "--deepspeed", "none",
            "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "1", "--save_steps", "1",
            "--eval_fraction", "0"]
    old = os.umask(0o022)
    try:
        for _ in range(2):  # the re-run finishes from the last checkpoint
            run_recipe(SCRIPT, *argv)
            printed = capsys.readouterr().out
            assert f"Training curves: {out / 'training_curves.png'}" in printed
            assert "Evaluation report: none (no evaluation rows)" in printed
    finally:
        os.umask(old)
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-1" / "model.safetensors").is_file()
    assert not (out / "eval_after.json").exists() and not (out / "eval_report.html").exists()
    assert modes_under(out, 0o022) == {}


def load_script():
    spec = importlib.util.spec_from_file_location("custom_recipe", ROOT / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_num_crops_follows_the_data_unless_given(tmp_path, monkeypatch):
    """16 crops for photos, 4 for samples of many frames (video), the flag when it is given."""
    photos = tmp_path / "photos"
    (photos / "train.json").parent.mkdir()
    (photos / "train.json").write_text(json.dumps(llava_records(photos / "images", 3, seed=5)))
    frames = tmp_path / "frames"
    clips = [[path for path, _ in shapes(frames / "images", 4, seed=6 + k)] for k in range(2)]
    (frames / "train.jsonl").write_text("".join(json.dumps(
        {"id": str(k), "conversations": [{"images": clip, "user": "Which class?", "assistant": "Archery"}]}) + "\n"
        for k, clip in enumerate(clips)))
    module = load_script()
    chosen = []
    monkeypatch.setattr(module, "run", lambda args, *rest, **kwargs: chosen.append(args.model.num_crops))
    for folder, extra in ((photos, []), (frames, []), (frames, ["--num_crops", "2"])):
        module.main(["--data_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--deepspeed", "none", *extra])
    assert chosen == [16, 4, 2]


def test_bad_data_and_flags_stop_before_any_model_loads(tmp_path, capsys):
    data = tmp_path / "bad"
    records = llava_records(data / "images", 2, seed=7)
    records[1]["conversations"].append({"from": "human", "value": "Anything else?"})
    (data / "train.json").write_text(json.dumps(records, indent=2))
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(SCRIPT, "--model_name_or_path", str(tmp_path / "no-model"), "--data_dir", str(data), "--deepspeed",
                   "none")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"{data / 'train.json'}:" in err and ": record [1]: conversations[4]: the last human message has no gpt" in err
    assert f"python -m phivision.data validate {data}" in err
    for flags in ([], ["--data_dir", str(data), "--data_file", str(data / "train.json")]):
        with pytest.raises(SystemExit) as exit_info:
            run_recipe(SCRIPT, *flags)
        assert exit_info.value.code == 2
        assert "pass --data_dir DIR or --data_file FILE (one of them)" in capsys.readouterr().err


def test_preference_data_is_refused_in_one_line_pointing_at_the_dpo_recipe(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "Say hi.", "chosen": "Hi.", "rejected": "No."}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(SCRIPT, "--model_name_or_path", str(tmp_path / "no-model"), "--data_file", str(data),
                   "--deepspeed", "none")
    assert exit_info.value.code == 1
    assert (f"{data}:1: a preference record ('chosen' and 'rejected' answers): train on preference data with "
            "finetune_hf_trainer_dpo.py\n") in capsys.readouterr().err
