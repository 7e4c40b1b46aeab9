"""Phi-3(.5)-vision on transformers' own building blocks.

    Phi3VForCausalLM
    ├── model: Phi3VModel            transformers' Phi3Model + the image embedding
    │   ├── embed_tokens, layers, norm
    │   └── vision_embed_tokens: Phi3VImageEmbedding
    │       ├── img_processor.vision_model   transformers' CLIPVisionModel (ViT-L/14-336)
    │       ├── glb_GN, sub_GN               learnable separators
    │       └── img_projection               Linear -> GELU -> Linear
    └── lm_head

Attribute names are the checkpoint's keys, so Hub snapshots load with no conversion. Images enter
as runs of negative ids in `input_ids` (the processor writes -k for image k); the embedding of
those positions is replaced, in row-major (batch, position) order, by the image features.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel
from transformers.utils import logging

from ..attention import flash_attn_unusable, sample_bounds
from .configuration import Phi3VConfig

logger = logging.get_logger(__name__)


def longrope_limit(model: nn.Module) -> int | None:
    """Length past which LongRoPE switches to its long factors (4,096 for Phi-3.5-vision), or None.

    transformers picks the factors for a whole batch from its longest sequence (padded or packed),
    so batches that mix both sides give some sequences other factors than they get alone.
    """
    rope = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    return rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None


def parameters_are_sharded(module: nn.Module) -> bool:
    """True when `module`'s weights are split over ranks (DeepSpeed ZeRO-3 or FSDP2).

    Each forward pass then gathers the weights of every submodule it calls, a collective that
    every rank must join in the same order. ZeRO-3 marks its parameters with `ds_id`; FSDP2 turns
    the modules it wraps into `FSDPModule`s (their parameters are plain tensors while gathered).
    """
    from torch.distributed.fsdp import FSDPModule

    return any(hasattr(p, "ds_id") for p in module.parameters()) or any(isinstance(m, FSDPModule) for m in module.modules())


class Phi3VVisionTower(nn.Module):
    """CLIP under `.vision_model`, the checkpoint's layout (transformers 5 dropped that level)."""

    def __init__(self, config: CLIPVisionConfig, feature_layer: int):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)
        self.feature_layer = feature_layer

    def freeze_unused(self) -> None:
        """Freeze the layers after the feature layer and `post_layernorm`.

        They are in the checkpoint but never run; frozen, DDP and optimizers don't wait for
        gradients that never come. (Call after loading: `from_pretrained` resets requires_grad.)
        """
        for module in [*self.vision_model.encoder.layers[self.num_layers_used :], self.vision_model.post_layernorm]:
            module.requires_grad_(False)

    @property
    def num_layers_used(self) -> int:
        num_layers = len(self.vision_model.encoder.layers)
        return num_layers + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP hidden state number `feature_layer` (-2 for Phi-3-V), CLS included: [crops, 1 + patches, dim]."""
        vision = self.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer in vision.encoder.layers[: self.num_layers_used]:
            hidden = layer(hidden, None)
        return hidden


class Phi3VImageEmbedding(nn.Module):
    """Turns HD crops into image tokens: CLIP patches, 2x2 merge, separators, MLP projection."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        self.img_processor = Phi3VVisionTower(config.vision_config, config.feature_layer)
        self.crop_size = config.vision_config.image_size  # CLIP's input: the side of an HD crop
        # Separators: `sub_GN` ends every row of the token grid, `glb_GN` sits between the
        # sub-crop grid and the global view.
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * vision_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * vision_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * vision_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def merge_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """[crops, side*side, dim] -> [crops, side/2, side/2, 4*dim].

        Merged token (i, j) concatenates patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
        """
        crops, num_patches, dim = patches.shape
        side = int(num_patches**0.5)
        grid = patches.reshape(crops, side // 2, 2, side // 2, 2, dim)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(crops, side // 2, side // 2, 4 * dim)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Image tokens for all images, concatenated in image order: [total_tokens, hidden].

        pixel_values: [images, max_crops, 3, 336, 336], crop slot 0 the global view, then the
        h x w sub-crops in raster order, then zero padding. image_sizes: [images, 2] (H, W).
        """
        crop_index, token_index = self.layout(image_sizes, pixel_values.shape[1])
        # CLIP runs on the real crops only: the zero padding slots contribute nothing.
        real_crops = pixel_values.flatten(0, 1)[crop_index.to(pixel_values.device)]
        dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
        return self.project(self.img_processor(real_crops.to(dtype)), token_index)

    @torch.compiler.disable
    def layout(self, image_sizes: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop slots of the real crops in `pixel_values.flatten(0, 1)`, `token_index` of their tokens).

        Computed on the host from the image sizes, and left out of torch.compile: traced, every new mix of
        crop grids in a batch would compile new graphs; as index tensors, they are inputs of one graph.
        """
        crops_hw = self.crop_grids(image_sizes)
        crop_index = [i * slots + j for i, (h, w) in enumerate(crops_hw) for j in range(1 + h * w)]
        return torch.tensor(crop_index, dtype=torch.long), self.token_index(crops_hw)

    def crop_grids(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """(rows, columns) of the sub-crops of each image."""
        return [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]

    def token_index(self, crops_hw: list[tuple[int, int]]) -> torch.Tensor:
        """Where each image token comes from, image after image, in the rows of `project`'s table (merged tokens
        of all real crops in (crop, row, column) order, then `sub_GN`, then `glb_GN`).

        An image's tokens: its h x w sub-crops as one (h*side) x (w*side) grid in raster order, then
        `glb_GN`, then the global view's side x side grid; `sub_GN` ends every row of both grids.
        """
        side = self.crop_size // self.img_processor.vision_model.config.patch_size // 2
        per_crop = side * side
        sub_gn = sum(1 + h * w for h, w in crops_hw) * per_crop
        glb_gn = sub_gn + 1
        index, start = [], 0  # start: the image's global view, its sub-crops follow
        for h, w in crops_hw:
            for row in range(h * side):
                first_crop = start + 1 + (row // side) * w
                index += [(first_crop + col // side) * per_crop + (row % side) * side + col % side
                          for col in range(w * side)]
                index.append(sub_gn)
            index.append(glb_gn)
            for row in range(side):
                index += [start * per_crop + row * side + col for col in range(side)]
                index.append(sub_gn)
            start += 1 + h * w
        return torch.tensor(index, dtype=torch.long)

    def project(self, crop_features: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """CLIP features of the real crops (CLS first) -> the image tokens `token_index` lays out, projected."""
        merged = self.merge_patches(crop_features[:, 1:]).flatten(0, 2)  # drop CLS
        separators = [self.sub_GN.reshape(1, -1).to(merged.dtype), self.glb_GN.reshape(1, -1).to(merged.dtype)]
        table = torch.cat([merged, *separators])
        return self.img_projection(table.index_select(0, token_index.to(table.device)))

    def image_tokens(self, crop_features: torch.Tensor, crops_hw: list[tuple[int, int]]) -> torch.Tensor:
        """CLIP features of the real crops (CLS first), image after image -> projected image tokens."""
        return self.project(crop_features, self.token_index(crops_hw))


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config: Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            std = self.config.initializer_range
            nn.init.normal_(module.glb_GN, std=std)
            nn.init.normal_(module.sub_GN, std=std)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        # The Hub config.json asks for flash_attention_2; without flash-attn installed we run SDPA
        # instead of refusing to load.
        reason = flash_attn_unusable() if attn_implementation == "flash_attention_2" else None
        if reason:
            logger.warning_once(f"flash_attention_2 was requested but {reason}: using SDPA attention.")
            attn_implementation = "sdpa"
            self.config._attn_implementation = attn_implementation  # the setter reaches the CLIP sub-config
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1) -> None:
        """transformers' switch, except for a frozen vision tower: it is never checkpointed.

        Nothing in a frozen tower needs a gradient, so there is nothing to recompute; its layers run as
        plain modules (no checkpoint wrapper, no "None of the inputs have requires_grad" warnings).
        """
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for module in self.modules():
            if isinstance(module, Phi3VVisionTower) and not any(p.requires_grad for p in module.parameters()):
                for layer in module.vision_model.encoder.layers:
                    layer.gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        """Make the token embeddings' output require grad (adapters with checkpointing), and nothing else.

        transformers hooks the input embeddings of every sub-model, CLIP's patch embedding included:
        the vision tower would then run its whole backward pass even when it is frozen (frozen-vision
        and language-only LoRA runs). Trainable vision weights get their gradients without the hook.
        """

        def make_output_require_grad(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(make_output_require_grad)]
        self._require_grads_hook = self._require_grads_hooks[0]


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi3Model whose input embeddings carry the image features at the image positions."""

    def __init__(self, config: Phi3VConfig):
        Phi3Model.__init__(self, config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()  # initialises the new modules only; the LM ones are marked done

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        decoding: bool = False,
        prompt_cache=None,
    ) -> torch.Tensor:
        """Token embeddings with image features written at the positions where `input_ids < 0`.

        The features are `vision_embed_tokens(pixel_values, image_sizes)`, or `image_features` when given:
        that output computed before ([image tokens, hidden], images in order; a frozen tower's, see
        phivision.training.vision_cache; empty for text only). With them the vision tower does not run at all.
        `decoding`: a generation step after the prompt (images never come then). `prompt_cache`: the cache of
        a prompt's pass in generate(); its image features (empty for text only) are kept with it, for the
        recomputation at LongRoPE's switch (Phi3VForCausalLM.prepare_inputs_for_generation).
        """
        inputs_embeds = self.embed_tokens(input_ids.clamp(min=0))
        image_positions = (input_ids < 0).unsqueeze(-1)
        # The checks read the ids on the host: not under torch.compile, where they would split the graph.
        checked = not torch.compiler.is_compiling()
        if pixel_values is None and image_features is None:
            if checked and image_positions.any():
                raise ValueError(
                    "input_ids contain image positions (negative ids) but no pixel_values/image_sizes were given; "
                    "build inputs with Phi3VProcessor(text, images)."
                )
            if prompt_cache is not None:
                prompt_cache.prompt_image_features = torch.zeros(0)
            return inputs_embeds + (0.0 if decoding else self.unused_vision_term(inputs_embeds))
        features = self.vision_embed_tokens(pixel_values, image_sizes) if image_features is None else image_features
        if prompt_cache is not None:
            prompt_cache.prompt_image_features = features
        if checked and features.shape[0] != int(image_positions.sum()):
            raise ValueError(
                f"input_ids have {int(image_positions.sum())} image positions but the images give "
                f"{features.shape[0]} tokens: were the prompts and images processed with the same num_crops?"
            )
        # Image tokens fill the image positions in row-major (batch, position) order.
        return inputs_embeds.masked_scatter(image_positions, features.to(inputs_embeds.dtype))

    def unused_vision_term(self, inputs_embeds: torch.Tensor) -> torch.Tensor | float:
        """Zero that still depends on every trainable image-embedding weight, for text-only batches.

        Under DDP and DeepSpeed ZeRO every rank must produce gradients for the same parameters in
        each step; a rank whose batch has no image would otherwise leave the vision weights out
        and hang or break the gradient reduction. With sharded weights (ZeRO-3, FSDP) every forward
        pass, in evaluation and generation too, gathers each module's weights with collectives that
        all ranks must join: the vision tower then runs on every rank, trainable or not, when some
        rank may run it: in training and on prompts, not in the decoding steps after them (`embed`).
        One blank crop pair costs little.
        """
        embedding = self.vision_embed_tokens
        trains_vision = self.training and torch.is_grad_enabled() and any(p.requires_grad for p in embedding.parameters())
        if not (trains_vision or parameters_are_sharded(embedding)):
            return 0.0
        crop = embedding.crop_size
        blank = torch.zeros(1, 2, 3, crop, crop, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        sizes = torch.tensor([[crop, crop]], device=inputs_embeds.device)
        # Zeroed before the sum: a half-precision sum of ~10^6 features can overflow, and 0 x inf is NaN.
        return (embedding(blank, sizes) * 0).sum().to(inputs_embeds.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ):
        cache = kwargs.get("past_key_values")
        decoding = cache is not None and cache.get_seq_length() > 0
        if inputs_embeds is None and input_ids is not None:
            prompt_cache = cache if cache is not None and not decoding else None
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_features, decoding, prompt_cache)
        if self.config._attn_implementation == "sdpa_packed" and not decoding:
            # The sample boundaries read once per forward pass, not in every layer (a GPU-to-host copy each).
            kwargs["packed_bounds"] = sample_bounds(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
        return Phi3Model.forward(self, inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi-3(.5)-vision for generation and fine-tuning.

    Images come as `pixel_values` and `image_sizes`, or as `image_features`: the image embedding's output
    computed before (a frozen tower's features, cached).

    With `labels`, the loss is computed from the hidden states at the labelled positions only:
    the 32,064-wide logits of prompt and image positions are never materialised, and `logits`
    in the output is None. Call without labels to get full logits.
    """

    def __init__(self, config: Phi3VConfig):
        # Phi3ForCausalLM.__init__ would build a text-only Phi3Model first; build ours directly.
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if labels is not None and use_cache is None:
            use_cache = False  # training needs no cache, and a cache would hide packed sequences from the mask
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_features=image_features,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            loss = self.answer_loss(hidden_states, labels, num_items_in_batch)
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden_states = hidden_states[:, logits_to_keep]
            logits = self.lm_head(hidden_states)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def answer_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy over the positions whose next label is not -100.

        Mean over those tokens, or their sum divided by `num_items_in_batch` when the Trainer
        passes it (so gradient accumulation weights every token equally).
        """
        targets = labels[:, 1:]
        keep = (targets != -100).nonzero(as_tuple=True)  # one data-dependent shape (one graph break under compile)
        logits = self.lm_head(hidden_states[:, :-1][keep]).float()
        if num_items_in_batch is None:
            return F.cross_entropy(logits, targets[keep]) if logits.shape[0] else logits.sum()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        return loss / torch.as_tensor(num_items_in_batch, device=loss.device)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Beam search / num_return_sequences: every copy of a prompt gets that prompt's images, in order.

        generate() repeats each tensor along dim 0, which repeats images one by one ([a, b] -> [a, a, b, b]);
        a prompt with images a and b repeated twice needs [a, b, a, b]. Image k of a prompt is id -k, so
        the prompt's smallest id gives its number of images.
        """
        pixel_values, image_sizes = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_sizes", None)
        if pixel_values is not None and input_ids is not None and expand_size > 1:
            counts = (-input_ids.min(dim=1).values).clamp(min=0).tolist()  # images per prompt
            first = [sum(counts[:row]) for row in range(len(counts))]  # index of each prompt's first image
            order = [first[row] + k for row, n in enumerate(counts) for _ in range(expand_size) for k in range(n)]
            pixel_values = pixel_values[torch.tensor(order, device=pixel_values.device)]
            image_sizes = image_sizes[torch.tensor(order, device=image_sizes.device)]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_sizes=None, **kwargs):
        """Images go in at prefill; when Phi-3 drops the cache at LongRoPE's switch, the features computed then.

        Once a sequence grows past `original_max_position_embeddings` (4,096), Phi-3 recomputes it
        whole with the long factors instead of reusing keys cached with the short ones. That pass reads
        the image positions again and gets the prefill's image features (kept with the cache by
        Phi3VModel.forward): the vision tower does not run again. Under sharded weights (ZeRO-3, FSDP2,
        synced_gpus) it would gather its weights while the ranks that did not cross take a decode step
        without it: different collectives, and the run hangs.
        """
        cache = kwargs.get("past_key_values")
        inputs = super().prepare_inputs_for_generation(
            input_ids, pixel_values=pixel_values, image_sizes=image_sizes, **kwargs
        )
        dropped = cache is not None and cache.get_seq_length() > 0 and inputs.get("past_key_values") is None
        features = getattr(cache, "prompt_image_features", None) if dropped else None
        if features is not None:
            inputs.pop("pixel_values", None)
            inputs.pop("image_sizes", None)
            inputs["image_features"] = features
        elif pixel_values is not None and "pixel_values" not in inputs and inputs.get("past_key_values") is None:
            inputs.update(pixel_values=pixel_values, image_sizes=image_sizes)  # a cache that was filled elsewhere
        return inputs


__all__ = ["Phi3VForCausalLM", "Phi3VModel", "Phi3VPreTrainedModel", "Phi3VImageEmbedding"]
