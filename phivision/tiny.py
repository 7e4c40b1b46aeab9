"""A tiny Phi-3-V for tests and the CPU demo, built offline: tokenizer, processor and model.

    python -m phivision.tiny OUT_DIR [--num_crops 4]   # a few MB in the Hub's on-disk layout
    python -m phivision.tiny OUT_DIR --family phi4mm   # Phi-4-multimodal instead (phivision.phi4mm.tiny)


The tokenizer mirrors the real one's pipeline (tokenizer.json of microsoft/Phi-3.5-vision-instruct):
SentencePiece-style BPE where a normalizer prepends "▁" and turns spaces into "▁", byte fallback,
`<unk>` 0, `<s>` 1, `</s>` 2, the same added tokens with the same strip flags, BOS added to every text,
and the same chat template. Only the vocabulary is small (a few hundred ids), trained on built-in text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .files import tree_follows_umask
from .generation import use_chat_stop_tokens
from .phi3v.configuration import Phi3VConfig
from .phi3v.image_processing import Phi3VImageProcessor
from .phi3v.modeling import Phi3VForCausalLM
from .phi3v.processing import Phi3VProcessor

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)

# (content, rstrip) of the real tokenizer's added tokens, in its id order; its ids start at 32000, ours after
# the base vocabulary. rstrip=True makes e.g. "<|assistant|>\n" swallow the newline, as in the real tokenizer.
ADDED_TOKENS = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", False),
    ("<|end|>", False),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", False),
    ("<|image|>", True),
]

# Base vocabulary: 3 specials + 256 byte-fallback tokens + characters and merges learned from TRAINING_TEXT.
TINY_BASE_VOCAB_SIZE = 400

TRAINING_TEXT = """\
What is shown in this image? The image shows a red square on a white background.
Describe the picture in one sentence. A small dog is sitting on the grass next to a blue ball.
Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery, BabyCrawling.
Answer briefly. Is the statement true or false? The left image contains two cats and the right image one.
Is this meme hateful? No, it is not. Yes, it is. The answer is yes. The answer is no.
Compare the two images. The first one is brighter than the second one, and both have a green tree.
What does the document say about the total amount? The total amount is 42 dollars and 10 cents.
You are a helpful assistant. Please read the text in the image and answer the question.
There are three people in the room: one is reading a book, one is writing, and one is looking at the window.
The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you.
"""


def learn_bpe(
    trainer_tokenizer: Tokenizer, trainer: trainers.BpeTrainer, first_id: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens (ids >= first_id, in id order) and merges that `trainer` learns from TRAINING_TEXT through
    `trainer_tokenizer`'s normalizer and pre-tokenizer (deterministic: same text, same result). Shared by the
    tiny tokenizers of both families, which differ only in that pipeline."""
    trainer_tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    learned = sorted((i, token) for token, i in model["vocab"].items() if i >= first_id)
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    return [token for _, token in learned], merges


def _train_vocab_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """Learn characters and merges from TRAINING_TEXT, SentencePiece-style."""
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Split before every "▁" only while training, so learned tokens never span two words (as in SentencePiece).
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    printable_ascii = [chr(c) for c in range(33, 127)]  # spaces are "▁" by then
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB_SIZE - 256,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=printable_ascii + ["▁"],
        show_progress=False,
    )
    return learn_bpe(trainer_tokenizer, trainer, first_id=3)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A Phi-3-V-style tokenizer with a tiny vocabulary, built offline and deterministically.

    Ids: `<unk>` 0, `<s>` 1, `</s>` 2, bytes `<0x00>`..`<0xFF>` 3-258, learned tokens up to 399, then the
    added tokens (`<|endoftext|>` 400, ..., `<|image|>` 411). bos `<s>`, eos and pad `<|endoftext|>`.
    """
    learned, merges = _train_vocab_and_merges()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token in learned:
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(
        [AddedToken("<unk>", normalized=False, special=True), AddedToken("<s>", normalized=False, special=True)]
    )
    backend.add_tokens([AddedToken("</s>", rstrip=True, normalized=False, special=False)])
    backend.add_special_tokens(
        [AddedToken(content, rstrip=rstrip, normalized=False, special=True) for content, rstrip in ADDED_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        legacy=False,
        model_max_length=131072,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_processor(num_crops: int = 4) -> Phi3VProcessor:
    """The real image processor (HD transform, 336 px crops) with the tiny tokenizer."""
    return Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=num_crops), tokenizer=build_tiny_tokenizer())



def tiny_config(vocab_size: int = 412, **overrides) -> Phi3VConfig:
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
        pad_token_id=400,  # <|endoftext|> of the tiny tokenizer
        img_processor={
            "image_dim_out": 64,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            # Widths of at least 64 keep every Linear quantisable by bitsandbytes (4-bit blocks of 64).
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2},
        },
    )
    settings.update(overrides)
    return Phi3VConfig(**settings)


def build_tiny_checkpoint(out_dir: str | Path, num_crops: int = 4, seed: int = 0, full_size: bool = False) -> Path:
    """Writes a random tiny Phi-3-V (config.json, safetensors, tokenizer, preprocessor) in the Hub layout.

    `full_size`: Phi-3.5-vision-instruct's own config instead (4.15B parameters, bf16 as on the Hub, built
    on the GPU when there is one), with the tiny tokenizer: for GPU checks of memory and speed.
    """
    processor = build_tiny_processor(num_crops=num_crops)
    tokenizer = processor.tokenizer
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("</s>"),
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if full_size:
        hub = json.loads((Path(__file__).resolve().parent / "configs" / "phi-3.5-vision-instruct.json").read_text())
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Phi3VForCausalLM(Phi3VConfig(**{**hub, **ids})).to(torch.bfloat16)
    else:
        model = Phi3VForCausalLM(tiny_config(vocab_size=len(tokenizer), **ids))
    use_chat_stop_tokens(model, processor)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random tiny checkpoint (Phi-3-V or Phi-4-MM) for tests.")
    parser.add_argument("out_dir", help="Directory to write (config.json, model.safetensors, tokenizer, preprocessor).")
    parser.add_argument("--family", choices=("phi3v", "phi4mm"), default="phi3v",
                        help="phi3v: Phi-3.5-vision in the Hub's remote-code layout; phi4mm: Phi-4-multimodal in the "
                             "transformers-native layout (with vision-lora/ and speech-lora/).")
    parser.add_argument("--num_crops", type=int, default=None,
                        help="Crop limit saved in the preprocessor config (phi3v: num_crops, default 4; phi4mm: "
                             "dynamic_hd, default 36).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--full_size", action="store_true",
                        help="The real sizes, for GPU checks: Phi-3.5-vision's (4.15B parameters, 8.3 GB in bf16) or "
                             "Phi-4-multimodal's (5.57B with its two LoRAs, 11 GB in bf16); built on the GPU if any.")
    args = parser.parse_args(argv)
    if args.family == "phi4mm":
        from .phi4mm.tiny import build_tiny_checkpoint as build_phi4mm

        path = build_phi4mm(args.out_dir, 36 if args.num_crops is None else args.num_crops, args.seed,
                            args.full_size)
        name = "Phi-4-MM"
    else:
        path = build_tiny_checkpoint(args.out_dir, 4 if args.num_crops is None else args.num_crops, args.seed,
                                     args.full_size)
        name = "Phi-3-V"
    tree_follows_umask(path)  # safetensors writes its files 0600: a checkpoint others are to read must follow the umask
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"Wrote a tiny random {name} ({size / 1e6:.1f} MB) to {path}")


if __name__ == "__main__":
    main()
