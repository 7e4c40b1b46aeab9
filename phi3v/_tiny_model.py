import torch
from .configuration import Phi3VConfig


def tiny_config(vocab_size: int = 320, **overrides) -> Phi3VConfig:
    """A Phi-3-V of a few MB: the real structure (CLIP patch 14 at 336 px, 144 tokens per crop,
    LongRoPE "su", HD transform) with narrow layers, for tests and the CPU demo."""
    head_dim = 16
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": [1.0] * (head_dim // 2), "long_factor": [4.0] * (head_dim // 2)},
        sliding_window=262144,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        img_processor={
            "image_dim_out": 32,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2},
        },
    )
    settings.update(overrides)
    return Phi3VConfig(**settings)
