"""A tiny random Phi-4-multimodal for tests and the CPU demo, built offline, in the transformers-native layout.

    python -m phivision.tiny OUT_DIR --family phi4mm
    python -m phivision.tiny OUT_DIR --family phi4mm --full_size   # the Hub's sizes (5.57B parameters, 11 GB)

Writes what microsoft/Phi-4-multimodal-instruct's native files hold: config.json (Phi4MultimodalConfig with
vision_config and audio_config), model.safetensors, generation_config.json, the tokenizer and processor files,
and the `vision-lora/` and `speech-lora/` PEFT adapters with the Hub's targets, ranks and alphas. Sizes are
tiny, but the image side keeps 448-pixel crops and 14-pixel patches, so token counts follow the real formula.

The tokenizer is laid out like Phi-4-mini's: byte-level BPE with the o200k pre-tokenizer split, no BOS added,
and the same added tokens in the same order (`<|endoftext|>`, `<|endoftext0|>`..`<|endoftext17|>`, of which
`<|endoftext10|>` and `<|endoftext11|>` are the image and audio placeholders, `<|endofprompt|>`,
`<|assistant|>`, `<|end|>`, `<|user|>`, `<|system|>`, the tool tokens): only the base vocabulary is small.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from ..tiny import learn_bpe
from .image_processing import Phi4MMImageProcessor
from .processing import Phi4MMProcessor

# Phi-4-mini's chat template (the processor's and tokenizer's): no newlines between turns, EOS after a
# conversation that does not end with a generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# The real tokenizer's added tokens in id order: <|endoftext|> is 199999 there, the others follow it.
ADDED_TOKENS = (
    ["<|endoftext|>"]
    + [f"<|endoftext{n}|>" for n in range(18)]
    + ["<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>",
       "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>"]
)
IMAGE_TOKEN = "<|endoftext10|>"
AUDIO_TOKEN = "<|endoftext11|>"
# o200k's pre-tokenizer split (Phi-4-mini's tokenizer.json): words with their leading mark, 1-3 digit numbers,
# punctuation runs, newlines, spaces.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# 256 byte tokens plus merges learned from the training text.
TINY_BASE_VOCAB_SIZE = 512
# The Hub's config pads the embedding to a multiple of 64 (200064 rows for 200029 tokens).
VOCAB_MULTIPLE = 64

# The Hub's adapters (transformers' convert_phi4_multimodal_weights_to_hf.py): both on every LM layer's
# attention and MLP projections.
LORA_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"
ADAPTERS = {"vision-lora": dict(r=256, lora_alpha=512, lora_dropout=0.0),
            "speech-lora": dict(r=320, lora_alpha=640, lora_dropout=0.01)}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A Phi-4-mini-style tokenizer with a tiny vocabulary, built offline and deterministically.

    Ids: bytes and learned tokens 0..511, then the added tokens from `<|endoftext|>` 512 (bos, eos, pad and
    unk, as in the real one) in the real order; `image_token` / `audio_token` name the placeholders.
    """
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=TINY_BASE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    learned, merges = learn_bpe(trainer_tokenizer, trainer, first_id=0)
    vocab = {token: index for index, token in enumerate(learned)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in ADDED_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_processor(dynamic_hd: int = 36) -> Phi4MMProcessor:
    """The real image processor (448-pixel crops, crop limit `dynamic_hd`) with the tiny tokenizer."""
    return Phi4MMProcessor(image_processor=Phi4MMImageProcessor(dynamic_hd=dynamic_hd),
                           tokenizer=build_tiny_tokenizer())


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides):
    """A Phi-4-MM of a few MB with the Hub config's structure: grouped-query attention, partial rotary
    LongRoPE, tied embeddings, a SigLIP vision tower at 448 px / patch 14 and a Conformer audio encoder."""
    from transformers import Phi4MultimodalConfig

    hidden_size, heads = 64, 4
    rotary_half = int(hidden_size // heads * 0.75) // 2
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|end|>")}
    settings = dict(
        vocab_size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * rotary_half, "long_factor": [4.0] * rotary_half},
        sliding_window=262144,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
        # Widths of at least 64 keep every Linear quantisable by bitsandbytes (4-bit blocks of 64).
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=448, patch_size=14, crop_size=448,
                           image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),
        audio_config=dict(hidden_size=64, intermediate_size=128, num_blocks=2, num_attention_heads=4,
                          ext_pw_out_channel=64, depthwise_separable_out_channel=64, nemo_conv_channels=64,
                          audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)),
    )
    settings.update(overrides)
    return Phi4MultimodalConfig(**settings)


def full_size_config(tokenizer: PreTrainedTokenizerFast):
    """The Hub checkpoint's config (phivision/configs/, its 200,064-row vocabulary kept) with `tokenizer`'s token
    ids: a full-size model that the tiny tokenizer drives, for GPU checks of memory and speed."""
    from ..families import known_families

    config = known_families()["phi4_multimodal"].full_size_config()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|end|>")}
    config.bos_token_id = config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = [ids["<|endoftext|>"], ids["<|end|>"]]
    config.vision_config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.audio_config.audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    return config


def adapter_shapes(model: torch.nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Per adapter folder (`ADAPTERS`), the shape of each weight under the Hub's key names: what
    `write_adapters` writes (a meta-device model gives them without allocating anything)."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, name)]
    return {folder: {key: shape for name, module in targets
                     for key, shape in ((f"{name}.lora_A.weight", (settings["r"], module.in_features)),
                                        (f"{name}.lora_B.weight", (module.out_features, settings["r"])))}
            for folder, settings in ADAPTERS.items()}


def write_adapters(model: torch.nn.Module, out_dir: Path, seed: int) -> None:
    """`vision-lora/` and `speech-lora/` as the Hub ships them: a PEFT adapter_config.json and random
    (non-zero, so that applying them changes the logits) weights under the Hub's key names, in the model's dtype,
    drawn on its device (full size: 0.83B weights)."""
    from peft import LoraConfig

    weight = model.get_input_embeddings().weight
    generator = torch.Generator(weight.device).manual_seed(seed + 1)
    for folder, shapes in adapter_shapes(model).items():
        config = LoraConfig(target_modules=LORA_TARGETS, task_type="CAUSAL_LM", **ADAPTERS[folder])
        config.save_pretrained(out_dir / folder)
        weights = {key: (torch.randn(shape, generator=generator, device=weight.device) * 0.02).to(weight.dtype).cpu()
                   for key, shape in shapes.items()}
        save_file(weights, out_dir / folder / "adapter_model.safetensors", metadata={"format": "pt"})


def build_tiny_checkpoint(out_dir: str | Path, dynamic_hd: int = 36, seed: int = 0, full_size: bool = False) -> Path:
    """Writes a random tiny Phi-4-MM (see the module docstring) to `out_dir`.

    `full_size`: the Hub checkpoint's config instead (`full_size_config`: 4.74B parameters and 0.83B in the
    adapters at their real ranks, bf16 as on the Hub, built on the GPU when there is one), with the tiny tokenizer.
    """
    from transformers import Phi4MultimodalForCausalLM

    out_dir = Path(out_dir)
    processor = build_tiny_processor(dynamic_hd)
    config = (full_size_config if full_size else tiny_config)(processor.tokenizer)
    torch.manual_seed(seed)
    if full_size:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Phi4MultimodalForCausalLM(config).to(torch.bfloat16)
    else:
        model = Phi4MultimodalForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id, eos_token_id=processor.stop_token_ids
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    write_adapters(model, out_dir, seed)
    return out_dir
