"""Phi-3(.5)-vision: CLIP ViT-L/14-336 + Phi-3-mini, our native port (phivision.phi3v.modeling)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..families import Layout, ModelFamily, answer_token_logps, bare_model

LANGUAGE_LORA_TARGETS = ["qkv_proj", "o_proj", "down_proj", "gate_up_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class Phi3VFamily(ModelFamily):
    name = "Phi-3.5-vision"
    model_type = "phi3_v"
    supports_vision_cache = True
    supports_step_sizing = True
    supports_remote_code = True
    pads_crops_to_limit = True
    full_config = "phi-3.5-vision-instruct.json"

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
        return bare_model(model).model.vision_embed_tokens

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

    def pair_answer_logps(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each pair's images through the vision tower once, not twice: the features of the batch's first half of
        images (the chosen sequences'), repeated, are the whole batch's. That is about a tenth of an image pair's
        work at full size (CLIP ViT-L on every crop), and about 40% on the tiny test model."""
        pixel_values, image_sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
        if pixel_values is None:
            return answer_token_logps(model, inputs)
        half = len(pixel_values) // 2
        features = self.vision_module(model)(pixel_values[:half], image_sizes[:half])
        rest = {key: value for key, value in inputs.items() if key not in ("pixel_values", "image_sizes")}
        return answer_token_logps(model, {**rest, "image_features": torch.cat([features, features])})

    def batch_images(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from .processing import Phi3VProcessor

        return Phi3VProcessor.batch_images(samples)

    def default_image_processor(self) -> Any:
        from .image_processing import Phi3VImageProcessor

        return Phi3VImageProcessor()

    def sample_layout(self, config: Any, input_ids: Sequence[int], labels: Sequence[int],
                      image_sizes: torch.Tensor | None) -> Layout:
        """Phi-3-V's image tokens are negative ids already (-k for image k)."""
        from .image_processing import CROP_SIZE

        sizes = [] if image_sizes is None else image_sizes.tolist()
        return list(input_ids), list(labels), [(h // CROP_SIZE, w // CROP_SIZE) for h, w in sizes]

    def checkpointable_layers(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        """The LM's decoder layers and CLIP's layers up to the feature layer that train (a frozen tower has none)."""
        base = bare_model(model)
        tower = self.vision_module(base).img_processor
        vision = [layer for layer in tower.vision_model.encoder.layers[: tower.num_layers_used]
                  if any(p.requires_grad for p in layer.parameters())]
        return {"LM": list(base.model.layers), "CLIP": vision}

    def meta_image_tokens(self, model: torch.nn.Module, crops_hw: Sequence[tuple[int, int]], image_tokens: int,
                          crop_slots: int | None = None, whole_tower: bool = False) -> torch.Tensor:
        """CLIP on the global crop and the sub-crops of each image (`crop_slots` per image with padding; the
        padding slots are dropped after CLIP, as the reference does), then the HD merge and projection."""
        embedding = self.vision_module(model)
        real = sum(1 + h * w for h, w in crops_hw)
        crops = real if crop_slots is None else crop_slots * len(crops_hw)
        pixels = torch.zeros(crops, 3, embedding.crop_size, embedding.crop_size, dtype=torch.bfloat16, device="meta")
        tower = embedding.img_processor
        features = reference_clip(tower, pixels) if whole_tower else tower(pixels)
        return embedding.image_tokens(features[:real], crops_hw)


def reference_clip(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP as the reference recipe runs it: the whole CLIPVisionModel (every layer, and the post layer-norm on
    the CLS token) with all hidden states kept, then hidden state `feature_layer`. Ours stops at that layer:
    the reference's last layer is computed and never used (1 of CLIP ViT-L's 24)."""
    return tower.vision_model(pixel_values, output_hidden_states=True).hidden_states[tower.feature_layer]
