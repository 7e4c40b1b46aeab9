"""phivision.training.vision_cache: --cache_vision_features trains exactly as the uncached run, without the tower."""

import json

import pytest
import torch
from safetensors.torch import load_file

from phivision.training import trainer as trainer_module
from test_recipes import run_recipe

COMPUTE_LOSS = trainer_module.RecipeTrainer.compute_loss


def train(tiny, shapes, out, monkeypatch, *flags):
    """A frozen-vision run of 2 epochs of 4 steps; returns (loss of each step, whether each batch had pixels)."""
    losses, pixels = [], []

    def recording(self, model, inputs, *args, **kwargs):
        pixels.append("pixel_values" in inputs)
        loss = COMPUTE_LOSS(self, model, inputs, *args, **kwargs)
        losses.append(loss.detach().clone())
        return loss

    monkeypatch.setattr(trainer_module.RecipeTrainer, "compute_loss", recording)
    run_recipe("finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
               str(shapes), "--output_dir", str(out), "--deepspeed", "none", "--freeze_vision_model", "--bf16",
               "--batch_size", "2", "--batch_size_per_gpu", "2", "--num_train_epochs", "2", "--max_train_samples", "8",
               "--max_eval_samples", "1", "--max_new_tokens", "2", "--save_strategy", "no",
               *flags)
    return losses, pixels


def test_cached_features_train_bit_identically_to_the_uncached_run(tiny, shapes, tmp_path, monkeypatch):
    losses, pixels = train(tiny, shapes, tmp_path / "plain", monkeypatch)
    cached_losses, cached_pixels = train(tiny, shapes, tmp_path / "cached", monkeypatch, "--cache_vision_features")
    assert len(losses) == len(cached_losses) == 8
    assert all(pixels) and not any(cached_pixels)  # one in four shapes rows is text-only: every batch has images
    assert all(torch.equal(a, b) for a, b in zip(losses, cached_losses))
    plain, cached = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "cached" / "model.safetensors")
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
    assert not (tmp_path / "cached" / "vision_features").exists()  # removed once training is over
    before = [json.loads((tmp_path / run / "eval_before.json").read_text()) for run in ("plain", "cached")]
    assert before[0] == before[1]  # the evaluation before training runs as in any run, cache or not


@pytest.fixture
def rows():
    from helpers import random_image, sample

    return [sample("What is it?", "A square.", random_image(40, 30, seed=1)), sample("Hello?", "Hi."),
            sample("Which is larger?", "The left one.", random_image(50, 20, seed=2), random_image(20, 50, seed=3))]


def test_the_pre_pass_keeps_what_it_computed_until_the_model_changes(rows, tiny_processor, tmp_path):
    from helpers import identity

    from phivision.collator import DataCollator
    from phivision.errors import SetupError
    from phivision.phi3v.modeling import Phi3VForCausalLM
    from phivision.tiny import tiny_config
    from phivision.training.vision_cache import VisionFeatureCache

    torch.manual_seed(0)
    model = Phi3VForCausalLM(tiny_config())
    encode = DataCollator(tiny_processor, identity, num_crops=1).encode
    cache = VisionFeatureCache(tmp_path / "features")
    assert cache.fill(model, rows, [0, 1, 2], encode, num_crops=1, disable_tqdm=True) == 2  # row 1 has no image
    sample = encode(rows[2])
    cached = cache.attach(2, sample)
    assert cached["pixel_values"] is None and cached["input_ids"] == sample["input_ids"]
    with torch.no_grad():
        assert torch.equal(cached["image_features"], model.model.vision_embed_tokens(sample["pixel_values"],
                                                                                     sample["image_sizes"]))
    # Text only: empty features, so that the model runs no tower (no blank pass under ZeRO-3/FSDP either).
    assert cache.attach(1, encode(rows[1]))["image_features"].numel() == 0
    # A resumed run computes nothing again (reads no row either); other weights or num_crops start over.
    assert cache.fill(model, rows, [0, 1, 2], encode, num_crops=1, disable_tqdm=True) == 0
    assert cache.fill(model, rows, [0, 1, 2], None, num_crops=1, disable_tqdm=True) == 0
    assert cache.fill(model, rows, [0, 1, 2], encode, num_crops=2, disable_tqdm=True) == 2
    with torch.no_grad():
        model.model.vision_embed_tokens.img_projection[0].bias.add_(1)
    assert cache.fill(model, rows, [0, 1, 2], encode, num_crops=2, disable_tqdm=True) == 2
    # Other pixels than the cached features were computed from (augmentation, changed data) stop the run.
    sample["pixel_values"] = sample["pixel_values"].flip(-1)
    with pytest.raises(SetupError, match="the pixels of training row 2 differ"):
        cache.attach(2, sample)
