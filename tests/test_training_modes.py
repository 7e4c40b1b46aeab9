"""phi3v.training.modes: what each training mode trains."""

import pytest
import torch

from phi3v.training.modes import lora_target_modules


@pytest.fixture(scope="module")
def tiny_model():
    from phi3v.modeling import Phi3VForCausalLM
    from phi3v.tiny import tiny_config

    torch.manual_seed(0)
    return Phi3VForCausalLM(tiny_config()).eval()


def test_lora_target_modules(tiny_model):
    with_vision = lora_target_modules(tiny_model, include_vision=True)
    without = lora_target_modules(tiny_model, include_vision=False)
    assert len(set(with_vision)) == len(with_vision)
    modules = dict(tiny_model.named_modules())
    assert all(isinstance(modules[name], torch.nn.Linear) for name in with_vision)

    language = ["lm_head"] + [
        f"model.layers.{i}.{leaf}"
        for i in range(tiny_model.config.num_hidden_layers)
        for leaf in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    assert sorted(without) == sorted(language)
    assert not any("vision_embed_tokens" in name for name in without)

    vision = [name for name in with_vision if "vision_embed_tokens" in name]
    assert sorted(with_vision) == sorted(language + vision)
    embed = "model.vision_embed_tokens"
    assert f"{embed}.img_projection.0" in vision and f"{embed}.img_projection.2" in vision
    clip = [name for name in vision if ".encoder.layers." in name]
    assert len(vision) == 2 + len(clip)
    tower = tiny_model.model.vision_embed_tokens.img_processor
    assert len(tower.vision_model.encoder.layers) == 3 and tower.num_layers_used == 2
    expected_clip = {
        f"encoder.layers.{i}.{leaf}"
        for i in (0, 1)
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2")
    }
    assert {name.split(".vision_model.", 1)[1] for name in clip} == expected_clip
    assert len(clip) == 12
    assert not any(".encoder.layers.2." in name for name in with_vision)
    assert not any("post_layernorm" in name or "patch_embedding" in name for name in with_vision)
