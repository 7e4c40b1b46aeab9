"""--continue_vision_lora: Microsoft's Phi-4-MM vision recipe (the shipped vision LoRA and the image embedding trained,
the language model frozen) through our recipes, saved as a full model with the LoRA merged in."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Phi4MultimodalForCausalLM

from phivision.errors import SetupError
from phivision.phi4mm.config_file import hub_form
from phivision.phi4mm.modes import apply_vision_lora
from phivision.phi4mm.tiny import build_tiny_checkpoint
from test_recipes import run_recipe


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny4") / "tiny", 1, 0)


def test_the_official_recipe_trains_the_vision_lora_and_image_embedding_and_saves_a_full_model(tiny4, shapes, tmp_path):
    out = tmp_path / "out"
    run_recipe("finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny4), "--dataset_name_or_path",
               str(shapes), "--output_dir", str(out), "--continue_vision_lora", "--deepspeed", "none",
               "--batch_size", "4", "--batch_size_per_gpu", "4", "--max_steps", "2", "--learning_rate", "1e-2",
               "--max_eval_samples", "4", "--save_steps", "1")
    assert not (out / "adapter_config.json").exists() and not (out / "vision-lora").exists()
    assert (out / "checkpoint-1" / "adapter_config.json").is_file()  # checkpoints resume as an adapter
    config = json.loads((out / "config.json").read_text())
    assert "rope_parameters" not in config and hub_form(config) == config  # what vLLM on transformers 4 reads
    base, trained = load_file(tiny4 / "model.safetensors"), load_file(out / "model.safetensors")
    speech = [k for k in base if ".audio_embed." in k]
    assert speech and all(torch.equal(base[k], trained[k]) for k in speech)
    # The language model learns through the vision LoRA only: its other weights stay the base's ...
    assert torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    assert torch.equal(base["model.layers.0.input_layernorm.weight"], trained["model.layers.0.input_layernorm.weight"])
    # ... while the LoRA-adapted layers hold base + trained LoRA: not the base, and not base + the shipped LoRA.
    shipped = apply_vision_lora(Phi4MultimodalForCausalLM.from_pretrained(tiny4), tiny4).state_dict()
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(trained[qkv], base[qkv]) and not torch.allclose(trained[qkv], shipped[qkv])
    projection = "model.embed_tokens_extend.image_embed.img_projection_up.weight"
    assert not torch.equal(trained[projection], base[projection])
    reloaded = Phi4MultimodalForCausalLM.from_pretrained(out)  # transformers' own class, every weight there
    assert torch.equal(reloaded.state_dict()[projection], trained[projection])


def test_continue_vision_lora_is_refused_for_a_model_without_one(tiny, shapes, tmp_path):
    with pytest.raises(SetupError, match="^--continue_vision_lora: Phi-3.5-vision ships no vision LoRA"):
        run_recipe("finetune_hf_trainer_hateful_memes.py", "--model_name_or_path", str(tiny), "--dataset_name_or_path",
                   str(shapes), "--output_dir", str(tmp_path / "out"), "--continue_vision_lora", "--deepspeed", "none")
