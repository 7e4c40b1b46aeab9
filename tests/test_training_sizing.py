"""phivision.training.sizing: full-size step costs on the meta device match what the real model executes, and the bytes per
GPU follow each mode's layout."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from phivision import bench
from phivision.phi3v.family import reference_clip
from phivision.training.sizing import NF4_BYTES, meta_model, mode_arguments, state_bytes, step_cost
from phivision.tiny import tiny_config


def config():
    return tiny_config(vocab_size=32064, pad_token_id=32000)


def model(mode, checkpointing=True):
    return meta_model(config(), *mode_arguments(mode), checkpointing=checkpointing)


@pytest.mark.parametrize("mode", ["full", "frozen", "lora"])
def test_meta_step_flops_equal_a_real_training_step(mode):
    """The meta measurement counts what the model's own forward and backward execute on real tensors."""
    sample = bench.make_samples("nlvr2", 1)[0]
    torch.manual_seed(0)
    real = bench.build_model(config(), mode, "sdpa", torch.device("cpu"), torch.float32, None)
    batch = bench.collate_samples([sample], packing=False)
    with FlopCounterMode(display=False) as counter:
        real(**batch).loss.backward()
    measured = step_cost(model(mode), *bench.layout(sample))
    assert measured.flops == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_meta_step_costs_follow_checkpointing_crops_and_logits():
    sample = bench.make_samples("docvqa", 1)[0]
    layout = bench.layout(sample)
    full, frozen = model("full"), model("frozen")
    ours = step_cost(full, *layout)
    reference = step_cost(full, *layout, crop_slots=17, full_logits=True)
    padded_crops = step_cost(full, *layout, crop_slots=17)
    no_checkpointing = step_cost(model("full", checkpointing=False), *layout)
    assert ours.flops < padded_crops.flops < reference.flops  # padded crop slots, then full-vocabulary logits
    assert no_checkpointing.flops < ours.flops  # no recomputation
    assert no_checkpointing.activation_bytes > 2 * ours.activation_bytes > 0
    assert step_cost(frozen, *layout).flops < ours.flops  # no backward through the frozen tower


def test_the_reference_runs_the_whole_clip_tower_ours_stops_at_the_feature_layer():
    """The reference takes hidden_states[-2] of a full CLIPVisionModel pass: its last layer runs, unused (forward
    only: no gradient reaches it), and the features are the same."""
    layout = bench.layout(bench.make_samples("nlvr2", 1)[0])
    full = model("full")
    padded_crops = step_cost(full, *layout, crop_slots=5)
    whole_tower = step_cost(full, *layout, crop_slots=5, whole_tower=True)
    tower = full.model.vision_embed_tokens.img_processor
    last_layer = tower.vision_model.encoder.layers[-1]
    hidden = torch.zeros(2 * 5, 1 + (336 // 14) ** 2, tower.vision_model.config.hidden_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        last_layer(hidden, None)
    assert whole_tower.flops - padded_crops.flops == counter.get_total_flops() > 0

    torch.manual_seed(0)
    real = bench.build_model(config(), "full", "sdpa", torch.device("cpu"), torch.float32, None).model
    pixels = torch.randn(3, 3, 336, 336)
    tower, ran = real.vision_embed_tokens.img_processor, []
    tower.vision_model.encoder.layers[-1].register_forward_hook(lambda *args: ran.append(True))
    assert torch.equal(reference_clip(tower, pixels), tower(pixels)) and ran == [True]


def test_bytes_per_gpu_of_each_mode():
    full, lora = model("full"), model("lora")
    full_args, lora_args, qlora_args = mode_arguments("full")[1], mode_arguments("lora")[1], mode_arguments("qlora")[1]
    params = sum(p.numel() for p in full.parameters())
    trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    one, eight = state_bytes(full, full_args, 1), state_bytes(full, full_args, 8)
    assert one.weights == eight.weights == 2 * params  # ZeRO-2: the 16-bit weights on every GPU
    assert (one.gradients, one.optimizer) == (4 * trainable, 12 * trainable)  # fp32 grads, master, 2 moments
    assert eight.optimizer == 12 * trainable // 8
    assert state_bytes(full, full_args, 8, "ddp").total == 16 * trainable + 4 * (params - trainable)
    assert state_bytes(lora, lora_args, 1) == state_bytes(lora, lora_args, 8)  # DDP: nothing is split
    linear = sum(m.weight.numel() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    frozen = sum(p.numel() for p in lora.parameters() if not p.requires_grad)
    assert frozen == params  # LoRA freezes every base weight
    adapters = 4 * sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert state_bytes(lora, lora_args, 1).weights == 2 * params + adapters
    assert state_bytes(lora, qlora_args, 1).weights == round(NF4_BYTES * linear) + 2 * (params - linear) + adapters


def test_bench_on_the_meta_device_reports_flops_and_bytes_per_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "META_SAMPLES", 2)  # the mean of two samples' steps: each mode's rows at half the cost
    measured = []
    monkeypatch.setattr(bench, "step_cost", lambda *args, **kwargs: measured.append(args) or step_cost(*args, **kwargs))
    out = tmp_path / "rows.json"
    bench.main(["--size", "tiny", "--device", "meta", "--distribution", "nlvr2", "--modes", "full", "frozen", "lora",
                "qlora", "--json", str(out)])
    import json

    rows = {row["config"]: row for row in json.loads(out.read_text())}
    assert rows["full"]["reference TFLOP/sample"] > rows["full"]["TFLOP/sample"] > 0
    assert rows["full"]["saved by real crops"] > 0 and rows["full"]["saved by answer-only logits"] > 0
    assert rows["full"]["saved by stopping CLIP at its feature layer"] > 0
    per_gpu = rows["full"]["GB per GPU"]
    assert per_gpu["1"] > per_gpu["2"] > per_gpu["8"]
    assert rows["qlora"]["TFLOP/sample"] == rows["lora"]["TFLOP/sample"]
    for mode in ("full", "frozen", "lora"):  # no recomputation: fewer FLOPs, more activations
        assert rows[mode]["x vs reference, no checkpointing"] > rows[mode]["x vs reference"] > 1
        assert rows[mode]["activations GB, no checkpointing"] > rows[mode]["activations GB"]
    frozen = rows["frozen"]  # cached features: no CLIP at all
    assert frozen["TFLOP/sample, cached features"] < frozen["TFLOP/sample, no checkpointing"]
    assert "TFLOP/sample, cached features" not in rows["full"]
    by_strategy = rows["full"]["GB per GPU by strategy"]
    assert by_strategy["zero2"] == rows["full"]["GB per GPU"]
    assert by_strategy["zero3"]["8"] < by_strategy["zero2"]["8"] and by_strategy["ddp"]["1"] == by_strategy["ddp"]["8"]
    assert "GB per GPU by strategy" not in rows["lora"]
    assert rows["qlora"]["GB per GPU"]["1"] < rows["lora"]["GB per GPU"]["1"] == rows["lora"]["GB per GPU"]["8"]
    assert "per GPU" in capsys.readouterr().out
    # Each sample's step once per variant (ours checkpointed and not, padded crops, whole tower, reference, and for
    # frozen cached features; QLoRA's are LoRA's): the longest sample's activations come from ours, not a rerun.
    assert len(measured) == 2 * (5 + 6 + 5)
