"""Phi-4-multimodal: SigLIP on dynamic 448-pixel crops + Phi-4-mini, as transformers ships it
(`models/phi4_multimodal`, no remote code); our processor (phivision.phi4mm.processing) needs no torchvision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..distributed import parameters_are_sharded
from ..errors import SetupError
from ..families import Layout, ModelFamily, answer_token_logps
from . import config_file, modes
from .processing import Phi4MMProcessor


class Phi4MMFamily(ModelFamily):
    name = "Phi-4-multimodal"
    model_type = "phi4_multimodal"
    ships_vision_lora = True
    # Its shipped vision LoRA is merged into the weights as they load, which partitioned weights don't allow, and
    # a rank with a text-only evaluation batch would generate without the vision collectives an image rank runs.
    supports_sharded_weights = False
    supports_step_sizing = True
    full_config = "phi-4-multimodal-instruct.json"

    def model_class(self) -> type:
        from transformers import Phi4MultimodalForCausalLM

        return Phi4MultimodalForCausalLM

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Phi4MMProcessor:
        return Phi4MMProcessor.from_pretrained(name_or_path, **kwargs)

    def as_it_runs_on_images(self, model: torch.nn.Module, name_or_path: str) -> torch.nn.Module:
        """SigLIP attending both ways (`modes.bidirectional_vision_attention`) and the shipped vision LoRA
        (vision-lora/) merged in: the model as it runs on images. A model we saved has the LoRA merged already (and
        no vision-lora/ folder)."""
        modes.bidirectional_vision_attention(model)
        if has_vision_lora(name_or_path):
            if parameters_are_sharded(model):
                raise SetupError(f"{self.name} under ZeRO-3: its vision LoRA cannot be merged into weights partitioned "
                                 "as they load; use ZeRO-2 (--deepspeed ds_config_zero2.json)")
            return modes.apply_vision_lora(model, name_or_path)
        return model

    def continue_vision_lora(self, model: torch.nn.Module, name_or_path: str, train_vision: bool) -> torch.nn.Module:
        if parameters_are_sharded(model):
            raise SetupError(f"--continue_vision_lora: {self.name}'s vision LoRA cannot go onto weights partitioned as "
                             "they load (ZeRO-3); use ZeRO-2")
        modes.bidirectional_vision_attention(model)
        return modes.continue_vision_lora(model, name_or_path, train_vision=train_vision)

    def prepare_for_training(self, model: torch.nn.Module) -> None:
        modes.prepare_for_training(model)

    def vision_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return modes.vision_module(model)

    def lora_target_modules(self, model: torch.nn.Module, include_vision: bool) -> list[str]:
        return modes.lora_target_modules(model, include_vision)

    def lora_targets(self, model: torch.nn.Module, include_vision: bool) -> str:
        # A pattern, not a list: PEFT would shorten a long list to suffixes that also pick speech layers.
        return modes.lora_target_pattern(model, include_vision)

    def training_loss(self, model: torch.nn.Module, inputs: Mapping[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        return modes.answer_loss(model, modes.with_vision_term(model, inputs), num_items_in_batch)

    def answer_logps(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A text-only batch still runs the trainable image embedding, as in training_loss.
        return answer_token_logps(model, modes.with_vision_term(model, inputs))

    def batch_images(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return Phi4MMProcessor.batch_images(samples)

    def default_image_processor(self) -> Any:
        from .image_processing import Phi4MMImageProcessor

        return Phi4MMImageProcessor()

    def sample_layout(self, config: Any, input_ids: Sequence[int], labels: Sequence[int],
                      image_sizes: torch.Tensor | None) -> Layout:
        """The image placeholder token (`vision_config.image_token_id`) becomes -1."""
        image_token, crop = config.vision_config.image_token_id, config.vision_config.crop_size
        sizes = [] if image_sizes is None else image_sizes.tolist()
        return ([-1 if i == image_token else i for i in input_ids], list(labels),
                [(h // crop, w // crop) for h, w in sizes])

    def checkpointable_layers(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        """The LM's decoder layers and the SigLIP layers the features pass through that train (transformers
        checkpoints both kinds: each is a GradientCheckpointingLayer)."""
        lm = modes.causal_lm(model)
        tower = modes.vision_module(lm).img_processor
        vision = [layer for layer in tower.encoder.layers[: modes.used_vision_layers(lm)]
                  if any(p.requires_grad for p in layer.parameters())]
        return {"LM": list(lm.model.layers), "SigLIP": vision}

    def meta_image_tokens(self, model: torch.nn.Module, crops_hw: Sequence[tuple[int, int]], image_tokens: int,
                          crop_slots: int | None = None, whole_tower: bool = False) -> torch.Tensor:
        return modes.meta_image_tokens(model, crops_hw, image_tokens, crop_slots)

    def state_dict_to_save(self, state_dict: Mapping[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
        return modes.restore_speech_weights(state_dict, base)

    def finish_saved_model(self, folder: str | Path) -> None:
        """config.json in the Hub's form (`config_file.hub_form`), which vLLM reads right on transformers 4 too."""
        config_file.write_hub_form(folder)


def has_vision_lora(name_or_path: str) -> bool:
    """Whether a checkpoint ships its vision LoRA as a PEFT folder (a local folder's, or the Hub's)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return (folder / modes.VISION_LORA_FOLDER / "adapter_config.json").is_file()
    from huggingface_hub import file_exists

    try:
        return file_exists(name_or_path, f"{modes.VISION_LORA_FOLDER}/adapter_config.json")
    except Exception:  # offline: a cached snapshot answers
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name_or_path, f"{modes.VISION_LORA_FOLDER}/adapter_config.json"), str)
