"""Preference tuning (DPO): the loss, the batches of chosen and rejected answers, the trainer, the reference model.

A preference row is a recipe row whose last turn carries the chosen answer as "assistant" and the rejected one
as "rejected" (phivision.data.preference). A batch of B pairs is ONE forward pass over 2B sequences: the chosen
ones, then the rejected ones, each pair's images given twice (`PreferenceCollator`). A sequence's log-prob is the
sum over its answer tokens (labels != -100), taken from the logits at answer positions only (the model family's
`answer_logps`); packed batches are split by sample.

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

from ..chat import Conversation, FormatExample
from ..collator import DataCollator
from ..distributed import gather_lists, is_main_process, print_once, rank_and_world_size
from ..files import write_json
from .trainer import RecipeTrainer, TrainingSamples

REJECTED = "rejected"  # the last turn's key of the rejected answer (phivision.data.preference's REJECTED)
LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_FILE = "reference_logps.json"  # the training pairs' reference log-probs, in output_dir
EVAL_REFERENCE_FILE = "eval_reference_logps.json"  # the evaluation pairs', recorded before training


@dataclass
class PreferenceLoss:
    """The preference loss's settings (--beta, --loss_type, --rpo_alpha)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    rpo_alpha: float | None = None


def rejected_conversation(conversation: Conversation) -> Conversation:
    """The conversation with its last answer replaced by the rejected one."""
    last = conversation[-1]
    return [*conversation[:-1], {**last, "assistant": last[REJECTED]}]


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
    token_logps, mask, positions = family.answer_logps(model, inputs)
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
        self._metric_sums: dict[str, float] = {}
        self._metric_steps = 0

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        self.collect_bad_samples(inputs)
        stored = inputs.pop("reference_logps", None)
        policy, tokens = pair_logps(self.family, model, inputs)
        if stored is None:
            reference = self.reference_logps(inputs)
        else:
            reference = stored.to(policy.device)
        loss, metrics = preference_loss(policy, reference, tokens, self.preference)
        if model.training:
            for name, value in metrics.items():
                self._metric_sums[name] = self._metric_sums.get(name, 0.0) + float(value)
            self._metric_steps += 1
        return (loss, {"policy_logps": policy}) if return_outputs else loss

    def reference_logps(self, inputs: dict[str, Any]) -> torch.Tensor:
        """[2B] log-probs of the batch under the model training started from: the base with the adapter disabled."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), unwrapped.disable_adapter():
            return pair_logps(self.family, unwrapped, inputs)[0]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metric_steps:  # a training log: every process calls it at the same step
            names = sorted(self._metric_sums)
            totals = torch.tensor([self._metric_sums[n] for n in names] + [self._metric_steps],
                                  dtype=torch.float64, device=self.args.device)
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
    from ..data.rows import UNREADABLE
    from ..families import family_of_model

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


def load_reference(path: Path, indices: Sequence[int]) -> dict[int, list[float]] | None:
    """The stored reference log-probs when `path` holds every one of `indices` (None: compute them)."""
    if not path.is_file():
        return None
    stored = {int(key): value for key, value in json.loads(path.read_text())["logps"].items()}
    return stored if all(index in stored for index in indices) else None


def save_reference(path: Path, logps: dict[int, list[float]]) -> None:
    """Writes the reference log-probs (main process), atomically: a run stopped while writing leaves none."""
    if is_main_process():
        write_json(path, {"logps": {str(index): value for index, value in sorted(logps.items())}})


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

