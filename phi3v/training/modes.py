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
from ..errors import SetupError
from ..generation import use_chat_stop_tokens
from ..modeling import Phi3VForCausalLM
from ..processing import Phi3VProcessor
from .arguments import LoraArguments, ModelArguments, RecipeArguments
from .sharding import keep_used_key_conversions, parameter_count, start_deepspeed_comm

LANGUAGE_LORA_TARGETS = ["qkv_proj", "o_proj", "down_proj", "gate_up_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def mode_name(model_args: ModelArguments, lora: LoraArguments) -> str:
    mode = "QLoRA" if lora.use_qlora else "LoRA" if lora.use_lora else "full fine-tuning"
    return mode + (" (vision frozen)" if model_args.freeze_vision_model else "")


def lora_target_modules(model: Phi3VForCausalLM, include_vision: bool) -> list[str]:
    """Full names of the reference recipe's LoRA targets present in `model`.

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


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit base: NF4 with double quantisation, computing in `compute_dtype`."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def setup_mode(model: Phi3VForCausalLM, model_args: ModelArguments, lora: LoraArguments) -> torch.nn.Module:
    """Freezes what the mode does not train and adds the LoRA adapters; returns the model to train.

    The seed must be set before: the adapters' initial weights are random.
    """
    model.model.vision_embed_tokens.img_processor.freeze_unused()
    if model_args.freeze_vision_model:
        model.model.vision_embed_tokens.requires_grad_(False)
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
        target_modules=lora_target_modules(model, include_vision=not model_args.freeze_vision_model),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_processor(model_name_or_path: str) -> Phi3VProcessor:
    """The checkpoint's processor: also the cheap check that --model_name_or_path is there, before the model loads."""
    if missing_local_folder(model_name_or_path):
        raise SetupError(f"--model_name_or_path {model_name_or_path}: no such folder")
    try:
        return Phi3VProcessor.from_pretrained(model_name_or_path)
    except OSError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SetupError(f"--model_name_or_path {model_name_or_path}: cannot load it ({first_line})") from None


def load_for_training(args: RecipeArguments, processor: Phi3VProcessor) -> torch.nn.Module:
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
    model = Phi3VForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    if is_deepspeed_zero3_enabled():
        keep_used_key_conversions(model)
    use_chat_stop_tokens(model, processor)
    torch.manual_seed(training.seed)  # LoRA's initial weights follow --seed
    model = setup_mode(model, model_args, lora)
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    print_once(f"Model {model_args.model_name_or_path}: {mode_name(model_args, lora)}, "
               f"trainable {trainable:,} of {total:,} parameters")
    return model
