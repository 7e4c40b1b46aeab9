"""What the processors of every family share: training conversations as ids and labels, token counts from image
sizes alone, the call's prompts and images checked, and padded batches. Each family's processor (phivision.phi3v.processing, phivision.phi4mm.processing)
builds on these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature

from .chat import images_per_turn, with_image_tags

IGNORE_INDEX = -100  # the label of tokens that are not learned (prompt, image tokens, padding)
END_OF_TEXT = "<|endoftext|>"  # ends the last answer of a training sample


def _image_list(images: Any) -> list:
    """One prompt's images as a list (None or [] for none, a single image, or a list)."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def prompts_and_images(text: str | list[str], images: Any, padding_side: str) -> tuple[list[str], list[list]]:
    """A processor call's prompts and each prompt's images (see `Phi3VProcessor.__call__`), checked."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(text, str):
        return [text], [_image_list(images)]
    texts = list(text)
    if not texts:
        raise ValueError("text is empty: give a prompt or a list of prompts")
    if images is None:
        return texts, [[] for _ in texts]
    if isinstance(images, (list, tuple)) and len(images) == len(texts):
        return texts, [_image_list(entry) for entry in images]
    raise ValueError(
        f"with a list of {len(texts)} prompts, images must be a list of {len(texts)} entries (the "
        "images of each prompt: a list, a single image, or None), got "
        f"{type(images).__name__} of length {len(images) if hasattr(images, '__len__') else '?'}"
    )


def padded_batch(rows: list[list[int]], pad_id: int | None, padding_side: str, image_inputs: dict[str, Any],
                 return_tensors: str | None) -> BatchFeature:
    """`input_ids` and `attention_mask` of token rows padded to the longest on `padding_side`, with the
    batch's image inputs, as a BatchFeature of `return_tensors` ("pt", "np" or None for lists)."""
    longest = max(len(row) for row in rows)
    if pad_id is None and any(len(row) < longest for row in rows):
        raise ValueError("the tokenizer has no pad token to pad the batch with; set tokenizer.pad_token")
    input_ids, attention_mask = [], []
    for row in rows:
        padding = longest - len(row)
        if padding_side == "left":
            input_ids.append([pad_id] * padding + row)
            attention_mask.append([0] * padding + [1] * len(row))
        else:
            input_ids.append(row + [pad_id] * padding)
            attention_mask.append([1] * len(row) + [0] * padding)
    data = {"input_ids": input_ids, "attention_mask": attention_mask, **image_inputs}
    if return_tensors is None:
        return BatchFeature(data)
    if return_tensors == "np":
        data = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    return BatchFeature(data, tensor_type=return_tensors)


class TokenCounts:
    """Training conversations as ids and labels, and token counts from image sizes alone, for a processor with
    `image_processor.num_image_tokens`, `encode_prompt`, `turn_prompt_ids`, `user_turn` and `answer_turn`
    (both families' processors)."""

    def encode_conversation(
        self, turns: Sequence[dict[str, Any]], num_image_tokens: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a training conversation.

        `turns` is a conversation as `phivision.chat` describes it; `num_image_tokens` has one count per image,
        in order. Each turn is its `user_turn` (ids from `turn_prompt_ids`, labels -100) followed by its
        `answer_turn` (tokenised without special tokens, labels = ids); the last answer also ends with
        `<|endoftext|>`, as in both families' reference recipes.
        """
        counts_per_turn = images_per_turn(turns, len(num_image_tokens))
        if END_OF_TEXT not in self.tokenizer.get_vocab():  # (Phi-4-MM's unk token is <|endoftext|> itself)
            raise ValueError(f"the tokenizer has no {END_OF_TEXT} token; use the model's own tokenizer")
        end_of_text = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        input_ids: list[int] = []
        labels: list[int] = []
        first_image = 1
        for index, (turn, count) in enumerate(zip(turns, counts_per_turn)):
            if "user" not in turn or "assistant" not in turn:
                raise ValueError(f"turn {index} needs 'user' and 'assistant' keys, got {sorted(turn)}")
            prompt = self.user_turn(with_image_tags(turn["user"], first_image, count))
            counts = num_image_tokens[first_image - 1 : first_image - 1 + count]
            prompt_ids = self.turn_prompt_ids(prompt, counts, first_image, index)
            answer_ids = self.tokenizer(self.answer_turn(turn["assistant"]), add_special_tokens=False)["input_ids"]
            if index == len(turns) - 1:
                answer_ids = answer_ids + [end_of_text]
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            first_image += count
        return input_ids, labels

    def num_prompt_tokens(self, prompt: str, image_sizes: Sequence[tuple[int, int]], num_crops: int | None = None) -> int:
        """Tokens of a prompt, image tokens included, from its images' (width, height) alone."""
        counts = [self.image_processor.num_image_tokens(w, h, num_crops) for w, h in image_sizes]
        return len(self.encode_prompt(prompt, counts))

    def num_conversation_tokens(
        self, turns: Sequence[dict[str, Any]], image_sizes: Sequence[tuple[int, int]], num_crops: int | None = None
    ) -> int:
        """Tokens of a training sample (prompts, image tokens and answers) from its images' (width, height)
        alone: no pixel work, cheap enough to run over a whole dataset before training."""
        counts = [self.image_processor.num_image_tokens(w, h, num_crops) for w, h in image_sizes]
        return len(self.encode_conversation(turns, counts)[0])
