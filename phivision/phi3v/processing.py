"""Processor of Phi-3(.5)-vision: prompts with `<|image_N|>` tags plus images -> model inputs.

Token ids follow the original processor exactly for one prompt: the text is split at the tags, every
piece is tokenised on its own WITH special tokens (so each piece starts with `<s>`), and image N is
stood for by `num_img_tokens` copies of -N. On top of the original this processor batches prompts
(padding left or right) and builds training examples (`encode_conversation`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from ..chat import IMAGE_TAG, ImageTagList, answer_turn, image_tag_problem, stop_token_ids, user_turn
from ..files import write_json
from ..processor_parts import TokenCounts, padded_batch, prompts_and_images
from .image_processing import Phi3VImageProcessor

# tokenizer_config.json keys that transformers 5 writes and transformers 4 does not know (the Hub's file has none).
TRANSFORMERS_5_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only", "name_or_path")
# Keys of the Hub's tokenizer_config.json that a transformers 5 tokenizer built in memory may lack, at the Hub's values.
HUB_TOKENIZER_DEFAULTS = {"legacy": False, "sp_model_kwargs": {}, "use_default_system_prompt": False}


class Phi3VProcessor(TokenCounts, ProcessorMixin):
    """Wraps a `Phi3VImageProcessor` and the Phi-3-V tokenizer.

    Args:
        image_processor: the HD-transform image processor.
        tokenizer: the Phi-3-V tokenizer (fast; its tokenizer.json is used as is).
        chat_template: defaults to the tokenizer's.
    """

    def __init__(
        self,
        image_processor: Phi3VImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
    ) -> None:
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        # Saving writes the tokenizer's auto_map from the image processor's (one source, see phivision.phi3v.remote_code).
        tokenizer.init_kwargs.pop("auto_map", None)

    # ----- loading and saving -----

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Load our own classes rather than going through the Auto classes: the Hub files name remote code
        # (auto_map) and "LlamaTokenizer", whose transformers 5 class re-creates the pre-tokenizer and gives
        # other ids than the tokenizer.json (a leading "▁" before "\n" and after "<|end|>" goes missing).
        kwargs.pop("trust_remote_code", None)
        image_processor = Phi3VImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        image_keys = Phi3VImageProcessor.valid_kwargs.__annotations__
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k not in image_keys}
        tokenizer = PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs)
        return [image_processor, tokenizer]

    def to_dict(self) -> dict[str, Any]:
        """processor_config.json in the Hub form: the image processor goes to its own preprocessor_config.json."""
        output = super().to_dict()
        output.pop("image_processor", None)
        output["auto_map"] = self._processor_auto_map()
        return output

    def _processor_auto_map(self) -> dict[str, str]:
        """The Hub's AutoProcessor entry, as the image processor records it (with its Hub repo)."""
        return {"AutoProcessor": self.image_processor.to_dict()["auto_map"]["AutoProcessor"]}

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write tokenizer files, processor_config.json, chat_template.jinja and preprocessor_config.json.

        Every file is in the Hub's form, so that the original remote code (transformers 4.x, vLLM) reads the
        folder too: `auto_map` entries name the Hub repo of that code, and tokenizer_config.json has the
        Hub's keys (see `hub_tokenizer_config`).
        """
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        write_json(config_file, self.hub_tokenizer_config(json.loads(config_file.read_text())))
        return files + self.image_processor.save_pretrained(save_directory)

    def hub_tokenizer_config(self, written: dict[str, Any]) -> dict[str, Any]:
        """The tokenizer_config.json transformers 5 wrote, in the form of the Hub's (which transformers 4.x reads).

        transformers 5 writes its own class name ("TokenizersBackend"), the extra special tokens as a list
        under `extra_special_tokens` (later transformers 4.x expect a dict there: 4.49 fails), keys of its own, and
        no `added_tokens_decoder`, BOS/EOS flags or chat template (the template goes to chat_template.jinja,
        which transformers 4.4x does not read). The Hub file says "LlamaTokenizer" (loaded as the fast tokenizer
        from tokenizer.json there, and by our from_pretrained here) and has all of those.
        """
        config = {key: value for key, value in written.items() if key not in TRANSFORMERS_5_TOKENIZER_KEYS}
        extra = config.pop("extra_special_tokens", None)
        if isinstance(extra, dict):
            config["extra_special_tokens"] = extra  # named special tokens: the same form in transformers 4
        else:
            config["additional_special_tokens"] = list(extra or [])
        tokenizer = self.tokenizer
        ids = tokenizer("a")["input_ids"]
        config["add_bos_token"] = ids[:1] == [tokenizer.bos_token_id]
        config["add_eos_token"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
        config["added_tokens_decoder"] = {
            str(index): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                         "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            for index, token in sorted(tokenizer.added_tokens_decoder.items())
        }
        chat_template = self.chat_template or tokenizer.chat_template
        if isinstance(chat_template, str):
            config["chat_template"] = chat_template
        config["auto_map"] = self._processor_auto_map()
        config["tokenizer_class"] = "LlamaTokenizer"
        for key, value in HUB_TOKENIZER_DEFAULTS.items():
            config.setdefault(key, value)
        return dict(sorted(config.items()))

    # ----- what serving runtimes call on the original processor -----

    @property
    def img_tokens(self) -> ImageTagList:
        """The image tags `<|image_1|>`, `<|image_2|>`, ... (vLLM finds an image's place in a prompt by them)."""
        return ImageTagList()

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """Placeholder tokens of an image of `width` x `height` at the image processor's num_crops."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    # ----- text -> ids -----

    def _split_at_tags(self, text: str, num_images: int, first_image: int = 1, where: str = "prompt") -> list[str]:
        """Text pieces between the image tags, after checking the tags are first_image, first_image+1, ..."""
        problem = image_tag_problem(text, num_images, first_image)
        if problem:
            raise ValueError(f"{where}: {problem}. Text: {text[:200]!r}")
        return IMAGE_TAG.split(text)[::2]

    def _join(self, piece_ids: list[list[int]], num_image_tokens: Sequence[int], first_image: int) -> list[int]:
        ids = list(piece_ids[0])
        for k, (count, piece) in enumerate(zip(num_image_tokens, piece_ids[1:])):
            ids += [-(first_image + k)] * count + piece
        return ids

    def _encode(self, pieces: list[list[str]], num_image_tokens: list[Sequence[int]], first_image: int = 1):
        # One tokenizer call for all pieces of all prompts: each piece gets its own <s>, as in the original.
        flat = [piece for prompt_pieces in pieces for piece in prompt_pieces]
        flat_ids = iter(self.tokenizer(flat, add_special_tokens=True)["input_ids"]) if flat else iter([])
        return [
            self._join([next(flat_ids) for _ in prompt_pieces], counts, first_image)
            for prompt_pieces, counts in zip(pieces, num_image_tokens)
        ]

    def encode_prompt(self, text: str, num_image_tokens: Sequence[int]) -> list[int]:
        """Token ids of one prompt whose tags `<|image_1|>`..`<|image_n|>` stand for images with the given
        token counts (see `Phi3VImageProcessor.num_image_tokens`). Image k becomes that many ids -k."""
        pieces = self._split_at_tags(text, len(num_image_tokens))
        return self._encode([pieces], [num_image_tokens])[0]

    # ----- the chat layout (phivision.chat.ChatLayout) -----

    def user_turn(self, user: str) -> str:
        return user_turn(user)

    def answer_turn(self, assistant: str) -> str:
        return answer_turn(assistant)

    @property
    def stop_token_ids(self) -> list[int]:
        """Where a chat answer ends: the ids of <|end|> and <|endoftext|>."""
        return stop_token_ids(self.tokenizer)

    def turn_prompt_ids(self, prompt: str, num_image_tokens: Sequence[int], first_image: int, index: int) -> list[int]:
        """Ids of a conversation's turn `index` prompt (see `encode_conversation`): encoded as a prompt, its tags
        numbered from `first_image`; only the first turn starts with BOS."""
        pieces = self._split_at_tags(prompt, len(num_image_tokens), first_image, where=f"turn {index}")
        prompt_ids = self._encode([pieces], [num_image_tokens], first_image)[0]
        if index > 0 and prompt_ids[:1] == [self.tokenizer.bos_token_id]:
            # A follow-up turn continues the same text at inference (one BOS at the start), so no BOS here.
            prompt_ids = prompt_ids[1:]
        return prompt_ids

    @staticmethod
    def batch_images(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The image inputs of encoded samples (phivision.collator) as one batch: `pixel_values` and `image_sizes`
        of all their images in sample order, or their cached `image_features` (phivision.training.vision_cache);
        empty when there is no image."""
        batch = {}
        for name in ("pixel_values", "image_sizes", "image_features"):
            parts = [s[name] for s in samples if s.get(name) is not None]
            if parts:
                batch[name] = torch.cat(parts)
        return batch

    # ----- the call -----

    def __call__(
        self,
        text: str | list[str],
        images: Any = None,
        num_crops: int | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Model inputs for one prompt or a batch of prompts.

        Args:
            text: a prompt, or a list of prompts. Images are referenced as `<|image_1|>`..`<|image_n|>`,
                numbered from 1 within each prompt, each once, in order.
            images: for one prompt, an image or a list of images; for a list of prompts, one entry per
                prompt (a list of images, a single image, or None / [] for text-only prompts).
            num_crops: crops per image; defaults to the image processor's.
            padding_side: "left" (generation) or "right" (training), for batches of unequal length.
            return_tensors: "pt" (default), "np", or None for lists.

        Returns:
            BatchFeature with `input_ids` (image positions hold -k for image k), `attention_mask` (0 on
            padding) and, with images, `pixel_values` and `image_sizes` of all images of all prompts in
            prompt order.
        """
        texts, per_prompt = prompts_and_images(text, images, padding_side)

        where = "prompt" if isinstance(text, str) else "prompt {}"
        pieces = [
            self._split_at_tags(prompt, len(prompt_images), where=where.format(index))
            for index, (prompt, prompt_images) in enumerate(zip(texts, per_prompt))
        ]

        data: dict[str, Any] = {}
        all_images = [image for prompt_images in per_prompt for image in prompt_images]
        counts: list[list[int]] = [[] for _ in texts]
        if all_images:
            features = self.image_processor.preprocess(all_images, num_crops=num_crops)
            data["pixel_values"] = features["pixel_values"]
            data["image_sizes"] = features["image_sizes"]
            tokens = iter(features["num_img_tokens"])
            counts = [[next(tokens) for _ in prompt_images] for prompt_images in per_prompt]

        rows = self._encode(pieces, counts)
        return padded_batch(rows, self.tokenizer.pad_token_id, padding_side, data, return_tensors)
