"""Full fine-tuning with sharded weights (DeepSpeed ZeRO-3, FSDP2) on 2 ranks (gloo), forked as tests/forked.py does.

The data makes one rank see only text-only samples (in training and in evaluation) while the other
sees only images: every forward pass gathers weights with collectives, so the vision tower must run
on both (the collective mismatch a Phi-3-V peer crashes with). The results must equal a
single-process run's, be saved in the Hub layout, and a resumed run must equal an uninterrupted one.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import built_once
from test_recipes import ROOT, check_eval_file, forked_recipe, log_losses, run_recipe, weights

from phivision import Phi3VForCausalLM
from phivision.synthetic import make_shapes_dataset

MEMES = "finetune_hf_trainer_hateful_memes.py"
STRATEGIES = {
    "zero3": ["--deepspeed", str(ROOT / "ds_config_zero3.json")],
    "fsdp2": ["--fsdp", "--fsdp_config", str(ROOT / "fsdp_config.json")],
}


@pytest.fixture(scope="session")
def mixed(tmp_path_factory) -> Path:
    """Every other row text-only: with sequential order rank 0 gets the image rows, rank 1 the text-only ones."""
    return built_once(tmp_path_factory, "mixed", lambda path: make_shapes_dataset(
        path, num_train=16, num_eval=500, text_only_every=2))


def common(tiny: Path, data: Path) -> list[str]:
    # 2 processes x 1 sample x 2 accumulation steps: each step trains rows 0-3, 4-7... in any process count.
    return ["--model_name_or_path", str(tiny), "--dataset_name_or_path", str(data), "--batch_size", "4",
            "--batch_size_per_gpu", "1", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3",
            "--train_sampling_strategy", "sequential", "--max_eval_samples", "5", "--eval_batch_size", "1"]


@pytest.fixture(scope="session")
def single_process(tiny, mixed, tmp_path_factory) -> Path:
    """The same training in one process without sharding (plain fp32 AdamW); one run for both strategies."""
    return built_once(tmp_path_factory, "single-process", lambda out: run_recipe(
        MEMES, *common(tiny, mixed), "--deepspeed", "none", "--skip_eval_before", "--output_dir", str(out)))


@pytest.fixture(scope="session")
def sharded_run(tiny, mixed, tmp_path_factory):
    """`sharded_run(strategy)`: the uninterrupted sharded run's output folder and its output (one run per strategy
    per test run: the ZeRO-3 one also serves the test of a run stopped after its last step)."""
    def run(strategy: str) -> tuple[Path, str]:
        def build(folder: Path) -> None:
            result = forked_recipe(MEMES, *common(tiny, mixed), *STRATEGIES[strategy], "--output_dir", str(folder / "out"))
            (folder / "stdout").write_text(result.stdout)

        folder = built_once(tmp_path_factory, f"sharded-{strategy}", build)
        return folder / "out", (folder / "stdout").read_text()

    return run


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sharded_full_finetuning_on_mixed_batches_matches_one_process_and_resumes(strategy, tiny, mixed,
                                                                                 single_process, sharded_run, tmp_path):
    flags = [*common(tiny, mixed), *STRATEGIES[strategy]]
    resumed = tmp_path / "resumed"
    straight, stdout = sharded_run(strategy)
    assert "trainable 297,792 of 331,392 parameters" in stdout  # counted whole, also when partitioned
    # Evaluation before (partitioned weights, no engine yet) and after (gathered per module, ranks in step);
    # rank 1 answers 2 text-only rows, rank 0 3 image rows: rank 1 makes a filler generate call.
    check_eval_file(straight / "eval_before.json", "accuracy", 5)
    # FSDP2 evaluates before training once the Trainer has sharded the model: no rank holds it whole.
    assert re.search(r"Evaluation before training: accuracy [\d.]+ on 5 examples \(weights sharded", stdout)
    after = check_eval_file(straight / "eval_after.json", "accuracy", 5)
    assert [e["question"].startswith("Say the word") for e in after["examples"]] == [False, True, False, True, False]

    # Saved whole, in the checkpoint's layout, loadable as it is; equal to the one-process run's weights.
    reference, saved = weights(single_process / "model.safetensors"), weights(straight / "model.safetensors")
    assert saved.keys() == weights(tiny / "model.safetensors").keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(saved[name], reference[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(saved["lm_head.weight"], weights(tiny / "model.safetensors")["lm_head.weight"])
    loaded = Phi3VForCausalLM.from_pretrained(straight)
    torch.testing.assert_close(loaded.lm_head.weight, saved["lm_head.weight"])
    assert log_losses(straight / "checkpoint-4") == pytest.approx(log_losses(single_process / "checkpoint-4"), rel=1e-4)

    # Stopped after step 2, then run again: the same steps, losses and weights as the uninterrupted run.
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    forked_recipe(MEMES, *flags, "--skip_eval_before", "--output_dir", str(resumed))
    assert log_losses(resumed / "checkpoint-4") == pytest.approx(log_losses(straight / "checkpoint-4"), rel=1e-5)
    again = weights(resumed / "model.safetensors")
    for name in saved:
        torch.testing.assert_close(again[name], saved[name], rtol=1e-5, atol=1e-6)
    assert json.loads((resumed / "eval_after.json").read_text()) == after


def test_zero3_run_stopped_after_its_last_step_finishes_from_the_checkpoint(tiny, mixed, sharded_run, tmp_path):
    """The last checkpoint's weights go into the partitioned model (gathered, loaded, partitioned again)."""
    first, _ = sharded_run("zero3")
    finished = tmp_path / "finished"
    finished.mkdir()
    for name in ("checkpoint-4", "eval_before.json"):  # what the run leaves when stopped after its last step
        copy = shutil.copytree if name.startswith("checkpoint-") else shutil.copy
        copy(first / name, finished / name)
    result = forked_recipe(MEMES, *common(tiny, mixed), *STRATEGIES["zero3"], "--output_dir", str(finished))
    assert "is the last step of training: finishing from it" in result.stdout
    assert json.loads((finished / "eval_after.json").read_text()) == json.loads((first / "eval_after.json").read_text())
    assert weights(finished / "model.safetensors").keys() == weights(first / "model.safetensors").keys()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sharded_frozen_vision_trains_the_language_model_only(strategy, tiny, mixed, tmp_path):
    out = tmp_path / "out"
    result = forked_recipe(MEMES, *common(tiny, mixed), *STRATEGIES[strategy], "--freeze_vision_model",
                             "--max_steps", "2", "--skip_eval_before", "--max_eval_samples", "2", "--output_dir", str(out))
    assert "full fine-tuning (vision frozen), trainable 134,976 of 331,392 parameters" in result.stdout
    before, after = weights(tiny / "model.safetensors"), weights(out / "model.safetensors")
    vision = [name for name in before if name.startswith("model.vision_embed_tokens.")]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    if strategy == "zero3":
        # The feature pre-pass runs before the DeepSpeed engine: it gathers the partitioned tower itself (its
        # convolution got empty weight slices), and trains as the uncached run does.
        cached = tmp_path / "cached"
        result = forked_recipe(MEMES, *common(tiny, mixed), *STRATEGIES[strategy], "--freeze_vision_model",
                                 "--cache_vision_features", "--max_steps", "2", "--skip_eval_before",
                                 "--max_eval_samples", "2", "--output_dir", str(cached))
        assert re.search(r"\(([1-9]\d*) computed now\)", result.stdout)  # rank 0's share of the image rows
        with_cache = weights(cached / "model.safetensors")
        for name in after:
            torch.testing.assert_close(with_cache[name], after[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def phi4mm_zero2_mixed(tiny_phi4mm, mixed, tmp_path_factory) -> Path:
    """The recipe's default (ZeRO-2) on Phi-4-MM under torchrun x2, rank 1's batches all text-only (zero2/), and
    the same training in one process (one/)."""
    def build(folder: Path) -> None:
        flags = [*common(tiny_phi4mm, mixed), "--max_steps", "2", "--skip_eval_before", "--max_eval_samples", "2"]
        result = forked_recipe(MEMES, *flags, "--output_dir", str(folder / "zero2"))
        assert "full fine-tuning" in result.stdout
        run_recipe(MEMES, *flags, "--deepspeed", "none", "--output_dir", str(folder / "one"))

    return built_once(tmp_path_factory, "phi4mm-zero2-mixed", build)


def test_phi4mm_zero2_trains_with_a_text_only_rank_beside_an_image_rank(tiny_phi4mm, phi4mm_zero2_mixed):
    """Rank 1's vision weights get no gradient from its text-only batches: the family runs the image embedding on a
    blank image for them (without it DeepSpeed would wait for them). The saved model has the checkpoint's keys."""
    out = phi4mm_zero2_mixed / "zero2"
    after = check_eval_file(out / "eval_after.json", "accuracy", 2)
    assert [e["question"].startswith("Say the word") for e in after["examples"]] == [False, True]
    base, zero2 = weights(tiny_phi4mm / "model.safetensors"), weights(out / "model.safetensors")
    assert zero2.keys() == base.keys()  # the tied lm_head is not written apart (ZeRO-2 clones each weight)
    projection = "model.embed_tokens_extend.image_embed.img_projection_up.weight"  # no vision LoRA on it
    assert not torch.equal(zero2[projection], base[projection])  # trained from the image rank's batches
    layer = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(zero2[layer], base[layer])


def test_phi4mm_zero2_with_a_text_only_rank_trains_as_one_process(phi4mm_zero2_mixed):
    """ZeRO-2 sums its gradient buckets by the order gradients arrive in: the text-only rank's vision gradients
    must come where an image rank's do (phivision.phi4mm.modes.with_vision_term), or the sums mix weights up."""
    one, zero2 = (weights(phi4mm_zero2_mixed / run / "model.safetensors") for run in ("one", "zero2"))
    assert zero2.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(zero2[name], one[name], rtol=1e-4, atol=1e-5)
