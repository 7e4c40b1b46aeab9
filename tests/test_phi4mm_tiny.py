"""The tiny Phi-4-multimodal checkpoint (`python -m phivision.tiny DIR --family phi4mm`): the Hub's native layout and
structure, loadable by transformers' own classes, with working vision/speech LoRA adapters."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from phivision import tiny
from phivision.phi4mm import tiny as tiny4
from phivision.phi4mm.processing import Phi4MMProcessor


@pytest.fixture(scope="module")
def tiny_dir(tiny_phi4mm):
    return tiny_phi4mm


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def test_files_and_size(tiny_dir):
    names = {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
        "vision-lora/adapter_config.json", "vision-lora/adapter_model.safetensors",
        "speech-lora/adapter_config.json", "speech-lora/adapter_model.safetensors",
    }
    assert sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file()) < 10e6


def test_config_has_the_hub_structure(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    vocab = json.loads((tiny_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in vocab}
    assert config["model_type"] == "phi4_multimodal" and config["architectures"] == ["Phi4MultimodalForCausalLM"]
    assert config["eos_token_id"] == [ids["<|endoftext|>"], ids["<|end|>"]]
    assert config["bos_token_id"] == config["pad_token_id"] == ids["<|endoftext|>"]
    assert config["tie_word_embeddings"] is True and config["vocab_size"] % 64 == 0
    assert config["vocab_size"] > max(ids.values())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention, as the real one
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.75
    vision = config["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["crop_size"]) == (448, 14, 448)
    assert vision["image_token_id"] == ids["<|endoftext10|>"]
    assert config["audio_config"]["audio_token_id"] == ids["<|endoftext11|>"]
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|end|>"], ids["<|endoftext|>"]]


def test_tokenizer_is_laid_out_like_phi4_mini(tiny_dir):
    processor = Phi4MMProcessor.from_pretrained(tiny_dir)
    tokenizer = processor.tokenizer
    first = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # The real ids minus 199999: <|endoftext10|> 200010, <|assistant|> 200019, <|end|> 200020, <|user|> 200021.
    offsets = [tokenizer.convert_tokens_to_ids(t) - first for t in tiny4.ADDED_TOKENS]
    assert offsets == list(range(len(tiny4.ADDED_TOKENS)))
    assert {t: tokenizer.convert_tokens_to_ids(t) - first for t in ("<|endoftext10|>", "<|assistant|>", "<|end|>",
                                                                   "<|user|>", "<|system|>")} == {
        "<|endoftext10|>": 11, "<|assistant|>": 20, "<|end|>": 21, "<|user|>": 22, "<|system|>": 23}
    assert first == tiny4.TINY_BASE_VOCAB_SIZE
    text = "Héllo wörld 🙂 12345\n\tThe answer is yes."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and max(ids) < first  # byte-level: any text, no BOS, no unknowns
    assert tokenizer.tokenize(" 12345") == ["Ġ", "1", "2", "3", "4", "5"]  # o200k: numbers apart from spaces


def _inputs(processor, colour):
    from PIL import Image

    image = Image.new("RGB", (640, 480), colour)
    return processor("<|user|><|image_1|>What is it?<|end|><|assistant|>", [image], num_crops=4)


def test_transformers_model_runs_on_our_inputs(tiny_dir, model):
    processor = Phi4MMProcessor.from_pretrained(tiny_dir)
    with torch.no_grad():
        red = model(**_inputs(processor, (255, 0, 0))).logits
        blue = model(**_inputs(processor, (0, 0, 255))).logits
    assert torch.isfinite(red).all()
    assert (red - blue).abs().max() > 1e-4  # the image reaches the logits through the vision tower


def test_lora_adapters_as_the_hub_ships_them(tiny_dir, model):
    for folder, settings in tiny4.ADAPTERS.items():
        config = json.loads((tiny_dir / folder / "adapter_config.json").read_text())
        assert {k: config[k] for k in settings} == settings
        assert config["target_modules"] == tiny4.LORA_TARGETS and config["peft_type"] == "LORA"
        weights = load_file(tiny_dir / folder / "adapter_model.safetensors")
        targets = {name for name, _ in model.named_modules() if re.fullmatch(tiny4.LORA_TARGETS, name)}
        assert len(targets) == 4 * model.config.num_hidden_layers
        assert set(weights) == {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
        assert all(w.shape[0 if k.endswith("lora_A.weight") else 1] == settings["r"] for k, w in weights.items())
        assert all(w.abs().sum() > 0 for w in weights.values())


def test_vision_lora_loads_in_transformers_and_changes_logits(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    inputs = _inputs(Phi4MMProcessor.from_pretrained(tiny_dir), (0, 128, 0))
    with torch.no_grad():
        base = model(**inputs).logits
        model.load_adapter(str(tiny_dir), adapter_name="vision", adapter_kwargs={"subfolder": "vision-lora"})
        model.set_adapter("vision")
        adapted = model(**inputs).logits
    assert (adapted - base).abs().max() > 1e-3


def test_default_family_is_still_phi3v(tmp_path):
    tiny.main([str(tmp_path)])
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "phi3_v"
