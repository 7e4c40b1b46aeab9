"""Preference tuning (DPO): the loss, the batches of chosen and rejected answers, the trainer, the reference model.

A preference row is a recipe row whose last turn carries the chosen answer as "assistant" and the rejected one
as "rejected" (phivision.data.preference). A batch of B pairs is ONE forward pass over 2B sequences: the chosen
ones, then the rejected ones, each pair's images given twice (`PreferenceCollator`; the model family's
`pair_answer_logps` may run them through the vision tower once). A sequence's log-prob is the sum over its answer
tokens (labels != -100), taken from the logits at answer positions only; packed batches are split by sample.

The loss follows TRL's DPOTrainer (`dpo_loss`, `concatenated_forward`):

    logits  = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    sigmoid: -log sigmoid(beta * logits)                            (DPO, Rafailov et al. 2023, eq. 7)
    ipo:     (logits - 1 / (2 * beta)) ** 2, on log-probs averaged over each answer's tokens  (Azar et al., eq. 17)
    rpo:     + rpo_alpha * the chosen answers' mean token NLL       (Pang et al. 2024)
    rewards/chosen = beta * (policy_chosen - reference_chosen), rewards/rejected likewise,
    rewards/margins = chosen - rejected, rewards/accuracies = share of pairs with chosen > rejected.

The reference model is the model training started from. With a new LoRA adapter it is the base with the adapter
disabled (`disable_adapter()` under no_grad: no second copy). Otherwise (full fine-tuning, frozen vision,
Phi-4-MM's --continue_vision_lora, where disabling the adapter would also drop the shipped vision LoRA) the
reference log-probs of every training pair are computed once before training, each process its share, and kept
in output_dir/reference_logps.json: a resumed run reuses them, and a step needs no second model in memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transformers.integrations import is_deepspeed_zero3_enabled

from ..chat import FormatExample
from ..collator import DataCollator
from ..data.preference import REJECTED, rejected_conversation
from ..data.rows import UNREADABLE
from ..distributed import gather_lists, is_main_process, print_once, rank_and_world_size
from ..families import Processor, family_of_model
from ..files import write_json
from .arguments import FlagError, RecipeArguments
from .recipe import Objective, on_training_device
from .trainer import RecipeTrainer, TrainingRows

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_FILE = "reference_logps.json"  # the training pairs' reference log-probs, in output_dir
EVAL_REFERENCE_FILE = "eval_reference_logps.json"  # the evaluation pairs', recorded before training


@dataclass
class PreferenceLoss:
    """The preference loss's settings (--beta, --loss_type, --rpo_alpha)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    rpo_alpha: float | None = None


def longer_answer(format_example: FormatExample, tokenizer: Any) -> FormatExample:
    """`format_example` whose last answer is the longer (in tokens) of the chosen and rejected ones: a pair's
    token count, for --max_seq_length and length grouping, is that of its longer sequence."""

    def format_longer(row: Any):
        conversation, images = format_example(row)
        last = conversation[-1]
        lengths = [len(tokenizer(answer, add_special_tokens=False)["input_ids"])
                   for answer in (last["assistant"], last[REJECTED])]
        return (rejected_conversation(conversation) if lengths[1] > lengths[0] else conversation), images

    return format_longer


class PreferenceCollator(DataCollator):
    """Pairs -> one batch of 2B sequences: the chosen ones (rows 0..B-1), then the rejected ones (B..2B-1), padded or
    packed; each pair's images are encoded once and given to both of its sequences. Stored reference log-probs
    (a sample's "reference_logps": [chosen, rejected]) go along as "reference_logps" [2B]."""

    def encode(self, row: Any) -> dict[str, Any]:
        """One pair -> the chosen sequence's input_ids and labels, the rejected one's as rejected_input_ids and
        rejected_labels, and the images' model inputs."""
        conversation, images = self.format_example(row)
        image_inputs, image_tokens = self.encode_images(images)
        input_ids, labels = self.processor.encode_conversation(conversation, image_tokens)
        rejected_ids, rejected_labels = self.processor.encode_conversation(rejected_conversation(conversation),
                                                                           image_tokens)
        return {"input_ids": input_ids, "labels": labels, "rejected_input_ids": rejected_ids,
                "rejected_labels": rejected_labels, **image_inputs}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pair_keys = ("rejected_input_ids", "rejected_labels", "reference_logps")
        chosen = [{key: value for key, value in s.items() if key not in pair_keys} for s in samples]
        rejected = [{**{key: value for key, value in c.items() if key != "bad_samples"},
                     "input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"]}
                    for c, s in zip(chosen, samples)]
        batch = super().collate(chosen + rejected)
        if all("reference_logps" in s for s in samples):
            batch["reference_logps"] = torch.tensor([s["reference_logps"][k] for k in (0, 1) for s in samples],
                                                    dtype=torch.float64)
        return batch


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, answer token count) of each sequence of a batch, from the family's `answer_logps`.

    A padded batch's sequences are its rows; a packed one's (one row) are its samples, cut at `cu_seq_lens_q`.
    """
    if "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].to(positions.device)
        # The token position p + 1 that position p predicts belongs to the sample whose span holds it.
        sample = torch.searchsorted(bounds[1:], positions + 1, right=True)
        count = len(bounds) - 1
        sums = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device)
        tokens = torch.zeros(count, dtype=torch.long, device=token_logps.device)
        return sums.index_add(0, sample, token_logps[0]), tokens.index_add(0, sample, mask[0].long())
    return token_logps.sum(dim=1), mask.sum(dim=1)


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, settings: PreferenceLoss
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over B pairs and the metrics to log (TRL's names), from [2B] summed log-probs of the policy
    and the reference (chosen first, then rejected) and the [2B] answer token counts."""
    pairs = len(policy) // 2
    # In float64: the sums are tens to hundreds (nats), and their differences are what matters.
    policy, reference = policy.double(), reference.double()
    rpo_nll = -policy[:pairs].sum() / tokens[:pairs].sum().clamp(min=1)  # the chosen answers' mean token NLL
    if settings.loss_type == "ipo":  # IPO compares log-probs averaged over the answer tokens (TRL, IPO paper)
        policy, reference = policy / tokens.clamp(min=1), reference / tokens.clamp(min=1)
    chosen_ratio = policy[:pairs] - reference[:pairs]
    rejected_ratio = policy[pairs:] - reference[pairs:]
    logits = chosen_ratio - rejected_ratio
    if settings.loss_type == "ipo":
        losses = (logits - 1 / (2 * settings.beta)) ** 2
    else:
        losses = -F.logsigmoid(settings.beta * logits)
    loss = losses.mean()
    if settings.rpo_alpha is not None:
        loss = loss + settings.rpo_alpha * rpo_nll
    chosen_rewards = settings.beta * chosen_ratio.detach()
    rejected_rewards = settings.beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy[:pairs].detach().mean(),
        "logps/rejected": policy[pairs:].detach().mean(),
    }
    if settings.rpo_alpha is not None:
        metrics["nll_loss"] = rpo_nll.detach()
    return loss.float(), metrics


def pair_logps(family: Any, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] summed answer log-probs and answer token counts of a collated pair batch, through the family's hook."""
    inputs = {key: value for key, value in batch.items() if key not in ("bad_samples", "reference_logps")}
    token_logps, mask, positions = family.pair_answer_logps(model, inputs)
    return sequence_logps(token_logps, mask, positions, inputs)


class PreferenceTrainer(RecipeTrainer):
    """The RecipeTrainer (its sample order, checkpoints, stop signals, bad samples) with the preference loss.

    The reference log-probs come with the batch ("reference_logps", stored before training) or, without them, from
    the model with its LoRA adapter disabled. The metrics of each step are averaged over the steps since the last
    log and over the processes, and logged beside the loss.
    """

    def __init__(self, *args, preference: PreferenceLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference = preference
        # The loss is a mean over the batch's pairs: the Trainer divides it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._metric_sums: dict[str, torch.Tensor] = {}  # kept on the device: no host sync until a log
        self._metric_steps = 0

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        self.collect_bad_samples(inputs)
        stored = inputs.pop("reference_logps", None)
        # Under the autocast accelerate gives the model's forward: the family's hook may run part of the model
        # (the vision tower) outside it.
        with self.accelerator.autocast():
            policy, tokens = pair_logps(self.family, model, inputs)
        if stored is None:
            reference = self.reference_logps(inputs)
        else:
            reference = stored.to(policy.device)
        loss, metrics = preference_loss(policy, reference, tokens, self.preference)
        if model.training:
            for name, value in metrics.items():
                self._metric_sums[name] = self._metric_sums.get(name, 0) + value.double()
            self._metric_steps += 1
        return (loss, {"policy_logps": policy}) if return_outputs else loss

    def reference_logps(self, inputs: dict[str, Any]) -> torch.Tensor:
        """[2B] log-probs of the batch under the model training started from: the base with the adapter disabled."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), unwrapped.disable_adapter(), self.accelerator.autocast():
            return pair_logps(self.family, unwrapped, inputs)[0]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metric_steps:  # a training log: every process calls it at the same step
            names = sorted(self._metric_sums)
            steps = torch.tensor([self._metric_steps], dtype=torch.float64, device=self._metric_sums[names[0]].device)
            totals = torch.cat([torch.stack([self._metric_sums[n] for n in names]), steps])
            totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update({name: float(totals[i] / totals[-1]) for i, name in enumerate(names)})
            self._metric_sums, self._metric_steps = {}, 0
        super().log(logs, *args, **kwargs)


class StoredReference:
    """Stored reference log-probs, attached to each training sample by its row index (TrainingSamples' `features`)."""

    def __init__(self, logps: dict[int, list[float]]):
        self.logps = logps

    def attach(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        return {**sample, "reference_logps": self.logps[index]}


def compute_pair_logps(model: torch.nn.Module, rows: Sequence[Any], indices: Sequence[int], collator: PreferenceCollator,
                       batch_size: int, device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext,
                       disable_tqdm: bool = False, desc: str = "Reference log-probs") -> dict[int, list[float]]:
    """{row index: [chosen, rejected] summed answer log-probs} of the rows at `indices` under `model` (in eval mode,
    no gradient), each process its share, gathered: the same dict on every process. A row that cannot be read is
    left out (training skips it too)."""
    family = family_of_model(model)
    rank, world = rank_and_world_size()
    mine = list(indices)[rank::world]
    found: list[tuple[int, list[float]]] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=disable_tqdm or not is_main_process()):
            encoded = []
            for index in mine[start:start + batch_size]:
                try:
                    encoded.append((index, collator.encode(rows[index])))
                except UNREADABLE:
                    continue
            if not encoded:
                continue
            batch = collator.collate([sample for _, sample in encoded])
            batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            with torch.no_grad(), autocast():
                logps = pair_logps(family, model, batch)[0].double().cpu().tolist()
            pairs = len(encoded)
            found += [(index, [logps[k], logps[pairs + k]]) for k, (index, _) in enumerate(encoded)]
    finally:
        model.train(was_training)
    return dict(gather_lists(found))


def reference_source(args: RecipeArguments) -> dict[str, Any]:
    """What stored reference log-probs depend on besides the rows: a stored file made otherwise is not reused."""
    return {"model": args.model.model_name_or_path, "num_crops": args.model.num_crops,
            "continue_vision_lora": args.lora.continue_vision_lora}


def load_reference(path: Path, indices: Sequence[int], source: dict[str, Any]) -> dict[int, list[float]] | None:
    """The stored reference log-probs when `path` holds those of `indices`, made from `source` (None: compute them)."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("source") != source or stored.get("indices") != list(indices):
        return None
    return {int(key): value for key, value in stored["logps"].items()}


def save_reference(path: Path, indices: Sequence[int], logps: dict[int, list[float]], source: dict[str, Any]) -> None:
    """Writes the reference log-probs of the rows at `indices` (main process), atomically: a run stopped while
    writing leaves none. Unreadable rows have none."""
    if is_main_process():
        write_json(path, {"source": source, "indices": list(indices),
                          "logps": {str(index): value for index, value in sorted(logps.items())}})


def preference_accuracy(policy: dict[int, list[float]], reference: dict[int, list[float]]) -> dict[str, Any]:
    """How often the policy's log-prob ratio against the reference favours the chosen answer (a tie counts 0.5), and
    the mean implicit reward margin (without beta) over the pairs both hold."""
    scores, margins = [], []
    for index in sorted(set(policy) & set(reference)):
        margin = (policy[index][0] - reference[index][0]) - (policy[index][1] - reference[index][1])
        scores.append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
        margins.append(margin)
    count = len(scores)
    return {"preference_accuracy": sum(scores) / count if count else None,
            "mean_logratio_margin": sum(margins) / count if count else None, "num_pairs": count}



class PreferenceObjective(Objective):
    """Preference tuning's steps in the recipes' run (phivision.training.recipe.run(..., objective=...))."""

    def __init__(self, settings: PreferenceLoss):
        self.settings = settings

    def check(self, args: RecipeArguments) -> None:
        strategy = getattr(args.training.eval_strategy, "value", args.training.eval_strategy)  # an IntervalStrategy
        if strategy != "no":
            raise FlagError(f"--eval_strategy {strategy}: preference tuning evaluates before and "
                            "after training only (for now)")
        if args.model.cache_vision_features:
            raise FlagError("--cache_vision_features: not available for preference tuning yet")
        if is_deepspeed_zero3_enabled() or args.training.fsdp:
            raise FlagError(("--fsdp" if args.training.fsdp else f"--deepspeed {args.training.deepspeed}") +
                            ": preference tuning runs under ZeRO-2 (full, frozen vision) or DDP (LoRA, QLoRA) for now; "
                            "ZeRO-3 and FSDP2 are not tested with it")

    def length_format(self, format_train: FormatExample, processor: Processor) -> FormatExample:
        return longer_answer(format_train, processor.tokenizer)

    def collator(self, processor: Processor, format_train: FormatExample, args: RecipeArguments) -> PreferenceCollator:
        return PreferenceCollator(processor, format_train, args.model.num_crops, packing=args.data.packing)

    def trainer(self, **kwargs: Any) -> PreferenceTrainer:
        return PreferenceTrainer(preference=self.settings, **kwargs)

    def before_training(self, trainer: RecipeTrainer, train_rows: Sequence[Any], rows: TrainingRows,
                        collator: DataCollator, eval_rows: Sequence[Any], args: RecipeArguments) -> None:
        """Without a new LoRA adapter, the reference log-probs of every training pair, stored or computed now."""
        if args.lora.use_lora:
            return  # the reference is the model with its adapter disabled
        training = args.training
        path = Path(training.output_dir) / REFERENCE_FILE
        source = reference_source(args)
        logps = load_reference(path, rows.indices, source)
        if logps is None:
            on_training_device(trainer.model, args)  # --skip_eval_before: nothing has placed it yet
            logps = compute_pair_logps(trainer.model, train_rows, rows.indices, collator,
                                       training.per_device_train_batch_size, training.device,
                                       autocast=trainer.accelerator.autocast, disable_tqdm=training.disable_tqdm)
            save_reference(path, rows.indices, logps, source)
            print_once(f"Reference log-probs of {len(logps)} training pairs computed once, kept in {path}")
        else:
            print_once(f"Reference log-probs of the training pairs read from {path}")
        trainer.train_dataset.features = StoredReference(logps)

    def evaluate(self, model: torch.nn.Module, processor: Processor, eval_rows: Sequence[Any],
                 format_example: FormatExample, args: RecipeArguments, when: str, summary: dict) -> None:
        """Preference accuracy on the held-out pairs, added to the summary (and eval_{when}.json) as "preference".

        Before training the policy IS the reference: its log-probs of the evaluation pairs are recorded in
        output_dir/eval_reference_logps.json (every tie counts 0.5, so the accuracy is 0.5). Without them
        (--skip_eval_before), a LoRA run's reference is its base with the adapter disabled.
        """
        output_dir = Path(args.training.output_dir)
        limit = len(eval_rows) if args.data.max_eval_samples is None else min(len(eval_rows), args.data.max_eval_samples)
        indices = list(range(limit))
        collator = PreferenceCollator(processor, format_example, args.model.num_crops)
        batch_size = args.training.per_device_eval_batch_size
        device = next(model.parameters()).device
        policy = compute_pair_logps(model, eval_rows, indices, collator, batch_size, device,
                                    disable_tqdm=args.training.disable_tqdm, desc="Preference evaluation")
        path = output_dir / EVAL_REFERENCE_FILE
        reference = load_reference(path, indices, reference_source(args))
        if reference is None and when == "before":
            reference = policy
            save_reference(path, indices, reference, reference_source(args))
        elif reference is None and hasattr(model, "disable_adapter") and args.lora.use_lora:
            with model.disable_adapter():
                reference = compute_pair_logps(model, eval_rows, indices, collator, batch_size, device,
                                               disable_tqdm=True)
        if reference is None:
            print_once(f"Preference accuracy {when} training: not measured (no reference log-probs of the evaluation "
                       "pairs: the evaluation before training records them)")
            return
        summary["preference"] = preference_accuracy(policy, reference)
        if is_main_process():
            write_json(output_dir / f"eval_{when}.json", summary)
        result = summary["preference"]
        if result["num_pairs"]:
            print_once(f"Preference accuracy {when} training: {100 * result['preference_accuracy']:.2f}% on "
                       f"{result['num_pairs']} held-out pairs (chosen favoured over rejected against the reference; "
                       f"a tie counts half), mean log-ratio margin {result['mean_logratio_margin']:.4g}")
