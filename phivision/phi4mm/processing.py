"""Processor of Phi-4-multimodal: prompts with `<|image_N|>` tags plus images -> the inputs of transformers'
`Phi4MultimodalForCausalLM`, with the interface of `phivision.phi3v.processing.Phi3VProcessor`.

Token ids are those of transformers' `Phi4MultimodalProcessor`: image N becomes `num_img_tokens[N-1]` copies
of the image token (`<|endoftext10|>`, id 200010 in the real model). Our data writes images as `<|image_N|>`
tags (`phivision.chat`); here each tag stands for the image token, which transformers' processor expands.
The chat layout is Phi-4-mini's, without newlines: `<|user|>...<|end|><|assistant|>...<|end|>`.
Saving writes the native layout, so that transformers' own `AutoProcessor` reads the folder too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import cached_file

from ..chat import IMAGE_TAG, STOP_TOKENS, image_tag_problem
from ..files import write_json
from ..processor_parts import TokenCounts, padded_batch, prompts_and_images
from .image_processing import Phi4MMImageProcessor, pad_crops, speech_settings

NATIVE_PROCESSOR_CLASS = "Phi4MultimodalProcessor"
# The model's image inputs, as Phi4MultimodalForCausalLM names its arguments.
IMAGE_INPUTS = ("image_pixel_values", "image_sizes", "image_attention_mask")
# from_pretrained keywords that say where the files are (passed on to every file's lookup).
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")


def _saved_json(name_or_path: str | Path, filename: str, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A JSON file of a local folder or Hub repo ({} when it has none)."""
    path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    return json.loads(Path(path).read_text()) if path else {}


class Phi4MMProcessor(TokenCounts):
    """Wraps a `Phi4MMImageProcessor` and the Phi-4-MM tokenizer.

    Args:
        image_processor: the dynamic-HD image processor.
        tokenizer: the Phi-4-MM tokenizer (fast; its tokenizer.json is used as is). Its `image_token`
            (`<|endoftext10|>` unless it names another) marks where images go.
        chat_template: defaults to the tokenizer's.
        audio_processor: the speech feature extractor's settings (saved back as they were read).
    """

    def __init__(
        self,
        image_processor: Phi4MMImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        audio_processor: dict[str, Any] | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.audio_processor = dict(audio_processor) if audio_processor is not None else speech_settings()
        self.image_token = getattr(tokenizer, "image_token", None) or "<|endoftext10|>"
        image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if not isinstance(image_token_id, int) or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {self.image_token!r}; use the Phi-4-MM tokenizer")
        self.image_token_id = image_token_id

    # ----- loading and saving -----

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "Phi4MMProcessor":
        """Loads a native checkpoint's processor files (processor_config.json, or preprocessor_config.json).
        Image processor keys in `kwargs` (e.g. `dynamic_hd=16`, or `num_crops=16`, the same limit under our
        flag's name) override the saved ones."""
        kwargs.pop("trust_remote_code", None)
        num_crops = kwargs.pop("num_crops", None)
        if num_crops is not None:
            kwargs["dynamic_hd"] = num_crops
        image_keys = set(Phi4MMImageProcessor.valid_kwargs.__annotations__)
        image_kwargs = {k: v for k, v in kwargs.items() if k in image_keys}
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k not in image_keys}
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        nested = _saved_json(pretrained_model_name_or_path, "processor_config.json", hub_kwargs)
        if isinstance(nested.get("image_processor"), dict):
            image_processor = Phi4MMImageProcessor(**{**nested["image_processor"], **image_kwargs})
        else:
            image_processor = Phi4MMImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs,
                                                                   **image_kwargs)
            # The speech settings beside the image ones in the merged file.
            saved = _saved_json(pretrained_model_name_or_path, "preprocessor_config.json", hub_kwargs)
            speech = speech_settings()
            nested["audio_processor"] = {**speech, **{k: v for k, v in saved.items() if k in speech}}
        # Loaded as the fast tokenizer of tokenizer.json: the class its config names may rebuild the pipeline.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs)
        audio = nested.get("audio_processor") if isinstance(nested.get("audio_processor"), dict) else None
        return cls(image_processor, tokenizer, audio_processor=audio)

    def to_dict(self) -> dict[str, Any]:
        """processor_config.json as transformers writes it: the image and audio processors' settings nested."""
        return {
            "audio_processor": dict(sorted(self.audio_processor.items())),
            "image_processor": dict(sorted(self.image_processor.to_dict().items())),
            "processor_class": NATIVE_PROCESSOR_CLASS,
        }

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> list[str]:
        """Writes the tokenizer files, chat_template.jinja, processor_config.json (transformers' layout) and
        preprocessor_config.json (the image and audio settings in one file, as the Hub's native checkpoint
        has them; transformers' image processor and feature extractor each read their keys from it)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.init_kwargs["processor_class"] = NATIVE_PROCESSOR_CLASS
        self.tokenizer.save_pretrained(folder)
        if isinstance(self.chat_template, str):
            (folder / "chat_template.jinja").write_text(self.chat_template)
        processor = self.to_dict()
        write_json(folder / "processor_config.json", processor)
        merged = {**processor["audio_processor"], **processor["image_processor"],
                  "processor_class": NATIVE_PROCESSOR_CLASS}
        write_json(folder / "preprocessor_config.json", dict(sorted(merged.items())))
        return [str(folder / name) for name in ("processor_config.json", "preprocessor_config.json")]

    # ----- the chat layout (phivision.chat.ChatLayout) -----

    def user_turn(self, user: str) -> str:
        """A user turn and the start of the answer: the prompt of one exchange."""
        return f"<|user|>{user}<|end|><|assistant|>"

    def answer_turn(self, assistant: str) -> str:
        """An answer as it follows its `user_turn` (the last answer of a sample also gets <|endoftext|>)."""
        return f"{assistant}<|end|>"

    @property
    def stop_token_ids(self) -> list[int]:
        """Where a chat answer ends: the ids of <|end|> and <|endoftext|>.

        Not `phivision.chat.stop_token_ids`: Phi-4-MM's unk token is <|endoftext|> itself, which that one skips.
        """
        vocab = self.tokenizer.get_vocab()
        return [vocab[token] for token in STOP_TOKENS if token in vocab]

    # ----- text -> ids -----

    def _encode(self, texts: list[str], num_image_tokens: list[Sequence[int]], where: str = "prompt",
                first_image: int = 1) -> list[list[int]]:
        """Ids of texts whose tags `<|image_k|>` for k = first_image.. (checked) stand for images with the given
        token counts: each tag becomes the image token, which is then repeated as often as its image has tokens."""
        marked = []
        for index, (text, counts) in enumerate(zip(texts, num_image_tokens)):
            problem = image_tag_problem(text, len(counts), first_image)
            if problem:
                raise ValueError(f"{where.format(index)}: {problem}. Text: {text[:200]!r}")
            if self.image_token in text:
                raise ValueError(f"{where.format(index)}: write images as <|image_N|> tags, not as "
                                 f"{self.image_token!r}. Text: {text[:200]!r}")
            marked.append(IMAGE_TAG.sub(self.image_token, text))
        rows = self.tokenizer(marked, add_special_tokens=False)["input_ids"] if marked else []
        expanded = []
        for row, counts in zip(rows, num_image_tokens):
            counts = iter(counts)
            ids: list[int] = []
            for token_id in row:
                ids += [token_id] * next(counts) if token_id == self.image_token_id else [token_id]
            expanded.append(ids)
        return expanded

    def encode_prompt(self, text: str, num_image_tokens: Sequence[int]) -> list[int]:
        """Token ids of one prompt whose tags `<|image_1|>`..`<|image_n|>` stand for images with the given
        token counts (see `Phi4MMImageProcessor.num_image_tokens`)."""
        return self._encode([text], [num_image_tokens])[0]

    def turn_prompt_ids(self, prompt: str, num_image_tokens: Sequence[int], first_image: int, index: int) -> list[int]:
        """Ids of a conversation's turn `index` prompt (see `encode_conversation`), its tags numbered from
        `first_image`. No BOS: Phi-4-MM's tokenizer adds none."""
        return self._encode([prompt], [num_image_tokens], where=f"turn {index}", first_image=first_image)[0]

    @staticmethod
    def batch_images(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The image inputs of encoded samples (phivision.collator) as one batch: all their images in sample order,
        crops padded to the largest count as transformers pads them (zero pixels, attention mask of ones);
        empty when there is no image."""
        with_images = [s for s in samples if s.get("image_pixel_values") is not None and len(s["image_pixel_values"])]
        if not with_images:
            return {}
        pixels = [image for s in with_images for image in s["image_pixel_values"]]
        masks = [mask for s in with_images for mask in s["image_attention_mask"]]
        return {
            "image_pixel_values": pad_crops(pixels, fill=0.0, empty_shape=pixels[0].shape[1:]),
            "image_sizes": torch.cat([s["image_sizes"] for s in with_images]),
            "image_attention_mask": pad_crops(masks, fill=1.0, empty_shape=masks[0].shape[1:]),
        }

    # ----- the call -----

    def __call__(
        self,
        text: str | list[str],
        images: Any = None,
        num_crops: int | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Model inputs for one prompt or a batch of prompts, with the arguments of `Phi3VProcessor.__call__`
        (`<|image_N|>` tags numbered from 1 within each prompt); `num_crops` is the crop limit (`dynamic_hd`).

        Returns:
            BatchFeature with `input_ids`, `attention_mask` (0 on padding) and, with images,
            `image_pixel_values`, `image_sizes` and `image_attention_mask` of all images of all prompts in
            prompt order (the names of Phi4MultimodalForCausalLM's arguments).
        """
        texts, per_prompt = prompts_and_images(text, images, padding_side)
        data: dict[str, Any] = {}
        all_images = [image for prompt_images in per_prompt for image in prompt_images]
        counts: list[list[int]] = [[] for _ in texts]
        if all_images:
            features = self.image_processor.preprocess(all_images, num_crops=num_crops)
            data = {name: features[name] for name in IMAGE_INPUTS}
            tokens = iter(features["num_img_tokens"])
            counts = [[next(tokens) for _ in prompt_images] for prompt_images in per_prompt]

        rows = self._encode(texts, counts, where="prompt" if isinstance(text, str) else "prompt {}")
        return padded_batch(rows, self.tokenizer.pad_token_id, padding_side, data, return_tensors)
