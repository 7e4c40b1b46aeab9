"""What the Trainer iterates over and in which order: rows within the token budget, length-grouped
batches that respect LongRoPE's switch, and the Trainer that uses them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import rotate_checkpoints

from ..chat import FormatExample
from ..data.hub import sizes_only
from ..data.rows import UNREADABLE, describe_error, row_location
from ..distributed import is_main_process
from ..errors import SetupError
from ..families import Processor, family_of_model
from ..images import upright_size
from ..phi3v.modeling import longrope_limit
from ..files import tree_follows_umask
from .checkpoints import mark_complete
from .progress import LossProgressCallback
from .stopping import WorkersIgnoreStopSignals
from .vision_cache import VisionFeatureCache

LENGTH_BUCKET = 64  # tokens; granularity of length-grouped batching


@dataclass
class TrainingRows:
    """The rows that train: their indices in the task's rows, their token counts, and the unreadable ones."""

    indices: list[int]
    lengths: list[int]
    unreadable: list[str]


def filter_by_length(
    rows: Sequence[Any],
    format_example: FormatExample,
    processor: Processor,
    num_crops: int,
    max_seq_length: int | None,
    disable_tqdm: bool = False,
    limit: int | None = None,
    label: str = "Training samples",
) -> TrainingRows:
    """The rows (of the first `limit`) within the token budget, with their token counts.

    Over-long rows are skipped (never truncated: a truncated sample can lose its whole answer
    and train on nothing), with a count printed once. A row whose image cannot even be opened is
    named and skipped too.
    """
    kept, lengths, unreadable = [], [], []
    headers = sizes_only(rows)  # image sizes from file headers: no pixel decoding for a whole dataset
    count = len(rows) if limit is None else min(limit, len(rows))
    for index in tqdm(range(count), desc="Counting tokens", disable=disable_tqdm or not is_main_process()):
        try:
            conversation, images = format_example(headers[index])
            n = processor.num_conversation_tokens(conversation, [upright_size(image) for image in images], num_crops)
        except UNREADABLE as e:
            unreadable.append(f"{row_location(rows, index)}: {describe_error(e)}")
            continue
        if max_seq_length is None or n <= max_seq_length:
            kept.append(index)
            lengths.append(n)
    if count == 0:
        raise SetupError("there are no training rows")
    if is_main_process():
        longest = max(lengths, default=0)
        skipped = count - len(kept) - len(unreadable)
        print(f"{label}: {len(kept)} kept, {skipped} skipped as longer than --max_seq_length "
              f"{max_seq_length}; longest kept {longest} tokens, mean {sum(lengths) / max(len(lengths), 1):.0f}")
        for where in unreadable:
            print(f"  unreadable, skipped: {where}")
    if not kept:
        raise SetupError(f"no training sample fits --max_seq_length {max_seq_length}" if not unreadable
                         else f"no training sample is readable and fits --max_seq_length {max_seq_length}")
    return TrainingRows(kept, lengths, unreadable)


class TrainingSamples(torch.utils.data.Dataset):
    """The samples the Trainer iterates over: a subset of the task's rows, with their token counts.

    With `encode` (the collator's), an item is the encoded sample, with its image features from
    `features` when given (a VisionFeatureCache, --cache_vision_features, or anything whose `attach(index, sample)` adds
    a row's stored inputs: preference tuning's reference log-probs). A row that fails to decode (a
    truncated image, a broken Hub row) is named in the next good sample's "bad_samples", which
    replaces it: batches keep their size, so every process keeps running the same steps.
    """

    def __init__(self, rows: Sequence[Any], indices: list[int], lengths: list[int] | None = None,
                 encode: Callable[[Any], dict] | None = None, features: VisionFeatureCache | None = None):
        self.rows, self.indices, self.lengths, self.encode, self.features = rows, indices, lengths, encode, features

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)  # also ends iteration over the dataset
        if self.encode is None:
            return self.rows[self.indices[i]]
        bad = []
        for j in range(i, i + len(self)):
            index = self.indices[j % len(self)]
            try:
                sample = self.encode(self.rows[index])
            except UNREADABLE as e:
                bad.append(f"{row_location(self.rows, index)}: {describe_error(e)}")
                continue
            if self.features is not None:
                sample = self.features.attach(index, sample)
            return {**sample, "bad_samples": bad}
        raise SetupError(f"none of the {len(self)} training samples can be read: " + "; ".join(bad[:3]))


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


class RecipeTrainer(Trainer):
    """The Trainer, with what a long run on images needs.

    - Sample order from the token counts measured at start (image tokens included): transformers'
      own grouping would read `len(row["input_ids"])`, which our raw rows don't have, and knows
      nothing of LongRoPE's switch (see LongRopeSidesSampler).
    - Checkpoints marked complete once every process has written its part, and only then are older
      ones deleted (see phivision.training.checkpoints).
    - Unreadable samples that batches report ("bad_samples") collected in `bad_samples`, each once.
    - Under ZeRO-1/2 only the saving process builds the state dict to save.
    - A progress bar that shows the last loss (`LossProgressCallback`).
    - DataLoader workers that leave SIGTERM / SIGINT to the main process (see phivision.training.stopping).
    - Evaluations during training (--eval_strategy) that log the task metric (`task_metric(model)`, an
      evaluation summary) as eval_<metric> beside eval_loss, so --metric_for_best_model can name it.
    - The model family's own training loss where it has one (Phi-4-MM: logits at answer positions only), and
      a full model saved whole: what training left out (Phi-4-MM's speech encoder) comes back from
      `base_checkpoint` (see phivision.families).
    """

    def __init__(self, *args, task_metric: Callable[[torch.nn.Module], dict] | None = None,
                 base_checkpoint: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_metric = task_metric
        self.family = family_of_model(self.model)
        self.base_checkpoint = base_checkpoint
        self.bad_samples: list[str] = []
        if self.pop_callback(ProgressCallback):  # none with --disable_tqdm
            self.add_callback(LossProgressCallback)

    def _get_dataloader(self, *args, **kwargs):
        loader = super()._get_dataloader(*args, **kwargs)
        inner = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the DataLoader it holds
        if not isinstance(inner.worker_init_fn, WorkersIgnoreStopSignals):  # a cached (persistent) one is already
            inner.worker_init_fn = WorkersIgnoreStopSignals(inner.worker_init_fn)
        return loader

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

    def _get_eval_sampler(self, eval_dataset):
        return torch.utils.data.SequentialSampler(eval_dataset)  # the loss only: order makes no difference

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.task_metric is not None:
            summary = self.task_metric(self.model)
            if summary["score"] is not None:  # metric "none" scores nothing
                output.metrics[f"{metric_key_prefix}_{summary['metric']}"] = summary["score"]
        return output

    def collect_bad_samples(self, inputs: dict[str, Any]) -> None:
        """Takes the unreadable rows a batch reports ("bad_samples") out of it, into `bad_samples` (each once)."""
        for where in inputs.pop("bad_samples", []):
            if where not in self.bad_samples:
                self.bad_samples.append(where)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        self.collect_bad_samples(inputs)
        loss = None if return_outputs else self.family.training_loss(model, inputs, num_items_in_batch)
        if loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As the Trainer does for a model that takes num_items_in_batch: the count is over every process, and
            # DDP / DeepSpeed average the gradients over them.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.base_checkpoint is not None and not hasattr(model, "peft_config") and self.args.should_save:
            # A full model: what training left out of it (Phi-4-MM's speech encoder) goes back in, from the base.
            state_dict = self.family.state_dict_to_save(
                state_dict if state_dict is not None else model.state_dict(), self.base_checkpoint)
            # Under ZeRO-1/2 accelerate clones each weight apart, and save_pretrained finds tied weights by their
            # shared storage: Phi-4-MM's lm_head (tied to embed_tokens) would be written as a second copy (1.2 GB
            # at full size). Loading ties it again.
            tied = getattr(model, "all_tied_weights_keys", None) or {}
            state_dict = {name: tensor for name, tensor in state_dict.items()
                          if not (name in tied and tied[name] in state_dict)}
        super()._save(output_dir, state_dict)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under ZeRO-1/2 every rank holds the whole 16-bit model, and transformers would copy its state dict to
        # host memory on every rank (8 GB each at full size) although only the saving rank writes it.
        # ZeRO-3 gathers the weights with every rank taking part, so all of them go on.
        stage = self.deepspeed.config.get("zero_optimization", {}).get("stage", 0) if self.is_deepspeed_enabled else None
        if stage is not None and stage < 3 and not self.args.should_save:
            return
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # checkpoints come here too
            tree_follows_umask(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate below, once it is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files (DeepSpeed shards, RNG states) are written
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            mark_complete(Path(run_dir) / f"checkpoint-{self.state.global_step}")
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
