"""The four recipes end to end on CPU: tiny checkpoint, generated data, every training mode.

Full fine-tuning runs under DeepSpeed ZeRO-2 on 2 ranks (gloo), as users run it with torchrun (the ranks forked as
tests/forked.py does; real torchrun launches are conftest's reference runs and test_long_runs'); the other modes
run in-process where that is enough to show the behaviour.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forked import forked_run
from safetensors.torch import load_file

from phivision import Phi3VForCausalLM
from phivision.synthetic import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--num_crops", "1", "--dataloader_num_workers", "0", "--no-tqdm", "--logging_steps", "1",
          "--warmup_steps", "0", "--eval_batch_size", "8"]


def run_recipe(script: str, *argv: str) -> None:
    """Runs a recipe's main() in this process."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([*COMMON, *argv])


def torchrun_recipe(script: str, *argv: str, nproc: int | None = 2) -> subprocess.CompletedProcess:
    """Runs a recipe under torchrun (gloo on CPU; nproc None: one plain process, no torchrun) and fails the test
    with its output if it fails."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [sys.executable, *launcher, str(ROOT / script), *COMMON, *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def forked_recipe(script: str, *argv: str, nproc: int | None = 2) -> subprocess.CompletedProcess:
    """torchrun_recipe's run with its ranks forked from a process that has imported the libraries once
    (tests/forked.py): the same recipe code on the same ranks and environment, without ~17 s of imports per run.
    Fails the test with its output if it fails."""
    result = forked_run(ROOT / script, [*COMMON, *argv], nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def log_losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {name: t.float() for name, t in load_file(path).items()}


def check_eval_file(path: Path, metric: str, num_examples: int) -> dict:
    summary = json.loads(path.read_text())
    assert summary["metric"] == metric and summary["num_examples"] == num_examples
    assert len(summary["examples"]) == num_examples
    for example in summary["examples"]:
        assert {"id", "question", "answers", "prediction", "score"} <= set(example)
    return summary


def test_hateful_memes_full_finetuning_zero2_bf16_on_two_ranks(tiny, shapes, tmp_path):
    out = tmp_path / "out"
    result = forked_recipe(
        "finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
        str(shapes), "--output_dir", str(out), "--bf16", "--batch_size", "8", "--batch_size_per_gpu", "2",
        "--max_steps", "2", "--save_steps", "1", "--max_eval_samples", "6",
    )
    assert "full fine-tuning" in result.stdout
    assert result.stdout.count("Evaluation before training") == 1  # printed by rank 0 only
    check_eval_file(out / "eval_before.json", "accuracy", 6)
    check_eval_file(out / "eval_after.json", "accuracy", 6)
    # The final directory is a complete checkpoint in the Hub layout, loadable as is.
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["rope_scaling"]["type"] == "su"
    assert "vision_config" not in config
    trained = Phi3VForCausalLM.from_pretrained(out)
    original = Phi3VForCausalLM.from_pretrained(tiny)
    assert trained.state_dict().keys() == original.state_dict().keys()
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)
    assert (out / "preprocessor_config.json").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_nlvr2_lora_packed_two_images_on_two_ranks(tiny, tmp_path):
    data = make_shapes_dataset(tmp_path / "pairs", num_train=16, images_per_row=2)
    out = tmp_path / "out"
    forked_recipe(
        "finetune_hf_trainer_nlvr2.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path", str(data),
        "--output_dir", str(out), "--use_lora", "--lora_rank", "4", "--batch_size", "4", "--batch_size_per_gpu", "2",
        "--max_steps", "2", "--max_eval_samples", "4", "--skip_eval_before", "--packing",
    )
    assert not (out / "eval_before.json").exists()
    check_eval_file(out / "eval_after.json", "accuracy", 4)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8

    from peft import PeftModel

    model = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny), out)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert any(p.abs().sum() > 0 for p in lora_b.values())  # trained (gaussian init leaves B at zero)
    vision = "vision_model.encoder.layers.{}.self_attn.q_proj.lora_B"
    assert any(vision.format(0) in n for n in lora_b)  # CLIP adapted up to its feature layer...
    assert not any(vision.format(2) in n for n in lora_b)  # ...and not in the layer after it, which never runs


def docvqa_dataset(path: Path) -> Path:
    """docvqa_1200_examples' schema: image, query {"en"}, answers; train and test splits."""
    import datasets

    from phivision.synthetic import shapes_rows

    def split(n, seed):
        rows = shapes_rows(n, seed=seed)
        return datasets.Dataset.from_dict({
            "image": [r["images"][0] for r in rows],
            "query": [{"en": "What colour is the shape?"} for _ in rows],
            "answers": [[r["texts"][0]["assistant"], r["texts"][0]["assistant"].upper()] for r in rows],
        }, features=datasets.Features({
            "image": datasets.Image(), "query": {"en": datasets.Value("string")},
            "answers": datasets.Sequence(datasets.Value("string")),
        }))

    datasets.DatasetDict({"train": split(12, 1), "test": split(5, 2)}).save_to_disk(str(path))
    return path


def test_docvqa_frozen_vision_in_process(tiny, tmp_path):
    out = tmp_path / "out"
    run_recipe(
        "finetune_hf_trainer_docvqa.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
        str(docvqa_dataset(tmp_path / "docvqa")), "--output_dir", str(out), "--freeze_vision_model",
        "--deepspeed", "none", "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "2",
        "--learning_rate", "1e-2",
    )
    summary = check_eval_file(out / "eval_after.json", "anls", 5)
    assert all(len(example["answers"]) == 2 for example in summary["examples"])
    before, after = weights(tiny / "model.safetensors"), weights(out / "model.safetensors")
    vision = [n for n in before if n.startswith("model.vision_embed_tokens.")]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert not torch.equal(before["model.layers.0.self_attn.qkv_proj.weight"], after["model.layers.0.self_attn.qkv_proj.weight"])


def test_ucf101_qlora_on_converted_videos(tiny, tmp_path):
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import convert_ucf101
    from videos import write_clip

    for split, clips in {"train": 3, "val": 1, "test": 1}.items():
        for cls in ("Archery", "Basketball"):
            for i in range(clips):
                write_clip(tmp_path / "src" / split / cls / f"v_{cls}_{i}.avi", 10 + 3 * i)
    data = tmp_path / "converted"
    assert convert_ucf101.main(["--src_dir", str(tmp_path / "src"), "--out_dir", str(data), "--num_workers", "0",
                                "--num_frames", "2", "--no-tqdm"]) == 0
    out = tmp_path / "out"
    run_recipe(
        "finetune_hf_trainer_ucf101.py", "--model_name_or_path", str(tiny), "--data_dir", str(data),
        "--output_dir", str(out), "--use_qlora", "--bf16", "--lora_rank", "4", "--batch_size", "2",
        "--batch_size_per_gpu", "2", "--max_steps", "2",
    )
    check_eval_file(out / "eval_before.json", "accuracy", 2)  # the default flow: evaluation before QLoRA training
    check_eval_file(out / "eval_after.json", "accuracy", 2)
    assert (out / "adapter_model.safetensors").exists()


def test_learning_colour_task_from_chance_to_near_perfect(tiny, tmp_path):
    """A full fine-tune of the tiny model learns "what colour is the shape?" in a few hundred steps."""
    data = make_shapes_dataset(tmp_path / "shapes", num_train=256, num_eval=500)
    out = tmp_path / "out"
    run_recipe(
        "finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path", str(data),
        "--output_dir", str(out), "--deepspeed", "none", "--batch_size", "8", "--batch_size_per_gpu", "8",
        "--num_train_epochs", "2", "--learning_rate", "3e-3", "--warmup_steps", "5", "--max_eval_samples", "48",
        "--gradient_checkpointing", "false", "--save_steps", "1000", "--seed", "0",
    )
    before = json.loads((out / "eval_before.json").read_text())["score"]
    after = json.loads((out / "eval_after.json").read_text())["score"]
    assert before <= 0.5  # three colours: chance is 1/3, the random model says nothing sensible
    assert after >= 0.95


def resume_pair(tmp_path: Path, run, extra: list[str]) -> tuple[Path, Path]:
    """An uninterrupted 4-step run, and a run that resumes from its step-2 checkpoint."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(*extra, "--output_dir", str(straight))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # what a run stopped at step 2 leaves
    run(*extra, "--output_dir", str(resumed))  # resumes from output_dir's newest checkpoint by itself
    return straight, resumed


def test_lora_resume_in_one_process_gives_the_same_weights_and_losses(lora_reference, tmp_path, capsys):
    """Phi-3-V LoRA: a run stopped at step 2 resumes to the uninterrupted run's step 6."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-2", "eval_before.json"):  # what a run stopped at step 2 leaves
        copy = shutil.copytree if name.startswith("checkpoint-") else shutil.copy
        copy(lora_reference.out / name, resumed / name)
    run_recipe("finetune_hf_trainer_hateful_memes.py", *lora_reference.flags, "--output_dir", str(resumed))
    assert f"Resuming from {resumed / 'checkpoint-2'}" in capsys.readouterr().out
    straight = lora_reference.out
    assert len(log_losses(straight / "checkpoint-6")) == 6
    assert log_losses(straight / "checkpoint-6") == pytest.approx(log_losses(resumed / "checkpoint-6"), rel=1e-5)
    a, b = weights(straight / "adapter_model.safetensors"), weights(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpoint, mode", [("tiny_phi4mm", "LoRA"), ("tiny_phi4mm", "full")],
                         ids=["Phi-4-MM LoRA", "Phi-4-MM full"])
def test_resume_in_one_process_gives_the_same_weights_and_losses(checkpoint, mode, shapes, tmp_path, request):
    """(Phi-4-MM's full checkpoints hold the speech encoder, which the model in training lacks. Phi-3-V's LoRA
    resume: test_lora_resume_in_one_process_gives_the_same_weights_and_losses.)"""
    flags = ["--use_lora", "--lora_rank", "4"] if mode == "LoRA" else ["--deepspeed", "none"]
    common = ["--model_name_or_path", str(request.getfixturevalue(checkpoint)), "--dataset_name_or_path", str(shapes),
              *flags, "--batch_size", "4", "--batch_size_per_gpu", "2", "--max_steps", "4",
              "--save_steps", "2", "--skip_eval_before", "--max_eval_samples", "1", "--learning_rate", "1e-2"]
    straight, resumed = resume_pair(tmp_path, lambda *a: run_recipe("finetune_hf_trainer_hateful_memes.py", *a), common)
    assert log_losses(straight / "checkpoint-4") == pytest.approx(log_losses(resumed / "checkpoint-4"), rel=1e-5)
    name = "adapter_model.safetensors" if mode == "LoRA" else "model.safetensors"
    a, b = weights(straight / name), weights(resumed / name)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_full_zero2_resume_gives_the_same_weights_and_losses(zero2_reference, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint-4", "eval_before.json"):  # what a run stopped at step 4 leaves
        copy = shutil.copytree if name.startswith("checkpoint-") else shutil.copy
        copy(zero2_reference.out / name, resumed / name)
    result = forked_recipe("finetune_hf_trainer_hateful_memes.py", *zero2_reference.flags, "--output_dir", str(resumed))
    assert f"Resuming from {resumed / 'checkpoint-4'}" in result.stdout  # from output_dir's newest checkpoint by itself
    assert (resumed / "checkpoint-6" / "global_step6").is_dir()  # DeepSpeed's optimizer state was saved and reloaded
    straight = zero2_reference.out
    assert log_losses(straight / "checkpoint-6") == pytest.approx(log_losses(resumed / "checkpoint-6"), rel=1e-5)
    a, b = weights(straight / "model.safetensors"), weights(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_task_metric_during_training_keeps_the_best_checkpoint_and_resume_keeps_the_best_so_far(tiny, shapes, tmp_path):
    """--eval_strategy steps logs eval_accuracy (generation, as before/after) with eval_loss; the best checkpoint
    by --metric_for_best_model survives --save_total_limit and becomes the saved model."""
    common = ["--model_name_or_path", str(tiny), "--dataset_name_or_path", str(shapes), "--use_lora", "--lora_rank",
              "4", "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "6", "--save_steps", "2",
              "--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "4", "--skip_eval_before",
              "--learning_rate", "1e-2", "--load_best_model_at_end", "--save_total_limit", "2",
              # the evaluation loss falls as training goes on: "greater is better" makes the first one the best
              "--metric_for_best_model", "loss", "--greater_is_better", "true"]
    straight, resumed = resume_pair(tmp_path, lambda *a: run_recipe("finetune_hf_trainer_hateful_memes.py", *a), common)
    for out in (straight, resumed):
        state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
        evaluations = [entry for entry in state["log_history"] if "eval_loss" in entry]
        assert [entry["step"] for entry in evaluations] == [2, 4, 6]
        assert all(0.0 <= entry["eval_accuracy"] <= 1.0 for entry in evaluations)
        assert state["best_model_checkpoint"] == str(out / "checkpoint-2")  # kept by the resumed run too
        assert state["best_metric"] == pytest.approx(evaluations[0]["eval_loss"])
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
        best, saved = weights(out / "checkpoint-2" / "adapter_model.safetensors"), weights(out / "adapter_model.safetensors")
        assert all(torch.equal(best[k], saved[k]) for k in best)  # the saved model is the best one
    assert json.loads((straight / "eval_after.json").read_text()) == json.loads((resumed / "eval_after.json").read_text())
