"""finetune_hf_trainer_dpo.py end to end on CPU: the tiny checkpoint, generated preference pairs ("what colour is the
shape?": the right colour chosen, a wrong one rejected; text-only pairs mixed in), LoRA and full fine-tuning under
torchrun x2, Phi-4-MM in process. One run serves several assertions."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import built_once
from forked import forked_run
from test_recipes import COMMON, ROOT, forked_recipe, log_losses, resume_pair, run_recipe, weights

from phivision.synthetic import make_shapes_preferences

SCRIPT = "finetune_hf_trainer_dpo.py"
# Small, yet the tiny random model has to learn colours from its images: steps of 8 fresh pairs, 4 per process in
# one pass (no accumulation: a quarter of the passes of 4 x 1), batches mixing image and text-only pairs (length
# grouping would give them batches of their own, and the model would swing between the two kinds). Held-out pairs:
# the 64 of test.jsonl. Held-out accuracy after (seeds 0, 1, 2): LoRA 40 steps
# 0.953, 0.953, 0.922 (48 steps: the same); full 64 steps 0.953, 1.0, 0.953.
TRAIN = ["--batch_size", "8", "--batch_size_per_gpu", "4", "--warmup_steps", "2", "--beta", "1",
         "--group_by_length", "false", "--metric", "accuracy",
         "--max_eval_samples", "64", "--max_new_tokens", "2", "--gradient_checkpointing", "false", "--save_steps", "1000",
         "--seed", "0"]
LORA_STEPS = "40"
FULL = ["--max_steps", "64", *TRAIN]  # one epoch of the 512 pairs, whose reference log-probs are stored


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    """512 training pairs + 64 held-out ones (test.jsonl), one in four text-only, in the flat local layout."""
    return built_once(tmp_path_factory, "shapes-preferences",
                      lambda path: make_shapes_preferences(path, num_train=512, num_eval=64, text_only_every=4))


def history(out: Path) -> list[dict]:
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def preference(out: Path, when: str) -> dict:
    return json.loads((out / f"eval_{when}.json").read_text())["preference"]


def check_learned(out: Path) -> None:
    """Held-out preference accuracy from chance (every pair a tie: policy = reference) to >= 0.9; margins grow."""
    before, after = preference(out, "before"), preference(out, "after")
    margins = [entry["rewards/margins"] for entry in history(out) if "rewards/margins" in entry]
    print(f"{out}: preference accuracy {after['preference_accuracy']}, margins {margins}")  # shown when it fails
    assert before == {"preference_accuracy": 0.5, "mean_logratio_margin": 0.0, "num_pairs": 64}
    assert after["preference_accuracy"] >= 0.9 and after["num_pairs"] == 64
    assert len(margins) >= 4 and margins[-1] > margins[0] and margins[-1] > 0.5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(key in entry for entry in history(out) if "loss" in entry), key
    json.loads((out / "eval_after.json").read_text())["score"]  # the task metric by generation is there too
    assert (out / "training_curves.png").stat().st_size > 10_000
    report = (out / "eval_report.html").read_text()
    assert "rejected answer" in report and "Preference accuracy on the held-out pairs" in report


def test_lora_learns_the_preference_on_two_ranks_and_merges_and_generates(tiny, pairs, tmp_path):
    from phivision import generate, merge_lora

    out = tmp_path / "out"
    forked_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(pairs), "--output_dir", str(out),
                  "--use_lora", "--lora_rank", "16", "--learning_rate", "5e-3", "--report_to", "tensorboard",
                  "--max_steps", LORA_STEPS, *TRAIN)
    check_learned(out)
    assert not (out / "reference_logps.json").exists()  # the reference is the base with the adapter disabled
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    merged = tmp_path / "merged"
    assert merge_lora.main(["--base", str(tiny), "--adapter", str(out), "--out", str(merged), "--dtype", "fp32"]) == 0
    image = pairs / "images" / "0.png"
    assert generate.main(["--model", str(merged), "--image", str(image), "--prompt",
                          "What colour is the shape? Answer red, green or blue.", "--max_new_tokens", "2"]) == 0


def test_full_fine_tuning_zero2_with_stored_reference_on_two_ranks(tiny, pairs, tmp_path):
    """The reference log-probs are computed once before training (each process its share) and stored; a finished
    run re-run changes nothing."""
    out = tmp_path / "out"
    forked_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(pairs), "--output_dir", str(out),
                  "--learning_rate", "2e-3", *FULL)
    check_learned(out)
    stored = json.loads((out / "reference_logps.json").read_text())
    assert len(stored["logps"]) == 512 and stored["source"]["model"] == str(tiny)
    assert (out / "model.safetensors").exists()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = forked_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(pairs), "--output_dir",
                           str(out), "--learning_rate", "2e-3", *FULL)
    assert "is complete" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_resumed_run_equals_an_uninterrupted_one_and_reuses_the_stored_reference(tiny, pairs, tmp_path):
    """Full fine-tuning in one process: a run resumed from its step-2 checkpoint (with the reference log-probs the
    first launch stored) trains as the uninterrupted run did."""
    common = ["--model_name_or_path", str(tiny), "--data_dir", str(pairs), "--deepspeed", "none", "--batch_size", "4",
              "--batch_size_per_gpu", "2", "--max_steps", "4", "--save_steps", "2", "--max_train_samples", "16",
              "--max_eval_samples", "2", "--max_new_tokens", "2", "--learning_rate", "1e-3", "--seed", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_recipe(SCRIPT, *common, "--output_dir", str(straight))
    resumed.mkdir()
    for name in ("checkpoint-2", "reference_logps.json", "eval_before.json", "eval_reference_logps.json"):
        copy = shutil.copytree if name.startswith("checkpoint-") else shutil.copy
        copy(straight / name, resumed / name)  # what a run stopped at step 2 leaves
    stored = (resumed / "reference_logps.json").stat().st_mtime_ns
    run_recipe(SCRIPT, *common, "--output_dir", str(resumed))
    assert (resumed / "reference_logps.json").stat().st_mtime_ns == stored  # read, not computed again
    assert log_losses(straight / "checkpoint-4") == pytest.approx(log_losses(resumed / "checkpoint-4"), rel=1e-5)
    margins = [[e["rewards/margins"] for e in history(out) if "rewards/margins" in e] for out in (straight, resumed)]
    assert margins[0] == pytest.approx(margins[1], rel=1e-5, abs=1e-7)
    a, b = weights(straight / "model.safetensors"), weights(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert preference(resumed, "after") == pytest.approx(preference(straight, "after"))


def test_phi4mm_lora_through_the_recipe(tiny_phi4mm, pairs, tmp_path):
    out = tmp_path / "out"
    run_recipe(SCRIPT, "--model_name_or_path", str(tiny_phi4mm), "--data_dir", str(pairs), "--output_dir", str(out),
               "--use_lora", "--lora_rank", "4", "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "2",
               "--max_train_samples", "8", "--max_eval_samples", "4", "--max_new_tokens", "2", "--learning_rate", "1e-2",
               "--packing")
    assert preference(out, "before")["preference_accuracy"] == 0.5
    after = preference(out, "after")
    assert after["num_pairs"] == 4 and after["mean_logratio_margin"] != 0  # the adapter trained
    assert all("rewards/margins" in e for e in history(out) if "loss" in e)
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--eval_strategy", "steps"], "--eval_strategy steps: preference tuning evaluates before and after training only"),
    (["--beta", "0"], "--beta must be above 0, got 0"),
])
def test_setup_mistakes_are_one_line(tiny, pairs, tmp_path, capsys, flags, message):
    from phivision.errors import SetupError

    try:
        run_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(pairs), "--output_dir",
                   str(tmp_path / "out"), "--use_lora", *flags)
    except SystemExit as e:  # a flag's own check: the parser's one line, exit status 2
        assert e.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    except SetupError as e:  # found once the checkpoint is known, before the model loads: one line
        assert message in str(e) and "\n" not in str(e)
    else:
        pytest.fail(f"{flags} was accepted")


def test_zero3_is_refused_with_one_line_on_two_ranks(tiny, pairs, tmp_path):
    """Before the model loads, in one line from the two ranks (what torchrun adds to a failed run is
    tests/test_long_runs.py::test_a_setup_mistake_under_torchrun_is_one_line_printed_once's)."""
    result = forked_run(ROOT / SCRIPT, [*COMMON, "--model_name_or_path", str(tiny), "--data_dir", str(pairs),
                                        "--output_dir", str(tmp_path / "out"), "--deepspeed",
                                        str(ROOT / "ds_config_zero3.json"), "--batch_size", "2"])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    line = f"error: --deepspeed {ROOT / 'ds_config_zero3.json'}: preference tuning runs under ZeRO-2"
    assert output.count(line) == 1 and "Traceback" not in output, output[-3000:]
    assert "Loading weights" not in output


def test_an_unreadable_pair_is_named_and_skipped_in_training_and_in_the_reference_pass(tiny, tmp_path, capsys):
    """A truncated image (its header reads, its pixels do not) in one training pair: full fine-tuning computes the
    reference log-probs of the others, trains on them, and names the pair by its file and line."""
    data = make_shapes_preferences(tmp_path / "pairs", num_train=8, num_eval=2, text_only_every=4)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    bad = data / "images" / records[0]["image"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "out"
    run_recipe(SCRIPT, "--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out),
               "--deepspeed", "none", "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "2",
               "--max_new_tokens", "2", "--max_bad_samples", "1", "--learning_rate", "1e-3")
    printed = capsys.readouterr().out
    assert printed.count("unreadable, skipped during training: ") == 1
    assert f"{data / 'train.jsonl'}:1" in printed.split("unreadable, skipped during training: ")[1].splitlines()[0]
    stored = json.loads((out / "reference_logps.json").read_text())
    assert len(stored["logps"]) == 7 and len(stored["indices"]) == 8  # every pair but the unreadable one
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("checkpoint, flags, stored", [
    ("tiny", ["--use_qlora", "--lora_rank", "4", "--bf16"], False),
    ("tiny_phi4mm", ["--continue_vision_lora", "--deepspeed", "none"], True),
], ids=["QLoRA", "Phi-4-MM continue_vision_lora"])
def test_the_reference_of_the_other_modes(checkpoint, flags, stored, pairs, tmp_path, request):
    """QLoRA: the 4-bit base with the adapter disabled. --continue_vision_lora: disabling the shipped vision LoRA
    would not give the starting model, so the reference log-probs are computed before training and stored."""
    out = tmp_path / "out"
    run_recipe(SCRIPT, "--model_name_or_path", str(request.getfixturevalue(checkpoint)), "--data_dir", str(pairs),
               "--output_dir", str(out), *flags, "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "2",
               "--max_train_samples", "8", "--max_eval_samples", "4", "--max_new_tokens", "2", "--learning_rate", "1e-2")
    assert (out / "reference_logps.json").exists() == stored
    assert preference(out, "before")["preference_accuracy"] == 0.5
    assert preference(out, "after")["mean_logratio_margin"] != 0
    first = next(e for e in history(out) if "rewards/margins" in e)
    if stored:  # step 1 starts from the reference: its rewards are 0 up to the precision of the two passes
        assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4


def test_two_seeded_runs_are_identical(tiny, pairs, tmp_path):
    common = ["--model_name_or_path", str(tiny), "--data_dir", str(pairs), "--use_lora", "--lora_rank", "4",
              "--lora_dropout", "0.1", "--batch_size", "4", "--batch_size_per_gpu", "2", "--max_steps", "2",
              "--max_train_samples", "8", "--max_eval_samples", "2", "--max_new_tokens", "2", "--skip_eval_before",
              "--learning_rate", "1e-2", "--seed", "3"]
    for name in ("a", "b"):
        run_recipe(SCRIPT, *common, "--output_dir", str(tmp_path / name))
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    assert [{k: v for k, v in e.items() if k not in timing} for e in history(tmp_path / "a")] == \
        [{k: v for k, v in e.items() if k not in timing} for e in history(tmp_path / "b")]
    a, b = weights(tmp_path / "a" / "adapter_model.safetensors"), weights(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_and_rerun_gives_the_uninterrupted_result(tiny, pairs, tmp_path):
    """Full fine-tuning with stored reference log-probs, killed while writing a checkpoint and at a random moment
    (perhaps while computing the reference), then run again to its end: as the uninterrupted run."""
    from test_long_runs import SLOW_CHECKPOINTS, finish, run_with_kills, start

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_CHECKPOINTS)
    argv = ["--model_name_or_path", tiny, "--data_dir", pairs, "--deepspeed", "none", "--batch_size", 4,
            "--batch_size_per_gpu", 2, "--max_steps", 6, "--save_steps", 1, "--max_train_samples", 24,
            "--max_eval_samples", 2, "--max_new_tokens", 2, "--learning_rate", 1e-3, "--seed", 1]
    straight = tmp_path / "straight"
    began = time.time()
    code, output = finish(start(False, *argv, "--output_dir", straight, script=SCRIPT))
    assert code == 0, output[-4000:]
    out = tmp_path / "killed"
    kills = run_with_kills(out, False, argv, ["at a random moment", "while writing a checkpoint"], site,
                           time.time() - began, script=SCRIPT)
    assert kills, "the runs were not interrupted"
    assert log_losses(out / "checkpoint-6") == pytest.approx(log_losses(straight / "checkpoint-6"), rel=1e-5)
    a, b = weights(straight / "model.safetensors"), weights(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "reference_logps.json").read_text()) == json.loads(
        (straight / "reference_logps.json").read_text())


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_rerun_finishes(tiny, pairs, tmp_path):
    """LoRA in one process, DataLoader workers on: SIGTERM stops training at a step boundary with a checkpoint."""
    import signal

    from test_long_runs import finish, launch, start, stopped_by_sigterm

    argv = ["--model_name_or_path", tiny, "--data_dir", pairs, "--use_lora", "--lora_rank", 4, "--batch_size", 2,
            "--batch_size_per_gpu", 2, "--max_steps", 12, "--save_steps", 100, "--max_train_samples", 24,
            "--max_eval_samples", 2, "--max_new_tokens", 2, "--dataloader_num_workers", 2, "--seed", 1]
    out = tmp_path / "out"
    code, output, step = stopped_by_sigterm(launch(False, *argv, "--output_dir", out, script=SCRIPT))
    assert code == 128 + signal.SIGTERM, output[-4000:]
    assert 1 <= step < 12 and (out / f"checkpoint-{step}" / "checkpoint_complete").is_file()
    assert "Traceback" not in output
    code, output = finish(start(False, *argv, "--output_dir", out, script=SCRIPT))  # the rerun: forked will do
    assert code == 0 and f"Resuming from {out / f'checkpoint-{step}'}" in output, output[-4000:]
    assert preference(out, "after")["num_pairs"] == 2
