"""Meta-device sizing of Phi-4-multimodal (phivision.training.sizing through its family): the shipped full-size
config, step costs that equal what the real model executes, and --gradient_checkpointing auto's plan."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from phivision import bench  # noqa: F401  (registers the CPU attention kernel's FLOP formula)
from phivision.families import known_families
from phivision.phi4mm.modes import answer_loss, vision_module
from phivision.training.checkpointing import checkpointable_layers, plan_checkpointing
from phivision.training.modes import setup_mode
from phivision.training.sizing import meta_model, mode_arguments, parameter_counts, sample_layout, step_cost
from test_phi4mm_modes import image_batch, tiny_config

FAMILY = known_families()["phi4_multimodal"]


def test_the_full_size_config_has_the_hub_checkpoints_sizes():
    """Parameter counts of microsoft/Phi-4-multimodal-instruct's native checkpoint (its safetensors headers)."""
    config = FAMILY.full_size_config()
    assert (config.num_attention_heads, config.tie_word_embeddings, config.audio_config.bias_max_distance) == (24, True, 500)
    with torch.device("meta"):
        model = FAMILY.model_class()(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == 4_743_988_032
    assert count(model.model.embed_tokens_extend.audio_embed) == 466_416_256
    assert count(model.model.embed_tokens_extend.image_embed) == 441_550_016


def test_meta_models_train_without_the_speech_encoder():
    full = meta_model(FAMILY.full_size_config(), *mode_arguments("full"))
    total, trainable, _ = parameter_counts(full)
    assert total == 4_743_988_032 - 466_416_256 and full.model.embed_tokens_extend.audio_embed is None
    # Frozen: SigLIP's last layer, post-layernorm and pooling head (their output reaches nothing).
    tower = vision_module(full).img_processor
    unused = sum(p.numel() for m in (tower.encoder.layers[-1], tower.post_layernorm, tower.head) for p in m.parameters())
    assert trainable == total - unused


def real_model(mode: str):
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = "sdpa"
    model = setup_mode(FAMILY.model_class()(config), *mode_arguments(mode))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, config


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_meta_step_flops_equal_a_real_training_step(mode):
    """The meta measurement counts what transformers' own forward (answer-only logits) and backward execute."""
    model, config = real_model(mode)
    batch = image_batch()
    with FlopCounterMode(display=False) as counter:
        answer_loss(model, batch).backward()
    layout = sample_layout(config, batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["image_sizes"])
    assert sum(1 for i in layout[0] if i < 0) == int((batch["input_ids"] == config.vision_config.image_token_id).sum())
    measured = step_cost(meta_model(config, *mode_arguments(mode)), *layout)
    assert measured.flops == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_padded_crops_and_full_logits_cost_more_and_checkpointing_saves_activations():
    config = tiny_config()
    batch = image_batch()
    layout = sample_layout(config, batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["image_sizes"])
    model = meta_model(config, *mode_arguments("full"))
    ours = step_cost(model, *layout)
    padded = step_cost(model, *layout, crop_slots=5)  # 2 real crops, padded to 5 as a batch pads them
    everything = step_cost(model, *layout, crop_slots=5, full_logits=True)
    assert ours.flops < padded.flops < everything.flops
    unchecked = step_cost(meta_model(config, *mode_arguments("full"), checkpointing=False), *layout)
    assert unchecked.flops < ours.flops and unchecked.activation_bytes > ours.activation_bytes


def test_checkpointable_layers_are_the_lm_and_the_siglip_layers_that_train():
    full, _ = real_model("full")
    layers = checkpointable_layers(full)
    assert len(layers["LM"]) == 2 and len(layers["SigLIP"]) == 2  # 3 SigLIP layers, the last unused
    frozen, _ = real_model("frozen")
    assert checkpointable_layers(frozen)["SigLIP"] == []


def test_auto_checkpointing_plans_for_phi4mm():
    """A budget that holds every activation checkpoints nothing; a tiny one checkpoints every layer."""
    assert FAMILY.supports_step_sizing
    model, config = real_model("full")
    batch = image_batch()
    layout = sample_layout(config, batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["image_sizes"])
    roomy = plan_checkpointing(model, *mode_arguments("full"), layout, batch_size=1, gpus=1, strategy="zero2",
                               budget_bytes=10**12)
    assert [g.checkpointed for g in roomy.groups] == [0, 0] and [g.name for g in roomy.groups] == ["LM", "SigLIP"]
    tight = plan_checkpointing(model, *mode_arguments("full"), layout, batch_size=1, gpus=1, strategy="zero2",
                               budget_bytes=1)
    assert [g.checkpointed for g in tight.groups] == [2, 2]


def test_bench_meta_rows_for_phi4mm(tmp_path, capsys, monkeypatch):
    """`python -m phivision.bench --family phi4mm --device meta`: rows per mode, bytes per GPU without the speech
    encoder, and the share of padding crops the tower runs in batches (none at batch 1 with one image each)."""
    import json

    # The mean of three samples' steps, not four: the third is the first whose two images differ in crops (1x2 and
    # 2x2), so the reference's padded crop slots still cost more than ours.
    monkeypatch.setattr(bench, "META_SAMPLES", 3)
    out = tmp_path / "rows.json"
    bench.main(["--family", "phi4mm", "--size", "tiny", "--device", "meta", "--distribution", "nlvr2",
                "--modes", "full", "frozen", "lora", "--json", str(out)])
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    padding = rows["crop padding"]
    assert padding["batch 4, random"] > padding["batch 4, grouped"] and padding["batch 1, random"] > 0  # 2 images
    assert rows["full"]["reference TFLOP/sample"] > rows["full"]["TFLOP/sample"] > 0
    assert rows["full"]["saved by answer-only logits"] > 0 and rows["full"]["saved by real crops"] > 0
    assert rows["full"]["saved by stopping CLIP at its feature layer"] == 0  # the model runs its whole tower
    assert "TFLOP/sample, cached features" not in rows["frozen"]  # no feature cache for Phi-4-MM
    assert rows["full"]["GB per GPU"]["1"] > rows["full"]["GB per GPU"]["8"]
    assert rows["lora"]["GB per GPU"]["1"] == rows["lora"]["GB per GPU"]["8"]
    assert "padding crops" in capsys.readouterr().out


def test_bench_refuses_phi4mm_where_it_has_no_rows_yet():
    with pytest.raises(SystemExit, match="--family phi4mm"):
        bench.main(["--family", "phi4mm", "--size", "small", "--device", "meta"])


def test_the_recipes_longest_layout_reads_phi4mm_samples():
    """--gradient_checkpointing auto sizes the longest encoded sample: its image placeholder tokens and the crop
    grids of its images (image_sizes in pixels of whole 448-pixel crops)."""
    from phivision.training.checkpointing import longest_layout

    config = tiny_config()
    image = config.vision_config.image_token_id

    class Samples(list):
        lengths = [3, 6]

    samples = Samples([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                       {"input_ids": [1, image, image, 4, 5, 6], "labels": [-100] * 4 + [5, 6],
                        "image_sizes": torch.tensor([[896, 448]])}])
    assert longest_layout(samples, config) == ([1, -1, -1, 4, 5, 6], [-100] * 4 + [5, 6], [(2, 1)])


def test_bench_cpu_rows_for_phi4mm(tmp_path, capsys):
    """The timed rows on a tiny Phi-4-MM (real 200,064-token vocabulary): the baseline reads every position's
    logits, ours the answer's only, and a padded batch runs the zero crops it pads its images with."""
    import json

    out = tmp_path / "rows.json"
    bench.main(["--family", "phi4mm", "--size", "tiny", "--device", "cpu", "--distribution", "memes", "--num_crops", "2",
                "--modes", "lora", "--steps", "1", "--batch_size", "2", "--num_samples", "2", "--json", str(out)])
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    baseline, ours = rows["lora baseline (reference)"], rows["lora b1"]
    assert baseline["logits MB"] > 100 * ours["logits MB"] > 0
    assert baseline["exec/useful"] > 1.05 and ours["exec/useful"] == pytest.approx(1.0, abs=1e-3)
    assert rows["lora b2 packed"]["padding"] == 0 and "lora b1 cached features" not in rows
    assert "padding crops the vision tower runs at batch 2" in capsys.readouterr().out
