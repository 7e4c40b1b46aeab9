"""phivision.training.checkpointing: --gradient_checkpointing auto checkpoints only the layers memory needs."""

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from phivision import bench
from phivision.tiny import tiny_config
from phivision.training.checkpointing import apply_auto_checkpointing, checkpointable_layers, plan_checkpointing
from phivision.training.sizing import mode_arguments


def tiny_model(mode):
    torch.manual_seed(0)
    model = bench.build_model(tiny_config(vocab_size=32064, pad_token_id=32000), mode, "sdpa", torch.device("cpu"),
                              torch.float32, None)
    return model


def plan(model, mode, budget):
    layout = bench.layout(bench.make_samples("nlvr2", 1)[0])
    return plan_checkpointing(model, *mode_arguments(mode), layout, batch_size=2, gpus=1, strategy="zero2",
                              budget_bytes=budget)


def test_the_plan_checkpoints_per_layer_only_what_the_budget_needs():
    model = tiny_model("full")
    tight = plan(model, "full", budget=1)
    assert [(g.name, g.checkpointed, len(g.layers)) for g in tight.groups] == [("LM", 2, 2), ("CLIP", 2, 2)]
    assert "does not fit" in tight.describe()
    roomy = plan(model, "full", budget=10**12)
    assert [g.checkpointed for g in roomy.groups] == [0, 0] and "does not fit" not in roomy.describe()
    # Room for one layer's activations more: the group that recomputes the most FLOPs per byte keeps one.
    first = max(tight.groups, key=lambda g: g.flops / g.saved_bytes)
    one_more = plan(model, "full", budget=tight.needed_bytes + 2 * first.saved_bytes)
    counts = {g.name: g.checkpointed for g in one_more.groups}
    assert counts[first.name] == len(first.layers) - 1 and sum(counts.values()) == 3
    assert one_more.needed_bytes <= one_more.budget_bytes
    assert f"checkpointing {counts['LM']} of 2 LM layers, {counts['CLIP']} of 2 CLIP layers" in one_more.describe()


def test_a_frozen_tower_is_not_in_the_plan():
    model = tiny_model("frozen")
    assert checkpointable_layers(model)["CLIP"] == []
    assert [g.name for g in plan(model, "frozen", budget=1).groups] == ["LM"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_partial_plan_trains_exactly_as_full_checkpointing_with_less_recomputation(mode, capsys):
    sample = bench.make_samples("nlvr2", 1)[0]
    batch = bench.collate_samples([sample], packing=False)

    def step(model):
        model.zero_grad()
        with FlopCounterMode(display=False) as counter:
            loss = model(**batch).loss
            loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counter.get_total_flops()

    model = tiny_model(mode)
    loss, grads, flops = step(model)
    tight = plan(model, mode, budget=1)
    first = max(tight.groups, key=lambda g: g.flops / g.saved_bytes)
    budget_gb = (tight.needed_bytes + 2 * first.saved_bytes) / 1e9
    applied = apply_auto_checkpointing(model, *mode_arguments(mode), bench.layout(sample), 2, 1, "zero2", budget_gb,
                                       torch.device("cpu"))
    assert [layer.gradient_checkpointing for layer in first.layers] != [True] * len(first.layers)
    assert "Gradient checkpointing auto: checkpointing" in capsys.readouterr().out
    partial_loss, partial_grads, partial_flops = step(model)
    assert partial_flops < flops  # a layer's forward no longer runs twice
    assert torch.equal(partial_loss, loss) and partial_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(partial_grads[name], grad), name
    assert applied.needed_bytes <= applied.budget_bytes


def test_on_cpu_without_a_budget_every_layer_stays_checkpointed(capsys):
    model = tiny_model("full")
    assert apply_auto_checkpointing(model, *mode_arguments("full"), bench.layout(bench.make_samples("nlvr2", 1)[0]),
                                    1, 1, "zero2", None, torch.device("cpu")) is None
    assert all(layer.gradient_checkpointing for group in checkpointable_layers(model).values() for layer in group)
    assert "every layer checkpointed" in capsys.readouterr().out


def test_the_recipe_plans_at_the_start_of_training_and_trains_as_with_checkpointing_everywhere(tiny, shapes, tmp_path,
                                                                                               capsys):
    from test_recipes import run_recipe

    def train(name, *argv):
        run_recipe("finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
                   str(shapes), "--output_dir", str(tmp_path / name), "--batch_size", "2", "--batch_size_per_gpu", "2",
                   "--max_steps", "2", "--max_eval_samples", "2", "--deepspeed", "none", *argv)
        return load_file(tmp_path / name / "model.safetensors")

    everywhere = train("true", "--gradient_checkpointing", "true")
    auto = train("auto", "--memory_budget_gb", "1000")
    assert "checkpointing 0 of 2 LM layers, 0 of 2 CLIP layers" in capsys.readouterr().out
    for name, weight in everywhere.items():
        assert torch.equal(auto[name], weight), name


def test_the_budget_is_the_free_gpu_memory_less_the_communication_buffers(monkeypatch):
    """Not a share of the total: other processes, the CUDA context and DeepSpeed's buckets are not the step's."""
    import json
    from types import SimpleNamespace

    from phivision.training import checkpointing
    from test_recipes import ROOT

    gb = 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * gb, 80 * gb))  # 50 GB held elsewhere
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * gb)  # this process's weights so far
    cuda = torch.device("cuda", 0)
    assert checkpointing.memory_budget(None, cuda) == 42 * gb - 4 * gb  # less 5% of 80 GB for fragmentation
    assert checkpointing.memory_budget(None, cuda, reserve_bytes=5 * gb) == 33 * gb
    assert checkpointing.memory_budget(7.5, cuda, reserve_bytes=5 * gb) == 7.5 * gb  # --memory_budget_gb as given

    # ZeRO-2 (the shipped config): two 5e8-element fp32 reduce buckets (overlap_comm); the all-gather has none.
    zero2 = json.loads((ROOT / "ds_config_zero2.json").read_text())
    assert checkpointing.deepspeed_buffer_bytes(zero2) == 2 * 5 * 10**8 * 4
    assert checkpointing.deepspeed_buffer_bytes({**zero2, "data_types": {}}) == 2 * 5 * 10**8 * 2
    # ZeRO-3 as the Trainer finalises "auto" (hidden_size 3072): a 16-bit reduce bucket and the prefetch bucket.
    zero3 = json.loads((ROOT / "ds_config_zero3.json").read_text())
    zero3["zero_optimization"].update(reduce_bucket_size=3072**2, stage3_prefetch_bucket_size=int(0.9 * 3072**2))
    assert checkpointing.deepspeed_buffer_bytes(zero3) == 2 * (3072**2 + int(0.9 * 3072**2))
    assert checkpointing.deepspeed_buffer_bytes(None) == 0

    def training(world_size, config=None):
        return SimpleNamespace(world_size=world_size,
                               hf_deepspeed_config=SimpleNamespace(config=config) if config else None)

    assert checkpointing.communication_reserve(training(1)) == 0
    assert checkpointing.communication_reserve(training(4, zero2)) == 4 * 10**9 + checkpointing.NCCL_RESERVE_BYTES
