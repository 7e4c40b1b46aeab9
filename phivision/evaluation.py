"""Evaluation as the reference recipe does it, batched and sharded: greedy answers to the last turn, scored.

The reference recipe evaluates before and after training with greedy generation (64 new tokens),
decoding the new tokens only, one example at a time on one process; here `evaluate` batches prompts
(left padding, by token count) and shards the rows over the processes of a torch.distributed job.

    from phivision.evaluation import evaluate
    summary = evaluate(model, processor, rows, format_example, "anls", output_file="eval_before.json")
    summary["score"]  # mean over all rows, 0..1
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .chat import FormatExample, conversation_prompt
from .distributed import rank_and_world_size
from .files import write_json
from .generation import generate_answers, length_sorted_batches, model_device
from .images import decoded, upright_size
from .data.rows import UNREADABLE, describe_error, row_location
from .metrics import Metric, resolve_metric
from .phi3v.modeling import longrope_limit, parameters_are_sharded

# What a rank with no rows left answers while the others generate, when all must step together.
FILLER_TURN = [{"user": "Hello."}]


def _row_id(row: Any, index: int) -> Any:
    try:
        value = row.get("id", None) if hasattr(row, "get") else None
    except Exception:  # noqa: BLE001 - exotic row types: fall back to the index
        value = None
    return index if value is None else value


def evaluate(
    model: torch.nn.Module,
    processor,
    rows: Sequence[Any],
    format_example: FormatExample,
    metric: str | Metric,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_crops: int | None = None,
    output_file: str | Path | None = None,
    disable_tqdm: bool = False,
    limit: int | None = None,
) -> dict:
    """Greedy-generate an answer to the last turn of every row and score it with `metric`.

    Args:
        model: `Phi3VForCausalLM`, a peft `PeftModel` wrapping one, or anything with a
            transformers-style `generate`; any dtype and device (inputs go to the model's device).
        processor: `Phi3VProcessor` (called with left padding; its tokenizer gives the stop ids
            `<|end|>` and `<|endoftext|>` and decodes).
        rows: an indexable sequence (a `datasets.Dataset`, a list ...).
        format_example: `row -> (conversation, images)`, as `phivision.chat` describes it; the last
            turn's "answers" (or else its "assistant") are the ground truths.
        metric: a name in `phivision.metrics.METRICS` ("anls", "accuracy"), a function
            `(prediction, answers) -> score`, or "none": answers are generated but not scored (score None).
        batch_size: prompts per `generate` call (per process).
        max_new_tokens: generation budget; generation stops at `<|end|>` / `<|endoftext|>`.
        num_crops: passed to the processor (None: the processor's default).
        output_file: if given, the summary is written there as JSON (indent 2) by rank 0, via a
            temporary file renamed into place.
        disable_tqdm: no progress bar (there is one on rank 0 only otherwise, showing the running score in %).

    Under torch.distributed (any backend; call it on every rank), rank r evaluates rows r,
    r + world_size, ...; the records are all-gathered and put back in row order, so EVERY rank
    returns the same summary, and the output file is complete when any rank returns.

    A row that cannot be read (an image that fails to decode, a record the processor rejects) is
    skipped and listed in the summary's "skipped" ({"where", "reason"}); the score is over the others.

    Returns:
        `{"metric": metric's name, "score": mean score in 0..1 (0.0 with no rows; None with metric "none"),
        "num_examples": n,
        "examples": [{"row", "id", "question", "answers", "prediction", "score"}, ...]}` in row order,
        `id` being `row["id"]` when the row has one, else the row index.

    The model is put in eval mode under `torch.no_grad()` (not inference_mode: buffers that
    generation creates lazily, e.g. rotary tables, must stay usable for training afterwards),
    and its previous training mode is restored on return.
    """
    metric, score_fn = resolve_metric(metric)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = rank_and_world_size() if dist.is_initialized() else (0, 1)

    # This rank's share, formatted up front; sorted by token count so batches pad less.
    shard, skipped = [], []
    count = len(rows) if limit is None else min(limit, len(rows))
    for index in range(rank, count, world_size):
        try:
            row = rows[index]
            conversation, images = format_example(row)
            images = list(images)
            last = conversation[-1]
            prompt = conversation_prompt(conversation, len(images), processor)
            length = processor.num_prompt_tokens(prompt, [upright_size(image) for image in images], num_crops)
        except UNREADABLE as e:
            skipped.append({"index": index, "where": row_location(rows, index), "reason": describe_error(e)})
            continue
        shard.append(
            {
                "index": index,
                "id": _row_id(row, index),
                "question": last["user"],
                "answers": list(last.get("answers") or [last["assistant"]]),
                "prompt": prompt,
                "images": images,
                "length": length,
            }
        )
    lengths = [item["length"] for item in shard]
    batches = length_sorted_batches(lengths, batch_size, longrope_limit(model), max_new_tokens)

    # Sharded weights (ZeRO-3, FSDP) are gathered by collectives in every forward pass: all ranks make
    # the same number of generate calls (a rank out of rows answers a filler prompt, dropped) and
    # step together within each (synced_gpus), whatever their answers' lengths.
    synced = world_size > 1 and parameters_are_sharded(model)
    if synced:
        most = torch.tensor(len(batches), device=model_device(model))  # NCCL reduces GPU tensors only
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        batches += [[] for _ in range(int(most) - len(batches))]
    records, total = [], 0.0
    was_training = model.training
    model.eval()
    progress = tqdm(
        total=len(shard), desc=f"evaluating ({metric})", disable=disable_tqdm or rank != 0, dynamic_ncols=True
    )
    try:
        with torch.no_grad():
            for indices in batches:
                batch = []
                for item in (shard[i] for i in indices):
                    try:
                        for image in item["images"]:
                            decoded(image)  # files opened lazily decode here: a broken one skips its row alone
                    except UNREADABLE as e:
                        skipped.append({"index": item["index"], "where": row_location(rows, item["index"]),
                                        "reason": describe_error(e)})
                        progress.update(1)
                        continue
                    batch.append(item)
                if not batch:
                    if synced:
                        generate_answers(model, processor, [conversation_prompt(FILLER_TURN, 0, processor)], [[]], max_new_tokens=max_new_tokens,
                                         do_sample=False, num_beams=1, synced_gpus=True)
                    continue
                predictions = generate_answers(
                    model,
                    processor,
                    [item["prompt"] for item in batch],
                    [item["images"] for item in batch],
                    num_crops=num_crops,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    **({"synced_gpus": True} if synced else {}),
                )
                for item, prediction in zip(batch, predictions):
                    records.append(
                        {
                            "index": item["index"],
                            "id": item["id"],
                            "question": item["question"],
                            "answers": item["answers"],
                            "prediction": prediction,
                            "score": None if score_fn is None else float(score_fn(prediction, item["answers"])),
                        }
                    )
                if score_fn is not None:  # what this rank has answered so far (shortest prompts first), in %
                    total += sum(record["score"] for record in records[-len(batch):])
                    progress.set_postfix({metric: f"{100 * total / len(records):.1f}"}, refresh=False)
                progress.update(len(batch))
    finally:
        progress.close()
        model.train(was_training)

    if world_size > 1:
        gathered: list[tuple[list[dict], list[dict]]] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, (records, skipped))
        records = [record for part, _ in gathered for record in part]
        skipped = [item for _, part in gathered for item in part]
    records.sort(key=lambda record: record["index"])
    examples = [{"row": record["index"], **{k: v for k, v in record.items() if k != "index"}} for record in records]
    if score_fn is None:
        score = None  # metric "none": the answers are there to be read
    else:
        score = sum(e["score"] for e in examples) / len(examples) if examples else 0.0
    summary = {
        "metric": metric,
        "score": score,
        "num_examples": len(examples),
        "examples": examples,
    }
    if skipped:
        summary["skipped"] = [{k: v for k, v in item.items() if k != "index"}
                              for item in sorted(skipped, key=lambda item: item["index"])]
    if output_file is not None:
        if rank == 0:
            write_json(Path(output_file), summary)
        if world_size > 1:
            dist.barrier()
    return summary
