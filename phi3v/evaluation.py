"""Evaluation: answer metrics (accuracy, ANLS) and batched, sharded greedy-generation evaluation.

The reference recipe evaluates before and after training with greedy generation (64 new tokens),
decoding the new tokens only; accuracy compares answers and predictions stripped of spaces and
'.' and lowercased; DocVQA uses ANLS. It evaluates one example at a time on one process; here
`evaluate` batches (left padding) and shards the rows over the processes of a torch.distributed job.

    from phi3v.evaluation import evaluate
    summary = evaluate(model, processor, rows, format_example, "anls", output_file="eval_before.json")
    summary["score"]  # mean over all rows, 0..1
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .modeling import longrope_limit

__all__ = [
    "METRICS",
    "anls",
    "conversation_prompt",
    "evaluate",
    "exact_match",
    "generation_prompt",
    "levenshtein",
    "normalize_answer",
]

_IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def normalize_answer(text: str) -> str:
    """The reference recipe's normalisation for accuracy: strip surrounding whitespace and '.', lowercase.

    Only the ends are stripped ("Yes." -> "yes", " no " -> "no", "3.5" stays "3.5").
    """
    return text.strip(string.whitespace + ".").lower()


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0 (see `normalize_answer`)."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in _as_list(answers)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1); O(len(a) * len(b)) time, two rows."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (the DocVQA metric).

    Case-insensitive, with whitespace stripped and internal runs collapsed to one space. For
    each ground truth, NL = levenshtein(a, b) / max(len(a), len(b)) and the score is 1 - NL, or 0
    when NL >= `threshold`; two empty strings score 1. The result is the max over the ground
    truths (0.0 when there are none). Average it over a dataset to get the ANLS.
    """
    predicted = _anls_normalize(prediction)
    best = 0.0
    for answer in _as_list(answers):
        truth = _anls_normalize(answer)
        longest = max(len(predicted), len(truth))
        if longest == 0:
            return 1.0
        distance = levenshtein(predicted, truth) / longest
        best = max(best, 0.0 if distance >= threshold else 1.0 - distance)
    return best


METRICS: dict[str, Callable[[str, str | Sequence[str]], float]] = {"anls": anls, "accuracy": exact_match}


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

def _image_tags(num_images: int) -> str:
    return "".join(f"<|image_{k}|>\n" for k in range(1, num_images + 1))


def generation_prompt(user: str, num_images: int) -> str:
    """`<|user|>\\n{tags}{user}<|end|>\\n<|assistant|>\\n`, the layout the training encoder uses.

    `tags` is `<|image_1|>\\n...<|image_n|>\\n` (each tag followed by a newline) unless `user`
    already references images with `<|image_k|>` tags, in which case it is used as is.
    """
    tags = "" if _IMAGE_TAG.search(user) else _image_tags(num_images)
    return f"<|user|>\n{tags}{user}<|end|>\n<|assistant|>\n"


def conversation_prompt(conversation: Sequence[dict[str, Any]], num_images: int) -> str:
    """Prompt for answering the last turn of `conversation` (a list of {"user", "assistant"} dicts).

    Earlier turns are chat history, `<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{assistant}<|end|>\\n`;
    the last turn ends with the generation prompt `<|assistant|>\\n` (its "assistant" is the
    target, not shown). Image tags follow the training encoder (`Phi3VProcessor.encode_conversation`):
    when turns carry their own "images" lists, a turn whose user text has no `<|image_k|>` tag gets
    the tags of its images prepended (each followed by "\\n"), numbered on across turns; otherwise
    all `num_images` images belong to the first turn, whose text gets the tags unless some user
    text already has tags.
    """
    if not conversation:
        raise ValueError("conversation has no turns")
    if any("images" in turn for turn in conversation):
        counts = [len(turn.get("images") or []) for turn in conversation]
        if sum(counts) != num_images:
            raise ValueError(f"the turns have {sum(counts)} image(s) in all but num_images is {num_images}")
    else:
        tagged = any(_IMAGE_TAG.search(turn["user"]) for turn in conversation)
        counts = [0 if tagged else num_images] + [0] * (len(conversation) - 1)
    parts, first_image = [], 1
    for i, (turn, count) in enumerate(zip(conversation, counts)):
        user = turn["user"]
        if count and not _IMAGE_TAG.search(user):
            user = "".join(f"<|image_{first_image + k}|>\n" for k in range(count)) + user
        first_image += count
        answer = "" if i == len(conversation) - 1 else f"{turn['assistant']}<|end|>\n"
        parts.append(f"<|user|>\n{user}<|end|>\n<|assistant|>\n{answer}")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _row_id(row: Any, index: int) -> Any:
    try:
        value = row.get("id", None) if hasattr(row, "get") else None
    except Exception:  # noqa: BLE001 - exotic row types: fall back to the index
        value = None
    return index if value is None else value


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _write_json_atomically(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def prompt_length(processor, prompt: str, image_sizes: Sequence[tuple[int, int]], num_crops: int | None) -> int:
    """Tokens of a generation prompt, image tokens included, from the images' (width, height) alone."""
    crops = num_crops or processor.image_processor.num_crops
    counts = [processor.image_processor.num_image_tokens(width, height, crops) for width, height in image_sizes]
    return len(processor.encode_prompt(prompt, counts))


def length_batches(
    lengths: Sequence[int], batch_size: int, limit: int | None, max_new_tokens: int
) -> list[tuple[int, int]]:
    """(start, end) of consecutive batches over prompts sorted by length, keeping LongRoPE exact.

    LongRoPE picks its short or long factors from the longest sequence of the whole batch, so a
    short prompt batched with one past `limit` would be answered differently than alone. Prompts
    that stay within `limit` through the whole generation batch together, prompts already past it
    batch together, and the few that cross it while generating run alone.
    """

    def regime(length: int) -> int:
        return 0 if limit is None or length + max_new_tokens <= limit else 2 if length > limit else 1

    batches: list[tuple[int, int]] = []
    for index, length in enumerate(lengths):
        start, end = batches[-1] if batches else (0, 0)
        if batches and end - start < batch_size and regime(length) == regime(lengths[start]) != 1:
            batches[-1] = (start, index + 1)
        else:
            batches.append((index, index + 1))
    return batches


def evaluate(
    model: torch.nn.Module,
    processor,
    rows: Sequence[Any],
    format_example: Callable[[Any], tuple[list[dict[str, Any]], list]],
    metric: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_crops: int | None = None,
    output_file: str | Path | None = None,
    disable_tqdm: bool = False,
) -> dict:
    """Greedy-generate an answer to the last turn of every row and score it with `metric`.

    Args:
        model: `Phi3VForCausalLM`, a peft `PeftModel` wrapping one, or anything with a
            transformers-style `generate`; any dtype and device (inputs go to the model's device).
        processor: `Phi3VProcessor` (called with left padding; its tokenizer gives the stop ids
            `<|end|>` and `<|endoftext|>` and decodes).
        rows: an indexable sequence (a `datasets.Dataset`, a list ...).
        format_example: `row -> (conversation, images)`; `conversation` a list of
            `{"user": str, "assistant": str}` turns, the last turn's "assistant" the ground truth
            (an optional `"answers": list[str]` in the last turn gives several ground truths, as in
            DocVQA); `images` a list of PIL images, referenced by `<|image_k|>` tags in the user
            texts or else prepended to the first user turn, or None when the turns carry their own
            `"images"` lists (tags then go turn by turn, as in training; see `conversation_prompt`).
        metric: a key of `METRICS` ("anls" or "accuracy").
        batch_size: prompts per `generate` call (per process).
        max_new_tokens: generation budget; generation stops at `<|end|>` / `<|endoftext|>`.
        num_crops: passed to the processor (None: the processor's default).
        output_file: if given, the summary is written there as JSON (indent 2) by rank 0, via a
            temporary file renamed into place.
        disable_tqdm: no progress bar (there is one on rank 0 only otherwise).

    Under torch.distributed (any backend; call it on every rank), rank r evaluates rows r,
    r + world_size, ...; the records are all-gathered and put back in row order, so EVERY rank
    returns the same summary, and the output file is complete when any rank returns.

    Returns:
        `{"metric": metric, "score": mean score in 0..1 (0.0 with no rows), "num_examples": n,
        "examples": [{"id", "question", "answers", "prediction", "score"}, ...]}` in row order,
        `id` being `row["id"]` when the row has one, else the row index.

    The model is put in eval mode under `torch.no_grad()` (not inference_mode: buffers that
    generation creates lazily, e.g. rotary tables, must stay usable for training afterwards),
    and its previous training mode is restored on return.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from .generate import generate_answers  # here: phi3v.generate imports this module

    score_fn = METRICS[metric]
    rank, world_size = _distributed()

    # This rank's share, formatted up front; sorted by token count so batches pad less.
    shard = []
    for index in range(rank, len(rows), world_size):
        row = rows[index]
        conversation, images = format_example(row)
        if images is None:  # the turns may carry their images
            images = [image for turn in conversation for image in (turn.get("images") or [])]
        images = list(images)
        last = conversation[-1]
        answers = list(last.get("answers") or [last["assistant"]])
        prompt = conversation_prompt(conversation, len(images))
        shard.append(
            {
                "index": index,
                "id": _row_id(row, index),
                "question": last["user"],
                "answers": answers,
                "prompt": prompt,
                "images": images,
                "length": prompt_length(processor, prompt, [image.size for image in images], num_crops),
            }
        )
    shard.sort(key=lambda item: (item["length"], item["index"]))
    batches = length_batches([item["length"] for item in shard], batch_size, longrope_limit(model), max_new_tokens)

    records = []
    was_training = model.training
    model.eval()
    progress = tqdm(
        total=len(shard), desc=f"evaluating ({metric})", disable=disable_tqdm or rank != 0, dynamic_ncols=True
    )
    try:
        with torch.no_grad():
            for start, end in batches:
                batch = shard[start:end]
                predictions = generate_answers(
                    model,
                    processor,
                    [item["prompt"] for item in batch],
                    [item["images"] for item in batch],
                    num_crops=num_crops,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
                for item, prediction in zip(batch, predictions):
                    records.append(
                        {
                            "index": item["index"],
                            "id": item["id"],
                            "question": item["question"],
                            "answers": item["answers"],
                            "prediction": prediction,
                            "score": float(score_fn(prediction, item["answers"])),
                        }
                    )
                progress.update(len(batch))
    finally:
        progress.close()
        model.train(was_training)

    if world_size > 1:
        gathered: list[list[dict]] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
    records.sort(key=lambda record: record["index"])
    examples = [{k: v for k, v in record.items() if k != "index"} for record in records]
    summary = {
        "metric": metric,
        "score": sum(e["score"] for e in examples) / len(examples) if examples else 0.0,
        "num_examples": len(examples),
        "examples": examples,
    }
    if output_file is not None:
        if rank == 0:
            _write_json_atomically(summary, Path(output_file))
        if world_size > 1:
            dist.barrier()
    return summary
