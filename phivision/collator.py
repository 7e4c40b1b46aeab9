"""Training batches: rows -> (via the recipe's `format_example`, see `phivision.chat`) padded or packed
input_ids, labels and pixel values."""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .chat import FormatExample

BatchImages = Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]


class DataCollator:
    """Encodes a list of dataset rows into a training batch: right-padded, or packed.

    Labels are -100 over the prompt, the image tokens and the padding, so only answer tokens
    are learned. Rows without images can share a batch with rows that have them. With
    `packing`, the rows are concatenated into one sequence with no padding at all.
    """

    def __init__(self, processor, format_example: FormatExample, num_crops: int, packing: bool = False):
        self.processor = processor
        self.format_example = format_example
        self.num_crops = num_crops
        self.packing = packing

    def encode(self, row: Any) -> dict[str, Any]:
        """One row -> input_ids, labels (lists) and its images' model inputs (pixel values, sizes... as the
        processor names them; none for a text-only row)."""
        conversation, images = self.format_example(row)
        image_inputs, image_tokens = self.encode_images(images)
        input_ids, labels = self.processor.encode_conversation(conversation, image_tokens)
        return {"input_ids": input_ids, "labels": labels, **image_inputs}

    def encode_images(self, images: Sequence[Any]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """A row's images -> their model inputs (none for a text-only row) and each image's token count."""
        if not images:
            return {}, []
        processed = self.processor.image_processor.preprocess(images, num_crops=self.num_crops, return_tensors="pt")
        image_tokens = list(processed.pop("num_img_tokens"))
        return dict(processed), image_tokens

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(row) for row in rows])

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A batch of encoded samples (`encode`'s output); the unreadable rows they replaced go along as
        "bad_samples" (see phivision.training.trainer.TrainingSamples)."""
        batch_images = self.processor.batch_images
        batch = (pack_batch(samples, batch_images) if self.packing
                 else pad_batch(samples, self.processor.tokenizer.pad_token_id, batch_images))
        bad = [where for sample in samples for where in sample.get("bad_samples", [])]
        return {**batch, "bad_samples": bad} if bad else batch


def pad_batch(samples: list[dict[str, Any]], pad_token_id: int, batch_images: BatchImages) -> dict[str, torch.Tensor]:
    """Right-pads encoded samples into one batch; images of all samples in sample order (`batch_images`: the
    processor's)."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[i, :n] = torch.tensor(sample["input_ids"])
        labels[i, :n] = torch.tensor(sample["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **batch_images(samples)}


def pack_batch(samples: list[dict[str, Any]], batch_images: BatchImages) -> dict[str, Any]:
    """Concatenates encoded samples into one row of shape [1, total tokens], with no padding.

    Position ids restart at 0 for every sample and no attention mask is passed: transformers
    then keeps the samples apart (block-diagonal causal masks with SDPA/eager, variable-length
    kernels with flash attention). The sample boundaries go along as `cu_seq_lens_q/k` and
    `max_length_q/k`, so flash attention and "sdpa_packed" read them instead of deriving them
    from the position ids in every layer (a GPU-to-host sync per layer). Each sample starts
    with a prompt token (label -100), so no sample learns to predict the next one.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return {
        "input_ids": torch.tensor([[t for s in samples for t in s["input_ids"]]]),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        "labels": torch.tensor([[t for s in samples for t in s["labels"]]]),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        **batch_images(samples),
    }
