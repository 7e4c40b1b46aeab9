"""What a training step costs at full size, with no GPU and no weights: FLOPs and activation bytes measured on
the meta device, and the bytes of weights, gradients and optimizer states each GPU holds.

    model_args, lora = mode_arguments("lora")
    model = meta_model(config, model_args, lora)                   # 4.15B parameters, no memory allocated
    cost = step_cost(model, input_ids, labels, crops_hw)           # FLOPs and activations of one sample's step
    state = state_bytes(model, lora, gpus=8)                       # weights, gradients, optimizer states per GPU

Meta tensors carry shapes and dtypes only, so torch's flop counter and a live-tensor count give the figures a
GPU would see (the allocator's rounding and caching aside) in seconds on any machine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from transformers import AttentionInterface

from ..families import Layout, family_for_type, family_of_model
from .arguments import LoraArguments, ModelArguments
from .modes import setup_mode

MODES = ("full", "frozen", "lora", "qlora")
# Bytes per parameter of an NF4 weight with double quantisation: 4 bits, plus an 8-bit scale per 64 weights
# and an fp32 scale per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def flash_kernel_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention through the GPU's flash kernel, which keeps no [L, L] scores for the backward pass (on meta
    tensors SDPA would pick its math path, which does)."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout,
                                                             getattr(module, "is_causal", True), scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("meta_fused_sdpa", flash_kernel_attention)


def mode_arguments(mode: str) -> tuple[ModelArguments, LoraArguments]:
    """The recipes' flags for one of MODES, with their defaults otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    return (ModelArguments(freeze_vision_model=mode == "frozen"),
            LoraArguments(use_lora=mode in ("lora", "qlora"), use_qlora=mode == "qlora"))


def meta_model(config, model_args: ModelArguments, lora: LoraArguments,
               checkpointing: bool = True) -> torch.nn.Module:
    """The model of `config` (any family's) on the meta device in 16-bit, set up as the recipes set it up for
    these flags (QLoRA as LoRA: the 4-bit base computes in 16-bit, see `state_bytes` for its size), attention
    as a GPU's flash kernel runs it."""
    family = family_for_type(config.model_type, "sizing")
    config = copy.deepcopy(config)  # the caller's model keeps its attention
    config._attn_implementation = "meta_fused_sdpa"
    with torch.device("meta"):
        model = family.model_class()(config).to(torch.bfloat16)
        model = setup_mode(model, model_args, LoraArguments(**{**vars(lora), "use_qlora": False}))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass
class StepCost:
    """One sample's training step: forward + backward FLOPs (recomputation included) and the bytes of the
    activations held for the backward pass when the forward ends."""

    flops: int
    activation_bytes: int


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the op outputs created in the block that are still alive (weights and inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[torch.utils.weak.WeakTensorKeyDictionary] = [torch.utils.weak.WeakTensorKeyDictionary()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.outputs[0][tensor] = tensor.untyped_storage().nbytes()
        return out

    def total(self) -> int:
        storages = {}
        for tensor, nbytes in self.outputs[0].items():
            storages[tensor.untyped_storage()._cdata] = nbytes  # views share their storage: count it once
        return sum(storages.values())


def sample_layout(config, input_ids: list[int], labels: list[int], image_sizes: torch.Tensor | None) -> Layout:
    """What `step_cost` measures of a sample encoded for a model of `config`'s family (see `Layout`)."""
    return family_for_type(config.model_type, "sizing").sample_layout(config, input_ids, labels, image_sizes)


def step_cost(model: torch.nn.Module, input_ids: list[int], labels: list[int], crops_hw: list[tuple[int, int]],
              crop_slots: int | None = None, full_logits: bool = False, cached_features: bool = False,
              whole_tower: bool = False) -> StepCost:
    """FLOPs and saved activations of one sample's step on a `meta_model`.

    Our step runs the vision tower on the real crops (the global crop + rows x columns per image) and the LM
    head at the labelled positions only; with `cached_features` the image tokens come from the cache of a
    frozen tower (no tower, no projection). The reference recipe's step (`crop_slots`: crops per image,
    padding slots included; `whole_tower`; `full_logits`) runs every slot through the whole tower and the
    head over every position. The image side is the family's (`ModelFamily.meta_image_tokens`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of_model(base)
    lm = base.model
    length, answer = len(input_ids), sum(label != -100 for label in labels[1:])
    image_tokens = sum(1 for i in input_ids if i < 0)
    live = LiveBytes()
    with FlopCounterMode(display=False) as counter:
        with live:
            if cached_features:
                tokens = torch.zeros(image_tokens, lm.config.hidden_size, dtype=torch.bfloat16, device="meta")
            elif crops_hw:
                tokens = family.meta_image_tokens(base, crops_hw, image_tokens, crop_slots, whole_tower)
            else:
                tokens = torch.zeros(0, lm.config.hidden_size, dtype=torch.bfloat16, device="meta")
            text = lm.embed_tokens(torch.zeros(1, length - image_tokens, dtype=torch.long, device="meta"))
            hidden = torch.cat([tokens[None].to(text.dtype), text], dim=1)
            # The decoder layers as the model runs them (a causal mask over one unpadded sequence is SDPA's flag).
            positions = torch.arange(length, device="meta")[None]
            rope = lm.rotary_emb(hidden, position_ids=positions)
            for layer in lm.layers:
                hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
            hidden = lm.norm(hidden)[0, :-1]
            logits = base.lm_head(hidden if full_logits else hidden[-answer:]).float()
            loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device="meta"))
        activations = live.total()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return StepCost(counter.get_total_flops(), activations)


@dataclass
class StateBytes:
    """Bytes one GPU holds before a step starts."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def parameter_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all parameters, trainable ones, frozen ones in the Linear layers QLoRA quantises to 4 bits)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantised = sum(module.weight.numel() for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
                    and "lm_head" not in name and "lora_" not in name)  # bitsandbytes keeps the head 16-bit
    return total, trainable, quantised


STRATEGIES = ("zero2", "zero3", "fsdp2", "ddp")


def state_bytes(model: torch.nn.Module, lora: LoraArguments, gpus: int, strategy: str = "zero2") -> StateBytes:
    """Weights, gradients and AdamW states per GPU as the recipes train a `meta_model` on `gpus` GPUs.

    Full and frozen-vision training, by `strategy` (what each keeps, and what it splits across the GPUs):
    - "zero2" (ds_config_zero2.json, the default): 16-bit weights on every GPU; fp32 gradients (fp32
      accumulation), fp32 master weights and Adam's two moments of the trainable parameters split.
    - "zero3" (ds_config_zero3.json): the same, the 16-bit weights split too.
    - "fsdp2" (fsdp_config.json): fp32 weights (also the master copy), fp32 gradients, Adam's moments, all split.
    - "ddp" (--deepspeed none, plain AMP): fp32 weights, gradients and Adam's moments on every GPU.
    LoRA and QLoRA always train under DDP: the 16-bit (QLoRA: NF4) base on every GPU, and the fp32 adapters
    with their gradients and moments. Activations, the layers ZeRO-3/FSDP gather whole at a time and the
    communication buffers (ZeRO's buckets: up to 2 x 5e8 16-bit elements) come on top.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if gpus < 1:
        raise ValueError(f"need gpus >= 1, got {gpus}")
    total, trainable, quantised = parameter_counts(model)
    frozen = total - trainable
    if lora.use_lora:
        base = round(NF4_BYTES * quantised) + 2 * (frozen - quantised) if lora.use_qlora else 2 * frozen
        return StateBytes(base + 4 * trainable, 4 * trainable, 8 * trainable)
    if strategy == "ddp":
        return StateBytes(4 * total, 4 * trainable, 8 * trainable)
    weights, master = (4, 0) if strategy == "fsdp2" else (2, 4)
    weight_shards = 1 if strategy == "zero2" else gpus
    return StateBytes(weights * total // weight_shards, 4 * trainable // gpus, (master + 8) * trainable // gpus)
