"""phivision.gpu_check --family phi4mm: Phi-4-multimodal's plan (its checks, their order, the ones the recipes
refuse), its full-size checkpoint's sizes counted on the meta device, the peak memory set beside the run's own
meta-device sizing, and one of its checks run for real on CPU."""

import re
import shlex
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Phi4MultimodalForCausalLM

from phivision import gpu_check, tiny
from phivision.phi4mm import tiny as phi4mm_tiny
from phivision.training.checkpointing import CheckpointingPlan, LayerGroup

ORDER = ["full-zero2", "continue-vision-lora", "lora-packed", "lora-resumed", "qlora", "bench"]
BASE, ADAPTERS = 4_743_988_032, 830_472_192  # microsoft/Phi-4-multimodal-instruct: the model; vision + speech LoRA


def test_dry_run_prints_phi4mms_plan_and_says_which_checks_the_recipes_refuse(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--family", "phi4mm", "--device", "cuda", "--size", "full",
                           "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = re.findall(r"^([\w-]+): flags parse; disk ([\d.]+) GB", out, flags=re.M)
    assert [name for name, _ in names] == ORDER
    disk = dict(names)
    # A full run and Microsoft's recipe both save the whole bf16 model, the speech encoder put back.
    assert float(disk["full-zero2"]) == float(disk["continue-vision-lora"]) == pytest.approx(2 * BASE / 1e9, abs=0.1)
    refused = re.findall(r"^not in the plan, refused by the recipes: (.*)$", out, flags=re.M)
    assert refused == ["frozen-cached (Phi-4-multimodal has no --cache_vision_features); "
                       "zero3, fsdp2 (Phi-4-multimodal cannot train with partitioned weights)"]
    checkpoint = float(re.search(r"^checkpoint and data: ([\d.]+) GB$", out, flags=re.M).group(1))
    assert checkpoint == pytest.approx(2 * (BASE + ADAPTERS) / 1e9 + 0.1, abs=0.1)  # 11.2 GB
    peak = int(re.search(r"^peak disk: (\d+) GB$", out, flags=re.M).group(1))
    assert peak == round(checkpoint + float(disk["full-zero2"]))  # one full model beside the checkpoint, of 64 GB
    commands = dict(zip(ORDER, (shlex.split(line) for line in out.splitlines() if line.startswith("  "))))
    assert all(c[c.index("--model_name_or_path") + 1] == str(tmp_path / "phi4mm-random")
               for name, c in commands.items() if name != "bench")
    assert "--continue_vision_lora" in commands["continue-vision-lora"]
    assert commands["bench"][commands["bench"].index("--family") + 1] == "phi4mm"
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_phi3vs_plan_refuses_nothing(tmp_path):
    assert gpu_check.refused_checks("phi3v") == {}
    names = [c.name for c in gpu_check.plan(gpu_check.Setup("cuda", "tiny", tmp_path, 2))]
    assert "continue-vision-lora" not in names and {"frozen-cached", "zero3", "fsdp2"} <= set(names)


def test_flash_attention_where_installed_as_in_phi3vs_plan(tmp_path):
    setup = gpu_check.Setup("cuda", "tiny", tmp_path, 1, flash=True, family="phi4mm")
    checks = {check.name: check.command for check in gpu_check.plan(setup)}
    assert all("--use_flash_attention" in command for name, command in checks.items() if name != "bench")
    assert checks["bench"][checks["bench"].index("--attn") + 1] == "flash_attention_2"


def test_the_full_size_checkpoint_is_the_hub_configs_with_both_loras_at_their_real_ranks():
    """What `phivision.tiny --family phi4mm --full_size` builds, counted on the meta device: 5.57B parameters."""
    tokenizer = phi4mm_tiny.build_tiny_tokenizer()
    config = phi4mm_tiny.full_size_config(tokenizer)
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == BASE
    shapes = phi4mm_tiny.adapter_shapes(model)
    assert {folder: sum(a * b for a, b in weights.values()) for folder, weights in shapes.items()} == {
        "vision-lora": 369_098_752, "speech-lora": 461_373_440}
    assert sum(a * b for weights in shapes.values() for a, b in weights.values()) == ADAPTERS
    assert shapes["vision-lora"]["model.layers.31.mlp.gate_up_proj.lora_A.weight"] == (256, 3072)
    assert shapes["speech-lora"]["model.layers.0.self_attn.qkv_proj.lora_B.weight"] == (5120, 320)
    # The tiny tokenizer drives it: its placeholders and stop tokens, within the Hub's 200,064-row embedding.
    image, end = tokenizer.convert_tokens_to_ids(phi4mm_tiny.IMAGE_TOKEN), tokenizer.convert_tokens_to_ids("<|end|>")
    assert config.vision_config.image_token_id == image and config.eos_token_id == [tokenizer.eos_token_id, end]
    assert config.vocab_size == 200_064 > len(tokenizer)
    sizes = gpu_check.model_sizes("full", "phi4mm")  # what the disk estimates use
    assert (sizes.parameters, sizes.adapter_parameters) == (BASE, ADAPTERS)


def test_the_adapters_are_written_in_the_models_dtype(tmp_path):
    """At full size the model is bf16 (on the GPU): so are its adapters, as on the Hub (1.7 GB, not 3.3 in fp32)."""
    tokenizer = phi4mm_tiny.build_tiny_tokenizer()
    model = Phi4MultimodalForCausalLM(phi4mm_tiny.tiny_config(tokenizer)).to(torch.bfloat16)
    phi4mm_tiny.write_adapters(model, tmp_path, seed=0)
    for folder, shapes in phi4mm_tiny.adapter_shapes(model).items():
        weights = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert {key: tuple(w.shape) for key, w in weights.items()} == shapes
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}


def test_the_full_size_build_writes_bf16_weights_and_adapters(tmp_path, monkeypatch):
    """build_tiny_checkpoint(full_size=True) with the full-size config swapped for a one-layer stand-in (no
    GPU here: built on CPU): the weights and both adapters are saved in bf16, as on the Hub."""
    import json

    monkeypatch.setattr(phi4mm_tiny, "full_size_config",
                        lambda tokenizer: phi4mm_tiny.tiny_config(tokenizer, num_hidden_layers=1))
    out = phi4mm_tiny.build_tiny_checkpoint(tmp_path / "full", dynamic_hd=4, full_size=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1  # the full-size config's
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    for folder in phi4mm_tiny.ADAPTERS:
        weights = load_file(out / folder / "adapter_model.safetensors")
        assert len(weights) == 2 * 4 and {w.dtype for w in weights.values()} == {torch.bfloat16}  # 4 targets, A and B


def test_prepare_builds_the_full_size_phi4mm_checkpoint_through_phivision_tiny(tmp_path, monkeypatch):
    """prepare()'s command reaches the Phi-4-MM builder with full_size (run here with the build recorded only)."""
    setup = gpu_check.Setup("cuda", "full", tmp_path, 1, family="phi4mm")
    setup.data.mkdir(parents=True)  # only the checkpoint is left to write
    commands = []

    def record(command, log, timeout, env=None):
        commands.append(command)
        Path(command[-1]).mkdir()  # what the subprocess writes
        return gpu_check.Run(0, "", 0.0)

    built = []
    monkeypatch.setattr(gpu_check, "run_command", record)
    monkeypatch.setattr(gpu_check, "free_disk", lambda path: 64e9)
    monkeypatch.setattr(phi4mm_tiny, "build_tiny_checkpoint", lambda *args: built.append(args) or tmp_path / "x")
    monkeypatch.setattr(tiny, "tree_follows_umask", lambda path: None)
    (tmp_path / "x").mkdir()
    assert gpu_check.prepare(setup, tmp_path / "prepare.log", time.monotonic() + 60).status == "pass"
    [command] = commands
    assert command[1:3] == ["-m", "phivision.tiny"]
    tiny.main(command[3:])
    assert built == [(str(setup.checkpoint) + ".partial", 4, 0, True)]  # dynamic_hd 4, seed 0, full size
    assert setup.checkpoint.is_dir()


def test_peak_memory_is_set_beside_the_runs_own_meta_device_sizing(tmp_path):
    """--gradient_checkpointing auto prints what the sizing expects the step to hold; results.json keeps it and
    the allocated peak over it."""
    plan = CheckpointingPlan([LayerGroup("LM", [torch.nn.Linear(1, 1)] * 32, 1, 1, checkpointed=0)],
                             needed_bytes=int(61.2e9), budget_bytes=int(130e9))
    output = "\n".join(["[rank0]: " + plan.describe(), "{'loss': 2.5}",
                        'peak GPU memory: {"rank": 0, "allocated_gb": 67.32, "reserved_gb": 70.0}'])
    check = gpu_check.Check("full-zero2", [], "full-zero2")
    result = gpu_check.measure(check, gpu_check.Run(0, output, 30.0))
    assert (result.sizing_gb, result.peak_gpu_allocated_gb, result.peak_over_sizing) == (61.2, 67.32, 1.1)
    on_cpu = gpu_check.measure(check, gpu_check.Run(0, "Gradient checkpointing auto: every layer checkpointed "
                                                       "(on CPU without --memory_budget_gb).", 1.0))
    assert on_cpu.sizing_gb is None and on_cpu.peak_over_sizing is None


def test_microsofts_recipe_check_runs_on_cpu_on_the_tiny_phi4mm(tmp_path, tiny_phi4mm, shapes):
    """The one check only Phi-4-MM's plan has, as the plan runs it (the checkpoint and data prepared already: the
    session's tiny ones; the whole plan runs on the GPU)."""
    setup = gpu_check.Setup("cpu", "tiny", tmp_path / "work", 0, family="phi4mm",
                            env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    setup.workdir.mkdir()
    setup.checkpoint.symlink_to(tiny_phi4mm)
    setup.data.symlink_to(shapes)
    checks = [check for check in gpu_check.plan(setup) if check.name == "continue-vision-lora"]
    out = tmp_path / "out"
    results = gpu_check.run_plan(setup, checks, out, time.monotonic() + 300, header={"family": "phi4mm"})
    result = results["continue-vision-lora"]
    assert result.status == "pass", result.error
    assert result.loss_first > 0 and result.loss_last > 0 and result.samples_per_second > 0
    log = (out / "continue-vision-lora.log").read_text()
    assert "--continue_vision_lora" in log and "Saved the fine-tuned model" in log  # the merged full model
    assert not (setup.workdir / "runs").exists()
