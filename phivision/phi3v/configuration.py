"""Phi3VConfig: reads and writes the Hub's `config.json` of Phi-3(.5)-vision as it is.

The language model part is transformers' `Phi3Config`; the image part lives in two dicts the Hub
file already has (`embd_layer`, `img_processor`). From `img_processor` we derive a
`CLIPVisionConfig` sub-config (ViT-L/14-336 unless `img_processor["vision_config"]` overrides
sizes, as the tiny test checkpoint does), so attention selection reaches CLIP too. Saving writes
the Hub form back (`rope_scaling` of type "su", no `vision_config` key, `auto_map` naming the Hub
repo of the original code, see `phivision.phi3v.remote_code`), so the checkpoints we write stay readable by
runtimes that read the Hub layout.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config

from .remote_code import MODEL_AUTO_MAP, code_repo, with_repo

# CLIP ViT-L/14 at 336 px, the vision tower of every released Phi-3(.5)-vision checkpoint.
CLIP_VIT_L_14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


class Phi3VConfig(Phi3Config):
    """Configuration of Phi-3-vision / Phi-3.5-vision (`model_type` "phi3_v").

    Accepts the Hub `config.json` unchanged, including `rope_scaling` of type "su" (LongRoPE,
    identical to transformers' "longrope") and `_attn_implementation` "flash_attention_2" (which
    the model downgrades to SDPA when flash-attn is not installed).
    """

    model_type = "phi3_v"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig}

    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        if not isinstance(self.vision_config, CLIPVisionConfig):
            # The vision sizes are stored in `img_processor` (the Hub's place for them), never as
            # a separate `vision_config` key, so there is one source of truth on disk.
            overrides = self.img_processor.get("vision_config") or self.vision_config or {}
            self.vision_config = CLIPVisionConfig(**{**CLIP_VIT_L_14_336, **overrides})
        if self.img_processor["image_dim_out"] != self.vision_config.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out={self.img_processor['image_dim_out']} must equal the vision "
                f"tower's hidden_size={self.vision_config.hidden_size}"
            )
        if self.embd_layer.get("hd_transform_order", "sub_glb") != "sub_glb":
            raise NotImplementedError("only embd_layer.hd_transform_order 'sub_glb' (all released checkpoints)")
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs):
        # Phi3Config fills the rope dict in place: copy it so the caller's dict stays as it was.
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = copy.deepcopy(kwargs["rope_scaling"])
        kwargs = super().convert_rope_params_to_dict(**kwargs)
        if self.rope_parameters.get("rope_type") == "longrope":
            # The Hub's "su" dict lacks these; "longrope" requires the first and warns without the
            # second. Both are the values the "su" formula uses implicitly.
            original = self.original_max_position_embeddings
            self.rope_parameters.setdefault("original_max_position_embeddings", original)
            self.rope_parameters.setdefault("factor", self.max_position_embeddings / original)
        return kwargs

    @property
    def torch_dtype(self):
        """`dtype`, by the name our `config.json` keeps it under (see `to_dict`).

        transformers' own alias warns that `torch_dtype` is deprecated, each time a config is
        printed or saved, because `to_dict` lists that key.
        """
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value):
        self.dtype = value

    @property
    def num_img_tokens(self) -> int:
        """Merged tokens per 336x336 crop (12x12 = 144 for CLIP-L/14-336)."""
        return self.img_processor["num_img_tokens"]

    @property
    def feature_layer(self) -> int:
        """Which CLIP hidden state feeds the projection (-2: the output of the second-to-last layer)."""
        return self.img_processor.get("layer_idx", -2)

    def to_dict(self) -> dict[str, Any]:
        """The Hub form: `rope_scaling` {"type": "su", ...} and `rope_theta`, no `vision_config`, and an
        `auto_map` whose entries name the Hub repo of the code (the one this config was loaded from)."""
        output = super().to_dict()
        output.pop("vision_config", None)
        output["auto_map"] = with_repo(getattr(self, "auto_map", None), MODEL_AUTO_MAP, code_repo(self._name_or_path))
        if "dtype" in output:  # readers of the Hub layout (transformers < 4.56, vLLM) look for torch_dtype
            output["torch_dtype"] = output.pop("dtype")
        output["img_processor"] = copy.deepcopy(self.img_processor)
        rope = dict(output.pop("rope_parameters", None) or {})
        output["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type") == "longrope":
            output["rope_scaling"] = {
                "type": "su",
                "short_factor": list(rope["short_factor"]),
                "long_factor": list(rope["long_factor"]),
            }
        else:
            output["rope_scaling"] = None
        return output


__all__ = ["Phi3VConfig"]
