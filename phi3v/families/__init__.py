"""The model families the recipes fine-tune, and what differs between them: one place per family.

Recipes, the collator, the trainer, evaluation, generate, merge_lora and the bench never branch on a model's
name: they ask its family (`family_of(name_or_path)` before loading, `family_of_model(model)` after) for
the model class, the processor, the LoRA targets, what "freeze vision" freezes and what never trains.
The chat layout, the image token and the image inputs' names and batching are the processor's
(`user_turn`, `answer_turn`, `encode_conversation`, `batch_images`), which the family loads.
"""

from __future__ import annotations

import torch

from ..errors import SetupError, first_line
from .base import ModelFamily, Processor
from .phi3v import Phi3VFamily

FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (Phi3VFamily(),)}


def family_for_type(model_type: str | None, what: str) -> ModelFamily:
    """The family of a config's `model_type`; `what` names the checkpoint in the error."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        known = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise SetupError(f"{what}: model_type {model_type!r} is not a model these recipes fine-tune ({known})")
    return family


def family_of(name_or_path: str, flag: str = "--model_name_or_path") -> ModelFamily:
    """The family of a checkpoint (a Hub id or a local folder), from its config.json, before anything loads."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(str(name_or_path))
    except OSError as e:
        raise SetupError(f"{flag} {name_or_path}: cannot load it ({first_line(e)})") from None
    if not config:
        raise SetupError(f"{flag} {name_or_path}: no config.json in it (is it a model folder?)")
    return family_for_type(config.get("model_type"), f"{flag} {name_or_path}")


def family_of_model(model: torch.nn.Module) -> ModelFamily:
    """The family of a loaded model (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_for_type(getattr(base.config, "model_type", None), type(base).__name__)


__all__ = ["FAMILIES", "ModelFamily", "Processor", "family_for_type", "family_of", "family_of_model"]
