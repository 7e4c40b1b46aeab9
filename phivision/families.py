"""The model families the recipes fine-tune, and what differs between them: one place per family.

Recipes, the collator, the trainer, evaluation, generate, merge_lora and the bench never branch on a model's
name: they ask its family (`family_of(name_or_path)` before loading, `family_of_model(model)` after) for
the model class, the processor, the LoRA targets, what "freeze vision" freezes and what never trains.
The chat layout, the image token and the image inputs' names and batching are the processor's
(`user_turn`, `answer_turn`, `encode_conversation`, `batch_images`), which the family loads.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import SetupError, first_line

# The Hub's config.json of each family's full-size checkpoint, shipped for meta-device sizing (no download).
CONFIGS = Path(__file__).resolve().parent / "configs"
# Layout of one encoded sample for meta-device sizing (phivision.training.sizing.step_cost): its input ids with
# every image token as a negative id, its labels, and the (rows, columns) crop grid of each of its images.
Layout = tuple[list[int], list[int], list[tuple[int, int]]]


class Processor(Protocol):
    """What the library calls on a family's processor (Phi3VProcessor is the reference; each method's
    docstring there says what it does)."""

    tokenizer: Any
    image_processor: Any  # .preprocess(images, num_crops=, return_tensors=) -> model inputs + "num_img_tokens";
    #                       .num_image_tokens(width, height, num_crops) -> int

    @property
    def stop_token_ids(self) -> list[int]: ...

    def user_turn(self, user: str) -> str: ...

    def answer_turn(self, assistant: str) -> str: ...

    def encode_conversation(self, turns: Sequence[dict[str, Any]], num_image_tokens: Sequence[int]
                            ) -> tuple[list[int], list[int]]: ...

    def num_conversation_tokens(self, turns: Sequence[dict[str, Any]], image_sizes: Sequence[tuple[int, int]],
                                num_crops: int | None = None) -> int: ...

    def batch_images(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]: ...

    def __call__(self, text: str | list[str], images: Any = None, num_crops: int | None = None,
                 padding_side: str = "left", return_tensors: str | None = "pt") -> Any: ...

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> list[str]: ...


class ModelFamily:
    """One model family the recipes fine-tune. Subclasses fill in every method."""

    name: str  # in messages: "Phi-3.5-vision"
    model_type: str  # config.json's model_type
    # What only some families offer (flags that ask for it elsewhere get a one-line error).
    supports_vision_cache: bool = False
    supports_step_sizing: bool = False  # meta-device sizing of a step (auto checkpointing, the "which mode fits" table)
    supports_remote_code: bool = False  # saved files can name the original remote code (--remote_code_repo)
    ships_vision_lora: bool = False  # its checkpoints carry a vision LoRA to continue (--continue_vision_lora)
    supports_sharded_weights: bool = True  # trains with weights partitioned over the GPUs (ZeRO-3, FSDP2)
    # The processor pads every image's crops to the crop limit (Phi-3-V: num_crops + 1 slots), not only to the
    # most crops of an image in the batch (Phi-4-MM): what the reference step's padded crops are in sizing.
    pads_crops_to_limit: bool = False
    full_config: str  # the file in phivision/configs/ holding the full-size checkpoint's config.json

    def model_class(self) -> type:
        """The transformers model class, loaded with `from_pretrained`."""
        raise NotImplementedError

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Processor:
        """The checkpoint's processor (see Phi3VProcessor for the interface every family's processor has)."""
        raise NotImplementedError

    def as_it_runs_on_images(self, model: torch.nn.Module, name_or_path: str) -> torch.nn.Module:
        """The model loaded from `name_or_path` as it runs on images (Phi-4-MM: its shipped vision LoRA merged in),
        before training, generation or a merge. Phi-3-V: as loaded."""
        return model

    def continue_vision_lora(self, model: torch.nn.Module, name_or_path: str, train_vision: bool) -> torch.nn.Module:
        """The model with its checkpoint's shipped vision LoRA as the adapter to train (and with `train_vision`, a
        trainable image embedding saved with it). Only for families that `ships_vision_lora`."""
        raise NotImplementedError

    def prepare_for_training(self, model: torch.nn.Module) -> None:
        """Freezes the parameters that never run in vision-language training (they would never get a gradient)."""
        raise NotImplementedError

    def vision_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What --freeze_vision_model freezes: the image encoder and its projector."""
        raise NotImplementedError

    def lora_target_modules(self, model: torch.nn.Module, include_vision: bool) -> list[str]:
        """Full names of the linear layers LoRA adapts (the vision side only with `include_vision`)."""
        raise NotImplementedError

    def lora_targets(self, model: torch.nn.Module, include_vision: bool) -> list[str] | str:
        """`target_modules` for peft's LoraConfig: those layers."""
        return self.lora_target_modules(model, include_vision)

    def training_loss(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor | None:
        """The loss of a training batch when the family computes it itself (None: the model's own `loss`)."""
        return None

    def answer_logps(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs of a batch's answer tokens, for preference tuning: see `answer_token_logps`."""
        return answer_token_logps(model, inputs)

    def pair_answer_logps(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`answer_logps` of a batch of preference pairs: its first half of sequences are the chosen answers, its
        second half the rejected ones, and the second half's images are the first half's again
        (phivision.training.preference.PreferenceCollator). Here the images run as given: twice per pair."""
        return self.answer_logps(model, inputs)

    # ----- meta-device sizing (phivision.training.sizing; only families with supports_step_sizing) -----

    def batch_images(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The image inputs of encoded samples as one batch: the processor's `batch_images` (no files needed)."""
        raise NotImplementedError

    def full_size_config(self) -> Any:
        """The full-size checkpoint's config (the shipped copy of its config.json), for sizing without a download."""
        config_class = self.model_class().config_class
        return config_class(**json.loads((CONFIGS / self.full_config).read_text()))

    def default_image_processor(self) -> Any:
        """The family's image processor with its defaults: crop grids and image-token counts of image sizes."""
        raise NotImplementedError

    def sample_layout(self, config: Any, input_ids: Sequence[int], labels: Sequence[int],
                      image_sizes: torch.Tensor | None) -> Layout:
        """The `Layout` of an encoded sample (`image_sizes`: [images, 2] (H, W) of each padded image)."""
        raise NotImplementedError

    def checkpointable_layers(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
        """By name ("LM", the tower's), the layers gradient checkpointing can recompute that run and train."""
        raise NotImplementedError

    def meta_image_tokens(self, model: torch.nn.Module, crops_hw: Sequence[tuple[int, int]], image_tokens: int,
                          crop_slots: int | None = None, whole_tower: bool = False) -> torch.Tensor:
        """[image_tokens, hidden] image tokens of a sample's images as the model computes them, on the meta device.

        `crops_hw`: each image's crop grid. `crop_slots`: crops per image padding included, as a batch pads
        them (None: real crops only); `whole_tower`: every layer of the tower runs, as the reference recipe
        runs it (families whose model always does so ignore it)."""
        raise NotImplementedError

    def state_dict_to_save(self, state_dict: Any, base: str) -> Any:
        """What a full model's save writes: `state_dict` completed with what training left out (Phi-4-MM: the
        speech encoder, from the base checkpoint `base`)."""
        return state_dict

    def finish_saved_model(self, folder: str | Path) -> None:
        """Rewrites what `save_pretrained` just wrote to `folder` (a full model) where readers other than this
        package's transformers (vLLM, transformers 4.x) would read it otherwise. Default: nothing to rewrite."""


def answer_token_logps(model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-prob the model gives each answer token of a batch (labels != -100), from the logits at the answer
    positions only (`logits_to_keep`: never the whole [rows, sequence, vocabulary] logits).

    Returns (log-probs [rows, P], answer mask [rows, P], positions [P]): the P positions are the union over the rows
    of the positions whose next label is an answer token; a row's other positions have mask False and log-prob 0.
    Position p predicts the token at p + 1. The model runs without a KV cache (packed samples stay apart).
    """
    targets = inputs["labels"][:, 1:]
    positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
    rest = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**rest, use_cache=False, logits_to_keep=positions).logits
    kept = targets[:, positions].to(logits.device)
    mask = kept != -100
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, kept.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask, positions.to(logits.device)


# Checkpoints of a family in its remote-code layout, which transformers' own classes do not read.
REMOTE_CODE_LAYOUTS = {"phi4mm": ": this is Phi-4-multimodal's remote-code layout; use a snapshot in the transformers-native "
                                 "layout (model_type phi4_multimodal: the Hub repo's current revision)"}


@functools.cache
def known_families() -> dict[str, ModelFamily]:
    """Each family by its config.json model_type (imported here: each family's module builds on this one)."""
    from .phi3v.family import Phi3VFamily
    from .phi4mm.family import Phi4MMFamily

    return {family.model_type: family for family in (Phi3VFamily(), Phi4MMFamily())}


def family_for_type(model_type: str | None, what: str) -> ModelFamily:
    """The family of a config's `model_type`; `what` names the checkpoint in the error."""
    families = known_families()
    family = families.get(model_type or "")
    if family is None:
        known = ", ".join(f"{f.name} ({t})" for t, f in families.items())
        hint = REMOTE_CODE_LAYOUTS.get(model_type or "", "")
        raise SetupError(f"{what}: model_type {model_type!r} is not a model these recipes fine-tune ({known}){hint}")
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


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside `model`'s wrappers: DDP, DeepSpeed's engine, torch.compile, peft."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of_model(model: torch.nn.Module) -> ModelFamily:
    """The family of a loaded model (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_for_type(getattr(base.config, "model_type", None), type(base).__name__)
