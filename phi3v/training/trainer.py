"""What the Trainer iterates over and in which order: rows within the token budget, length-grouped
batches that respect LongRoPE's switch, and the Trainer that uses them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..chat import FormatExample
from ..data.hub import sizes_only
from ..distributed import is_main_process
from ..modeling import longrope_limit
from ..processing import Phi3VProcessor
from .progress import LossProgressCallback

LENGTH_BUCKET = 64  # tokens; granularity of length-grouped batching


def filter_by_length(
    rows: Sequence[Any],
    format_example: FormatExample,
    processor: Phi3VProcessor,
    num_crops: int,
    max_seq_length: int | None,
    disable_tqdm: bool = False,
) -> tuple[list[int], list[int]]:
    """Indices of the rows within the token budget, and the token count of each kept row.

    Over-long rows are skipped (never truncated: a truncated sample can lose its whole answer
    and train on nothing), with a count printed once.
    """
    kept, lengths = [], []
    headers = sizes_only(rows)  # image sizes from file headers: no pixel decoding for a whole dataset
    for index in tqdm(range(len(rows)), desc="Counting tokens", disable=disable_tqdm or not is_main_process()):
        conversation, images = format_example(headers[index])
        n = processor.num_conversation_tokens(conversation, [image.size for image in images], num_crops)
        if max_seq_length is None or n <= max_seq_length:
            kept.append(index)
            lengths.append(n)
    skipped = len(rows) - len(kept)
    if is_main_process():
        longest = max(lengths, default=0)
        print(f"Training samples: {len(kept)} kept, {skipped} skipped as longer than --max_seq_length "
              f"{max_seq_length}; longest kept {longest} tokens, mean {sum(lengths) / max(len(lengths), 1):.0f}")
    if not kept:
        raise ValueError(f"No training sample fits --max_seq_length {max_seq_length}")
    return kept, lengths


class RowsDataset(torch.utils.data.Dataset):
    """The rows the Trainer iterates over (a view of a subset of the task's rows), with their token counts."""

    def __init__(self, rows: Sequence[Any], indices: list[int], lengths: list[int] | None = None):
        self.rows, self.indices, self.lengths = rows, indices, lengths

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.rows[self.indices[i]]


def length_buckets(lengths: list[int]) -> list[int]:
    """Token counts rounded up to LENGTH_BUCKET, the lengths that length grouping sorts by.

    Samples that differ by a few tokens stay in random order: exact lengths would sort by answer
    length, i.e. often by the answer itself ("no" < "yes"), and fill whole batches with one class.
    """
    return [-(-n // LENGTH_BUCKET) * LENGTH_BUCKET for n in lengths]


class LongRopeSidesSampler(torch.utils.data.Sampler):
    """Batches that stay on one side of LongRoPE's switch, for data with samples on both sides.

    LongRoPE gives a whole batch its long factors when its longest sample passes `limit` tokens
    (padded or packed alike), so a shorter sample batched with it would train with other factors
    than it gets at inference. Each side is ordered on its own (length-grouped or random) and cut
    into batches of `batch_size` (per device, as the DataLoader cuts them); the batches are then
    shuffled together, the one with the longest sample first so that running out of memory shows
    at once. Only the last batch of an epoch can mix the two sides' leftovers.
    """

    def __init__(self, lengths: list[int], limit: int, batch_size: int, grouped: bool, group_size: int):
        self.lengths, self.limit, self.batch_size, self.grouped, self.group_size = lengths, limit, batch_size, grouped, group_size

    def __len__(self) -> int:
        return len(self.lengths)

    def _order(self, pool: list[int]) -> list[int]:
        if not self.grouped:
            return [pool[i] for i in torch.randperm(len(pool)).tolist()]
        buckets = length_buckets([self.lengths[i] for i in pool])
        return [pool[i] for i in LengthGroupedSampler(self.group_size, lengths=buckets)]

    def __iter__(self):
        batches, leftovers = [], []
        for long in (False, True):
            order = self._order([i for i, n in enumerate(self.lengths) if (n > self.limit) == long])
            full = len(order) - len(order) % self.batch_size
            batches += [order[k : k + self.batch_size] for k in range(0, full, self.batch_size)]
            leftovers += order[full:]
        batches = [batches[i] for i in torch.randperm(len(batches)).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return iter([i for batch in batches for i in batch] + leftovers)


class Phi3VTrainer(Trainer):
    """Trainer whose sample order uses the token counts measured at start (image tokens included).

    transformers' own grouping would read `len(row["input_ids"])`, which our raw rows don't have,
    and knows nothing of LongRoPE's switch (see LongRopeSidesSampler). Its progress bar shows the
    last loss (`LossProgressCallback`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback):  # none with --disable_tqdm
            self.add_callback(LossProgressCallback)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        grouped = self.args.train_sampling_strategy == "group_by_length"
        group_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        limit = longrope_limit(self.model)
        if limit is not None and min(lengths) <= limit < max(lengths):
            return LongRopeSidesSampler(lengths, limit, self._train_batch_size, grouped, group_size)
        if grouped:
            return LengthGroupedSampler(group_size, lengths=length_buckets(lengths))
        return super()._get_train_sampler(train_dataset)
