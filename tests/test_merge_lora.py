"""phivision.merge_lora: merged logits equal base + adapter, Hub key layout (tiny and full size), shard index, QLoRA."""

import json
from pathlib import Path

import pytest
import torch
from helpers import check_loads_elsewhere
from PIL import Image

from phivision.merge_lora import checkpoint_shapes, main, merge_adapter, merge_lora, state_shapes
from phivision.phi3v.modeling import Phi3VForCausalLM
from phivision.phi3v.processing import Phi3VProcessor
from phivision.training.modes import lora_target_modules, quantization_config

# fp32 merge vs fp32 base + unmerged adapter: the same sums in another order (observed 3e-6 on logits up to 2).
FP32_ATOL = 1e-4
# bf16 merged weights vs fp32 base + adapter: bf16 rounding of every weight (observed 1-2% of the largest logit).
BF16_RTOL_OF_MAX = 0.05


@pytest.fixture(scope="module")
def inputs(tiny):
    processor = Phi3VProcessor.from_pretrained(tiny)
    images = [Image.new("RGB", (500, 300), "red"), Image.new("RGB", (200, 400), (20, 200, 90))]
    return processor("<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n", images, num_crops=1)


def make_adapter(base: Path, out: Path, quantized: bool = False, seed: int = 0) -> Path:
    """A LoRA adapter with the recipe's targets (vision and lm_head included) and non-zero lora_B weights."""
    from peft import LoraConfig, get_peft_model

    kwargs = {"dtype": torch.float32}
    if quantized:
        from peft import prepare_model_for_kbit_training

        kwargs = {"dtype": torch.bfloat16, "quantization_config": quantization_config(torch.bfloat16)}
    model = Phi3VForCausalLM.from_pretrained(base, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = lora_target_modules(model, include_vision=True)
    assert "lm_head" in targets and any("img_projection" in t for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    if quantized:
        assert any(type(m).__name__ == "Linear4bit" for m in peft_model.modules())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                parameter.normal_(std=0.2)
    peft_model.save_pretrained(out)
    return out


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def base_plus_adapter(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def check_shard_index(directory: Path) -> dict:
    """Every key in exactly one shard, every shard exists and is named in the weight map, sizes add up."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert sorted(p.name for p in directory.glob("*.safetensors")) == shards  # no stray model.safetensors
    seen, total = {}, 0
    for shard in shards:
        with safe_open(directory / shard, framework="pt") as f:
            for key in f.keys():
                assert key not in seen, f"{key} in {seen.get(key)} and {shard}"
                seen[key] = shard
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total
    return index


def test_merged_model_equals_base_plus_adapter(tiny, inputs, tmp_path):
    adapter = make_adapter(tiny, tmp_path / "adapter")
    # The processor, as training saves it; num_crops 2 tells it from the base's.
    Phi3VProcessor.from_pretrained(tiny, num_crops=2).save_pretrained(adapter)
    out = merge_lora(str(tiny), str(adapter), str(tmp_path / "merged"), dtype="fp32", max_shard_size="200KB")

    # Same parameter names and shapes as the base, in several shards with a consistent index.
    assert checkpoint_shapes(out) == checkpoint_shapes(tiny)
    assert not any("lora" in k or "base_layer" in k for k in checkpoint_shapes(out))
    check_shard_index(out)

    merged = Phi3VForCausalLM.from_pretrained(out).eval()
    base = Phi3VForCausalLM.from_pretrained(tiny).eval()
    reference = logits(base_plus_adapter(tiny, adapter), inputs)
    merged_logits, base_logits = logits(merged, inputs), logits(base, inputs)
    assert (reference - base_logits).abs().max() > 0.1  # the adapter matters...
    torch.testing.assert_close(merged_logits, reference, atol=FP32_ATOL, rtol=0)  # ...and is merged exactly
    # lm_head and the vision projection were targets: merged too.
    for name in ("lm_head.weight", "model.vision_embed_tokens.img_projection.0.weight"):
        assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    assert torch.equal(merged.state_dict()["model.norm.weight"], base.state_dict()["model.norm.weight"])

    # Hub config and generation config; the processor comes from the adapter folder.
    config, base_config = (json.loads((d / "config.json").read_text()) for d in (out, tiny))
    assert config["architectures"] == ["Phi3VForCausalLM"] and config["model_type"] == "phi3_v"
    assert set(base_config) <= set(config) and "vision_config" not in config
    assert config["rope_scaling"]["type"] == "su" and config["torch_dtype"] == "float32"
    processor = Phi3VProcessor.from_pretrained(out)
    assert processor.image_processor.num_crops == 2
    # What vLLM and transformers 4.x read; and our Auto classes still load our classes, to the same logits.
    check_loads_elsewhere(out)
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert isinstance(auto, Phi3VForCausalLM) and torch.equal(logits(auto, inputs), merged_logits)
    stop_ids = processor.tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stop_ids


def test_qlora_adapter_merges_into_half_precision_base(tiny, inputs, tmp_path, capsys):
    adapter = make_adapter(tiny, tmp_path / "qlora", quantized=True, seed=1)  # no processor in it: the base's is used
    reference = logits(base_plus_adapter(tiny, adapter), inputs)

    assert main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(tmp_path / "bf16")]) == 0
    assert "python -m phivision.generate --model" in capsys.readouterr().out
    merged_bf16 = Phi3VForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged_bf16.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert checkpoint_shapes(tmp_path / "bf16") == checkpoint_shapes(tiny)
    assert not (tmp_path / "bf16" / "model.safetensors.index.json").exists()  # fits in one file
    error = (logits(merged_bf16.eval(), inputs) - reference).abs().max()
    assert error <= BF16_RTOL_OF_MAX * reference.abs().max(), (error, reference.abs().max())

    # --base defaults to the adapter's base_model_name_or_path; fp32 is exact.
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    merged = Phi3VForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    torch.testing.assert_close(logits(merged, inputs), reference, atol=FP32_ATOL, rtol=0)
    assert Phi3VProcessor.from_pretrained(tmp_path / "fp32").image_processor.num_crops == 1  # the base's


def test_full_size_merge_keeps_the_hub_keys(reference_dir):
    """Phi-3.5-vision at full size on the meta device, LoRA with the recipe's targets, merged: the Hub's keys."""
    from peft import LoraConfig, get_peft_model

    from phivision.phi3v.configuration import Phi3VConfig

    config_file = reference_dir / "phi35v_hub_files" / "config.json"
    keys_file = reference_dir / "phi35v_checkpoint_keys.tsv"
    if not (config_file.is_file() and keys_file.is_file()):
        pytest.skip("full-size config or key list not found")
    hub = {name: tuple(int(n) for n in shape.split("x"))
           for name, shape in (line.split("\t") for line in keys_file.read_text().splitlines() if line)}
    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig.from_pretrained(config_file.parent))
        expected = state_shapes(model)
        assert expected == hub
        targets = lora_target_modules(model, include_vision=True)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
    assert len(targets) == 32 * 4 + 1 + 23 * 6 + 2  # LM layers, lm_head, CLIP layers up to the feature layer, MLP
    assert any("base_layer" in k for k in peft_model.state_dict())
    merged = merge_adapter(peft_model, expected, safe_merge=False)  # raises if any name or shape differs
    assert state_shapes(merged) == hub


def test_errors_name_the_bad_input(tiny, tmp_path, capsys):
    assert main(["--base", str(tiny), "--adapter", str(tiny), "--out", str(tmp_path / "x")]) == 1
    assert f"--adapter {tiny}: no adapter_config.json" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(tiny)]) == 1
    assert f"--out {tiny}: must be a new or empty folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")  # any file blocks it: nothing of the user's is replaced
    assert main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(busy)]) == 1
    assert (busy / "config.json").read_text() == "{}" and "must be a new or empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--adapter", str(adapter), "--out", str(tmp_path / "y")])  # no base anywhere
    assert "names no base model; pass --base" in capsys.readouterr().err


def test_written_folder_loads_elsewhere_without_code(tiny, tmp_path):
    """No *.py is copied, even from a base with the Hub's remote code: the auto_map entries name the Hub repo."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    (base / "modeling_phi3_v.py").write_text("# remote code\n")
    adapter = make_adapter(base, tmp_path / "adapter")
    repo = "microsoft/Phi-3-vision-128k-instruct"
    out = merge_lora(str(base), str(adapter), str(tmp_path / "merged"), dtype="fp32", remote_code_repo=repo)
    assert not list(out.glob("*.py"))
    check_loads_elsewhere(out, repo=repo)


def other_base(path: Path, **overrides) -> Path:
    """A random tiny base like `tiny` but for `overrides` (another shape), or another seed."""
    from phivision.tiny import build_tiny_processor, tiny_config

    processor = build_tiny_processor(num_crops=1)
    torch.manual_seed(7)
    Phi3VForCausalLM(tiny_config(vocab_size=len(processor.tokenizer), **overrides)).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_an_adapter_is_checked_against_its_base(tiny, tmp_path, capsys):
    adapter = make_adapter(tiny, tmp_path / "adapter")
    wider = other_base(tmp_path / "wider", intermediate_size=256)
    assert main(["--base", str(wider), "--adapter", str(adapter), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert f"error: --adapter {adapter} does not fit --base {wider}" in err[-1] and "Traceback" not in "".join(err)
    assert "in the adapter" in err[-1] and not (tmp_path / "a").exists()
    same_shape = other_base(tmp_path / "sibling")
    assert main(["--base", str(same_shape), "--adapter", str(adapter), "--out", str(tmp_path / "b")]) == 0
    assert f"warning: the adapter {adapter} was trained on {tiny}, and is applied to {same_shape}" in (
        capsys.readouterr().err)


def test_mistakes_are_found_before_the_merge_and_a_failed_write_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    from helpers import read_only_folder

    adapter = make_adapter(tiny, tmp_path / "adapter")
    out = tmp_path / "merged"
    loads = []
    load = Phi3VForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(Phi3VForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or load(cls, *a, **k)))
    assert main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(out), "--max_shard_size", "5XB"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --max_shard_size 5XB: expected a positive size in TB, GB, MB or KB, e.g. 5GB or 500MB")
    assert main(["--base", str(tmp_path / "nowhere" / "base"), "--adapter", str(adapter), "--out", str(out)]) == 1
    assert f"error: --base {tmp_path / 'nowhere' / 'base'}: no such folder" in capsys.readouterr().err
    with read_only_folder() as parent:
        code = main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(parent / "merged")])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --out {parent / 'merged'}: cannot write there (no permission to write in {parent})")
    assert loads == [] and not out.exists()

    # A write that fails midway leaves --out as it was (here: absent), so that the same command can run again.
    monkeypatch.setattr(Phi3VProcessor, "save_pretrained", lambda self, *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    assert main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 1
    assert "disk full" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()
    assert main(["--base", str(tiny), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    assert (out / "model.safetensors").is_file()
