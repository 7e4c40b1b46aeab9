"""The model set up for each training mode: full fine-tuning, frozen vision, LoRA, QLoRA.

`load_for_training` loads a checkpoint for the mode the flags choose; `setup_mode` applies a mode to
a model already built (the bench builds random ones), so both train exactly the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BitsAndBytesConfig
from transformers.integrations import is_deepspeed_zero3_enabled

from ..attention import training_attention
from ..data.hub import missing_local_folder
from ..distributed import print_once
from ..errors import SetupError, first_line
from ..families import family_of, family_of_model
from ..generation import use_chat_stop_tokens
from .arguments import FlagError, LoraArguments, ModelArguments, RecipeArguments
from .sharding import keep_used_key_conversions, parameter_count, start_deepspeed_comm


def mode_name(model_args: ModelArguments, lora: LoraArguments) -> str:
    mode = ("QLoRA" if lora.use_qlora else "LoRA" if lora.use_lora else
            "the shipped vision LoRA" if lora.continue_vision_lora else "full fine-tuning")
    return mode + (" (vision frozen)" if model_args.freeze_vision_model else "")


def lora_target_modules(model: torch.nn.Module, include_vision: bool) -> list[str]:
    """Full names of the layers LoRA adapts in `model` (its family's targets, see phivision.families)."""
    return family_of_model(model).lora_target_modules(model, include_vision)


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit base: NF4 with double quantisation, computing in `compute_dtype`."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def setup_mode(model: torch.nn.Module, model_args: ModelArguments, lora: LoraArguments) -> torch.nn.Module:
    """Freezes what the mode does not train and adds the LoRA adapters; returns the model to train.

    The seed must be set before: the adapters' initial weights are random.
    """
    family = family_of_model(model)
    family.prepare_for_training(model)
    if model_args.freeze_vision_model:
        family.vision_module(model).requires_grad_(False)
    if not lora.use_lora:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.use_qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            # In eval mode on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place for an
            # inference-only kernel that has no backward pass: training after the evaluation before it
            # would fail (or pass no gradient through the base). Keep the trainable layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    config = LoraConfig(
        r=lora.lora_rank,
        lora_alpha=round(lora.lora_rank * lora.lora_alpha_ratio),
        lora_dropout=lora.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=family.lora_targets(model, include_vision=not model_args.freeze_vision_model),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def check_family_flags(args: RecipeArguments) -> None:
    """A one-line FlagError for a flag that the checkpoint's family cannot honour (before the model loads)."""
    model_args, lora, training = args.model, args.lora, args.training
    family = family_of(model_args.model_name_or_path)
    if not family.supports_sharded_weights and (training.fsdp or is_deepspeed_zero3_enabled()):
        flag = "--fsdp" if training.fsdp else f"--deepspeed {training.deepspeed}"
        raise FlagError(f"{flag}: {family.name} cannot train with partitioned weights (ZeRO-3, FSDP2) yet; use ZeRO-2 "
                        "(--deepspeed ds_config_zero2.json, the default) or LoRA")
    if lora.continue_vision_lora and not family.ships_vision_lora:
        raise FlagError(f"--continue_vision_lora: {family.name} ships no vision LoRA to continue (Phi-4-multimodal does)")
    if model_args.cache_vision_features and not family.supports_vision_cache:
        raise FlagError(f"--cache_vision_features: not available for {family.name} yet")
    if model_args.remote_code_repo and not family.supports_remote_code:
        raise FlagError(f"--remote_code_repo: {family.name} loads in transformers itself, with no remote code to name")


def load_processor(model_name_or_path: str):
    """The checkpoint's processor (its family's): also the cheap check that --model_name_or_path is there and is
    a model these recipes fine-tune, before the model loads."""
    if missing_local_folder(model_name_or_path):
        raise SetupError(f"--model_name_or_path {model_name_or_path}: no such folder")
    family = family_of(model_name_or_path)
    try:
        return family.load_processor(model_name_or_path)
    except OSError as e:
        raise SetupError(f"--model_name_or_path {model_name_or_path}: cannot load it ({first_line(e)})") from None


def load_for_training(args: RecipeArguments, processor) -> torch.nn.Module:
    """The model set up for the chosen mode."""
    training, model_args, lora = args.training, args.model, args.lora
    on_gpu = torch.cuda.is_available()
    half = torch.bfloat16 if training.bf16 else (torch.float16 if on_gpu else torch.float32)
    kwargs: dict[str, Any] = {
        "attn_implementation": training_attention(model_args.use_flash_attention, args.data.packing),
        # LoRA's frozen base lives in half precision. So do the weights DeepSpeed trains: it keeps its own
        # fp32 master copy, so an fp32 model per process (16.6 GB of host memory each at full size) would
        # only be cast down. Plain AMP (--deepspeed none) needs the fp32 weights it updates.
        "dtype": half if lora.use_lora or training.deepspeed else torch.float32,
    }
    if lora.use_qlora:
        kwargs["quantization_config"] = quantization_config(half)
    if on_gpu and lora.use_lora:
        # Straight onto this process's GPU as the Trainer counts them (never the raw LOCAL_RANK: with one GPU
        # visible per task it is cuda:0), not into every rank's host memory first.
        kwargs["device_map"] = {"": training.device}
    if is_deepspeed_zero3_enabled():
        start_deepspeed_comm()  # before zero.Init partitions the weights as they load
    family = family_of(model_args.model_name_or_path)
    model = family.model_class().from_pretrained(model_args.model_name_or_path, **kwargs)
    if is_deepspeed_zero3_enabled():
        keep_used_key_conversions(model)
    if lora.continue_vision_lora:
        model = family.continue_vision_lora(model, model_args.model_name_or_path,
                                            train_vision=not model_args.freeze_vision_model)
    else:
        model = family.as_it_runs_on_images(model, model_args.model_name_or_path)
    use_chat_stop_tokens(model, processor)
    torch.manual_seed(training.seed)  # LoRA's initial weights follow --seed
    model = setup_mode(model, model_args, lora)
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    print_once(f"Model {model_args.model_name_or_path}: {mode_name(model_args, lora)}, "
               f"trainable {trainable:,} of {total:,} parameters")
    return model
