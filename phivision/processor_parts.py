"""What the processors of every family share: token counts from image sizes alone, the call's prompts and images
checked, and padded batches. Each family's processor (phivision.phi3v.processing, phivision.phi4mm.processing)
builds on these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature

IGNORE_INDEX = -100  # the label of tokens that are not learned (prompt, image tokens, padding)


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
    """Token counts from image sizes alone, for a processor with `image_processor.num_image_tokens`,
    `encode_prompt` and `encode_conversation` (both families' processors)."""

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
