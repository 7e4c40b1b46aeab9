"""Phi-4-multimodal's training modes, on transformers' own Phi4MultimodalForCausalLM (no port, no patches).

    Phi4MultimodalForCausalLM
    ├── model: Phi4MultimodalModel
    │   ├── embed_tokens, layers, norm        Phi-4-mini: qkv_proj, o_proj, gate_up_proj, down_proj
    │   └── embed_tokens_extend
    │       ├── image_embed                   SigLIP tower (img_processor), img_projection_up/down, extensors
    │       └── audio_embed                   the speech encoder: never runs in vision work
    └── lm_head

The Hub's transformers-native checkpoint ships its LoRA adapters as PEFT folders beside the weights
(`vision-lora/`, `speech-lora/`): the base model holds no LoRA layers, so a new adapter never lands on
top of built-in ones (the remote-code model's trap: ms-swift #5811, roboflow/maestro #181). What the
model does for images is base + vision LoRA, so every mode keeps that LoRA applied:

- continuing the shipped vision LoRA (Microsoft's own vision fine-tuning sample): `continue_vision_lora`;
- every other mode (full fine-tuning, frozen vision, a new LoRA, QLoRA) starts from `apply_vision_lora`,
  which merges it into the base weights.

The order: load; `apply_vision_lora` or `continue_vision_lora`; freeze (--freeze_vision_model freezes
`vision_module(model)`) or train the image embedding; `prepare_for_training`; then a new adapter on
`lora_target_pattern` (after `prepare_model_for_kbit_training` for QLoRA). A training batch goes through
`with_vision_term` (text-only batches still run the image embedding), `answer_loss` computes its loss, and a
saved full model gets `restore_speech_weights`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import Phi4MultimodalForCausalLM

from ..data.hub import looks_like_a_path
from ..errors import SetupError
from ..distributed import parameters_are_sharded

# The language-model layers the shipped vision-lora adapter targets (its adapter_config.json: r 256, alpha 512,
# target_modules r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))").
LANGUAGE_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# SigLIP encoder layers' linear layers, and the image projector.
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR_LORA_TARGETS = ("img_projection_up", "img_projection_down")
VISION_LORA_FOLDER = "vision-lora"
IMAGE_EMBEDDING = "model.embed_tokens_extend.image_embed"
SPEECH_PREFIX = "model.embed_tokens_extend.audio_embed."  # the speech encoder's keys in the checkpoint


def causal_lm(model: nn.Module) -> Phi4MultimodalForCausalLM:
    """The Phi4MultimodalForCausalLM inside `model`'s wrappers (DDP's `.module`, a PeftModel)."""
    while not isinstance(model, Phi4MultimodalForCausalLM):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            raise TypeError(f"{type(model).__name__} is not a Phi-4-multimodal model")
    return model


def vision_module(model: nn.Module) -> nn.Module:
    """What --freeze_vision_model freezes: the whole image embedding (SigLIP tower, projector, extensors)."""
    return causal_lm(model).model.embed_tokens_extend.image_embed


def used_vision_layers(model: nn.Module) -> int:
    """How many SigLIP encoder layers the image features pass through (26 of 27 at feature_layer -2).

    The image embedding reads `hidden_states[feature_layer]`, where hidden state k is the output of layer k
    (0 the patch embeddings). The tower still runs its later layers, `post_layernorm` and pooling `head`, but
    their outputs reach nothing: they never get a gradient.
    """
    image_embed = vision_module(model)
    num_hidden_states = len(image_embed.img_processor.encoder.layers) + 1
    return image_embed.layer_idx % num_hidden_states


def lora_target_modules(model: nn.Module, include_vision: bool) -> list[str]:
    """Full names of the LoRA targets in `model` (unwrapped): the language-model layers the shipped vision-lora
    targets, and with `include_vision` the image projector and the SigLIP layers the features pass through.

    Full names, not suffixes: the speech encoder has `gate_up_proj`/`down_proj` layers too, and adapters on
    layers that never run (speech, SigLIP past the feature layer) would wait forever for a gradient under DDP.
    """
    used = {f"img_processor.encoder.layers.{i}." for i in range(used_vision_layers(model))}
    targets = []
    for name, module in causal_lm(model).named_modules():
        if not isinstance(module, nn.Linear):  # bitsandbytes' 4-bit layers are nn.Linear too
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("model.layers.") and leaf in LANGUAGE_LORA_TARGETS:
            targets.append(name)
        elif include_vision and name.startswith("model.embed_tokens_extend.image_embed."):
            if leaf in PROJECTOR_LORA_TARGETS or (leaf in VISION_LORA_TARGETS and any(u in name for u in used)):
                targets.append(name)
    return targets


def lora_target_pattern(model: nn.Module, include_vision: bool) -> str:
    """`lora_target_modules` as one regular expression that matches those names only, for LoraConfig.

    PEFT shortens a list of 20 or more names into the shortest suffixes that pick them out of the model at
    hand, and saves those: from a model without its speech encoder (`prepare_for_training`), suffixes such
    as "down_proj" then also pick the speech encoder's layers once the adapter is loaded onto a full base,
    which gets adapters with no weights (PEFT warns of missing keys). A pattern is saved as it is.
    """
    return "|".join(re.escape(name) for name in lora_target_modules(model, include_vision))


def bidirectional_vision_attention(model: nn.Module) -> None:
    """SigLIP's patches attend to each other both ways, as the released model's tower does, under every kernel.

    transformers' `Phi4MultimodalVisionAttention` says `is_causal = True`. Eager attention ignores it, but SDPA and
    flash attention read it whenever the patch mask is dropped, i.e. when no patch of the batch is padding: the
    tower then ran causally (the features of an image depended on the kernel and on the other images of its
    batch). Set per module instance, on the model loaded here.
    """
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionAttention

    for module in causal_lm(model).modules():
        if isinstance(module, Phi4MultimodalVisionAttention):
            module.is_causal = False


def prepare_for_training(model: nn.Module) -> None:
    """Freezes what never reaches the loss in vision work and takes the speech encoder out of the model.

    Frozen: SigLIP's layers past the feature layer, `post_layernorm` and the pooling head (they run, but
    nothing reads their output). The speech encoder (`audio_embed`, 466M parameters at full size) only runs
    for audio inputs: it is dropped, so it takes no device memory, no optimizer state and no DDP bucket.
    A saved full model gets its weights back, unchanged, from the base checkpoint (`restore_speech_weights`).
    Call it after loading (`from_pretrained` resets requires_grad) and after making the image embedding
    trainable (the official recipe trains all of it, which would unfreeze the unused layers again).
    """
    lm = causal_lm(model)
    tower = lm.model.embed_tokens_extend.image_embed.img_processor
    for module in [*tower.encoder.layers[used_vision_layers(lm):], tower.post_layernorm, tower.head]:
        module.requires_grad_(False)
    lm.model.embed_tokens_extend.audio_embed = None  # forward() only calls it for audio inputs


def _local_checkpoint(checkpoint: str | Path, patterns: list[str]) -> Path:
    """The checkpoint's folder: `checkpoint` itself, or the Hub snapshot holding the files `patterns` match.

    A local folder wins, as in from_pretrained: a relative path such as demo_output/tiny-phi4mm is also
    spelt like a Hub id.
    """
    folder = Path(checkpoint).expanduser()
    if folder.is_dir():
        return folder
    if looks_like_a_path(str(checkpoint)):
        raise SetupError(f"{checkpoint}: no such checkpoint folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(checkpoint), allow_patterns=patterns))


def speech_weights(base_checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The speech encoder's tensors as the checkpoint stores them (its dtype), read from its safetensors files."""
    folder = _local_checkpoint(base_checkpoint, ["model*.safetensors*"])
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if key.startswith(SPEECH_PREFIX)})
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else []
    weights = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            weights.update({key: f.get_tensor(key) for key in f.keys() if key.startswith(SPEECH_PREFIX)})
    if not weights:
        raise SetupError(f"{base_checkpoint}: no speech encoder weights ({SPEECH_PREFIX}*) in its safetensors files")
    return weights


def restore_speech_weights(state_dict: Mapping[str, torch.Tensor], base_checkpoint: str | Path) -> dict[str, Any]:
    """`state_dict` (of a model `prepare_for_training` took the speech encoder out of) with the speech encoder's
    weights put back from `base_checkpoint`, bit for bit: what `save_pretrained(state_dict=...)` should write.

    A state dict that still holds them (the encoder was kept) is returned as it is.
    """
    if any(key.startswith(SPEECH_PREFIX) for key in state_dict):
        return dict(state_dict)
    return {**state_dict, **speech_weights(base_checkpoint)}


def with_vision_term(model: nn.Module, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """A training batch with no image, as inputs that still run the trainable image embedding (on a blank image,
    times zero): `inputs_embeds` in place of `input_ids`. Other batches are returned as they are.

    Under DDP (find_unused_parameters=False) and DeepSpeed ZeRO every rank must produce a gradient for every
    trainable weight in every step, and ZeRO-2 sums its gradient buckets by the order the gradients arrive in:
    a rank with text only must give the vision weights their (zero) gradients at the place in the backward pass
    where an image batch gives them. So the embedding runs where the model runs it, after the token embedding
    and before the decoder, as Phi-3-V's own model does (Phi3VModel.unused_vision_term); transformers' Phi-4-MM
    does not, so the trainer does it here. A blank 448x448 image costs two crops of SigLIP.
    """
    lm = causal_lm(model)
    if not (lm.training and torch.is_grad_enabled()) or "input_ids" not in inputs:
        return inputs
    vision = lm.config.vision_config
    if inputs.get("image_pixel_values") is not None and bool((inputs["input_ids"] == vision.image_token_id).any()):
        return inputs
    embedding = vision_module(lm)
    if not any(p.requires_grad for p in embedding.parameters()):
        return inputs
    if parameters_are_sharded(embedding):
        # Each rank holds a slice of each weight, and the tower's forward pass gathers them with collectives
        # that every rank must join in the same order: the Trainer's model call cannot be rearranged for it.
        raise SetupError("batches without images need the vision weights frozen under sharded training "
                         "(ZeRO-3, FSDP): use --freeze_vision_model, or DDP / ZeRO-2")
    embeds = lm.model.embed_tokens(inputs["input_ids"])
    crop, side = vision.crop_size, vision.crop_size // vision.patch_size
    merged = side // 2  # merged patches per crop side: a one-crop image has 2 * merged * (merged + 1) + 1 tokens
    tokens = 2 * merged * (merged + 1) + 1
    blank = embedding(
        torch.full((1, tokens), vision.image_token_id, device=embeds.device),
        torch.zeros(1, tokens, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device),
        image_pixel_values=torch.zeros(1, 2, 3, crop, crop, dtype=embeds.dtype, device=embeds.device),
        image_sizes=torch.tensor([[crop, crop]], device=embeds.device),
        image_attention_mask=torch.ones(1, 2, side, side, device=embeds.device),
    )
    # Zeroed before the sum: a half-precision sum of the features can overflow, and 0 x inf is NaN.
    rest = {key: value for key, value in inputs.items() if key != "input_ids"}
    return {**rest, "inputs_embeds": embeds + (blank * 0).sum().to(embeds.dtype)}


def answer_loss(
    model: nn.Module, inputs: Mapping[str, Any], num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """`model(**inputs).loss` computed from the logits at answer positions only.

    Next-token cross-entropy over the positions whose next label is not -100: the model projects only the
    union of those positions over the batch rows onto the vocabulary (`logits_to_keep`), never the whole
    [batch, sequence, 200,064] logits. Mean over the answer tokens, or their sum divided by
    `num_items_in_batch` when the Trainer passes it (gradient accumulation weights every token equally).
    The model runs without a KV cache: with one, transformers' mask no longer sees packed samples (position
    ids restarting, no attention mask) and lets them attend to each other.
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]
    positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
    rest = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**rest, use_cache=False, logits_to_keep=positions).logits
    kept = targets[:, positions].to(logits.device)
    loss = F.cross_entropy(logits.float().flatten(0, 1), kept.flatten(), ignore_index=-100, reduction="sum")
    count = (kept != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


def _vision_lora_folder(checkpoint: str | Path) -> Path:
    folder = _local_checkpoint(checkpoint, [f"{VISION_LORA_FOLDER}/*"]) / VISION_LORA_FOLDER
    if not (folder / "adapter_config.json").exists() or not (folder / "adapter_model.safetensors").exists():
        raise SetupError(f"{checkpoint}: no shipped vision LoRA ({VISION_LORA_FOLDER}/adapter_config.json "
                         "and adapter_model.safetensors)")
    return folder


def _with_vision_lora(model: nn.Module, checkpoint: str | Path, trainable: bool, train_vision: bool = False):
    """`model` as a PeftModel whose adapter "default" holds the checkpoint's vision LoRA, every weight of it loaded.

    The Hub's folder names its weights as the model does (`model.layers.0.self_attn.qkv_proj.lora_A.weight`),
    without the `base_model.model.` prefix PEFT writes: `PeftModel.from_pretrained` finds none of them and
    leaves a fresh adapter in place with a warning. The prefix is added here, and a missing weight is an error.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    folder = _vision_lora_folder(checkpoint)
    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = not trainable
    prefix = "base_model.model."
    weights = {(k if k.startswith(prefix) else prefix + k): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    if train_vision:
        # A trained copy of the image embedding that PEFT saves with the adapter (checkpoints resume with it); it
        # starts as the model's own, which PEFT then expects among the adapter's weights.
        config.modules_to_save = [IMAGE_EMBEDDING]
        own = causal_lm(model).get_submodule(IMAGE_EMBEDDING).state_dict()
        weights.update({f"{prefix}{IMAGE_EMBEDDING}.{name}": tensor for name, tensor in own.items()})
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing or result.unexpected_keys:
        raise SetupError(f"{folder}: the adapter does not fit the model ({len(missing)} LoRA weights missing, "
                         f"{len(result.unexpected_keys)} unexpected, e.g. {(missing + result.unexpected_keys)[0]})")
    return peft_model


def continue_vision_lora(model: nn.Module, checkpoint: str | Path, train_vision: bool = False):
    """`model` with the checkpoint's shipped vision LoRA (`vision-lora/`) as its trainable adapter.

    Microsoft's Phi-4-MM vision fine-tuning sample trains this adapter (r 256) together with the image
    embedding: `train_vision` makes a trainable copy of the image embedding part of the adapter (PEFT's
    modules_to_save), so checkpoints hold it and a merge puts it in place. The adapter is PEFT's "default".
    """
    return _with_vision_lora(model, checkpoint, trainable=True, train_vision=train_vision)


def apply_vision_lora(model: nn.Module, checkpoint: str | Path) -> Phi4MultimodalForCausalLM:
    """`model` with the checkpoint's shipped vision LoRA merged into its weights, before a new adapter goes on.

    A new adapter then learns on top of base + vision LoRA, as the model runs for images, and merging it
    later gives base + vision LoRA + new adapter. (Applying the new adapter alone would train and evaluate
    on the base without its vision LoRA: the ms-swift #5811 trap.) A 4-bit base (QLoRA) takes the merge too:
    PEFT dequantizes each layer, adds the LoRA product and quantizes again.
    """
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    merged = _with_vision_lora(model, checkpoint, trainable=False).merge_and_unload()
    for name, parameter in merged.named_parameters():  # PEFT froze the whole base for its adapter
        parameter.requires_grad_(name in trainable)
    return merged


def meta_image_tokens(model: nn.Module, crops_hw: list[tuple[int, int]], image_tokens: int,
                      crop_slots: int | None = None) -> torch.Tensor:
    """[image_tokens, hidden] image tokens of a sample's images as Phi4MultimodalImageEmbedding computes them,
    on the meta device (phivision.training.sizing.step_cost), for images of `crops_hw` (rows, columns) grids.

    The model runs SigLIP on every crop it is given: the global crop and the sub-crops of each image, and with
    `crop_slots` the zero crops a batch pads each image to as well (`get_img_features` on
    `image_pixel_values.flatten(0, 1)`); the whole tower runs (every layer, `post_layernorm` and the pooling
    head), though the features are hidden state `feature_layer`. Then 2x2 average pooling, the HD merge
    (separators: the learned extensors) and the two-layer projection over the `image_tokens` tokens. The
    model's own forward cannot run on the meta device (it reads the attention mask's values).
    """
    embedding = vision_module(model)
    tower = embedding.img_processor
    real = sum(1 + h * w for h, w in crops_hw)
    crops = real if crop_slots is None else crop_slots * len(crops_hw)
    size = embedding.crop_size
    pixels = torch.zeros(crops, 3, size, size, dtype=torch.bfloat16, device="meta")
    side = size // tower.config.patch_size
    patches = torch.ones(crops, side, side, dtype=torch.bool, device="meta")
    hidden = tower.embeddings(pixels, patches)
    states = [hidden]
    for layer in tower.encoder.layers:  # all-ones patch mask: no attention mask (SDPA's fast path)
        hidden = layer(hidden, None)
        states.append(hidden)
    tower.head(tower.post_layernorm(hidden), patches.flatten(1))  # runs, unused: no gradient reaches it
    features = states[embedding.layer_idx]
    width = int(math.sqrt(features.shape[1]))
    grid = features.view(-1, width, width, features.shape[-1]).permute(0, 3, 1, 2)
    pooled = embedding.image_token_compression(grid).permute(0, 2, 3, 1).flatten(1, 2)[:real]
    # The HD merge reorders the crops' tokens and adds a separator per row: as many tokens, from these.
    flat = pooled.flatten(0, 1)[:image_tokens]
    separators = embedding.sub_img_feature_extensor.reshape(1, -1).expand(image_tokens - flat.shape[0], -1)
    merged = torch.cat([flat, separators.to(flat.dtype)])
    return embedding.img_projection_down(F.gelu(embedding.img_projection_up(merged)))
