"""Phi-3(.5)-vision: CLIP ViT-L/14-336 + Phi-3-mini, our native port (phivision.phi3v.modeling)."""

from __future__ import annotations

from typing import Any

import torch

from ..families import ModelFamily

LANGUAGE_LORA_TARGETS = ["qkv_proj", "o_proj", "down_proj", "gate_up_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class Phi3VFamily(ModelFamily):
    name = "Phi-3.5-vision"
    model_type = "phi3_v"
    supports_vision_cache = True
    supports_step_sizing = True
    supports_remote_code = True

    def model_class(self) -> type:
        from .modeling import Phi3VForCausalLM

        return Phi3VForCausalLM

    def load_processor(self, name_or_path: str, **kwargs: Any):
        from .processing import Phi3VProcessor

        return Phi3VProcessor.from_pretrained(name_or_path, **kwargs)

    def prepare_for_training(self, model: torch.nn.Module) -> None:
        """CLIP's layers past the feature layer (and its post-layernorm) never run."""
        model.model.vision_embed_tokens.img_processor.freeze_unused()

    def vision_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.vision_embed_tokens

    def lora_target_modules(self, model: torch.nn.Module, include_vision: bool) -> list[str]:
        """The reference recipe's LoRA targets present in `model`.

        Vision targets stop at the CLIP feature layer: the later layers never run, and adapters on
        them would wait forever for a gradient under DDP.
        """
        tower = model.model.vision_embed_tokens.img_processor
        used_vision_layers = {f"encoder.layers.{i}." for i in range(tower.num_layers_used)}
        targets = []
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name == "lm_head" or (name.startswith("model.layers.") and leaf in LANGUAGE_LORA_TARGETS):
                targets.append(name)
            elif include_vision and name.startswith("model.vision_embed_tokens."):
                if name.endswith(("img_projection.0", "img_projection.2")):
                    targets.append(name)
                elif leaf in VISION_LORA_TARGETS and any(layer in name for layer in used_vision_layers):
                    targets.append(name)
        return targets
