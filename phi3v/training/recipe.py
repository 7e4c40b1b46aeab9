"""The run every recipe makes: evaluate, train, save, evaluate again, say how to try the result.

A task script supplies its data: the rows, `format_example(row) -> (conversation, images)` (the
contract is in `phi3v.chat`) and a metric (a name in `phi3v.metrics.METRICS` or a function), then:

    args = parse_args(TaskArguments, argv)
    run(args, train_rows, eval_rows, format_example, "accuracy")
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from ..chat import FormatExample
from ..collator import Phi3VDataCollator
from ..distributed import finish, print_once, stop
from ..evaluation import evaluate as evaluate_rows
from ..generation import try_command
from ..metrics import Metric, resolve_metric
from ..processing import Phi3VProcessor
from ..remote_code import set_code_repo
from .arguments import RecipeArguments
from .modes import load_for_training
from .trainer import Phi3VTrainer, RowsDataset, filter_by_length


def run(
    args: RecipeArguments,
    train_rows: Sequence[Any],
    eval_rows: Sequence[Any],
    format_example: FormatExample,
    metric: str | Metric,
    *,
    format_train: FormatExample | None = None,
    example_image: str | None = None,
) -> None:
    """Fine-tunes on `train_rows` and evaluates on `eval_rows` before and after; everything goes to --output_dir.

    `format_train` formats the training rows when they differ from the evaluation rows (DocVQA's
    --full_train); `example_image` goes into the closing "Try it with" command.
    """
    resolve_metric(metric)  # an unknown metric name fails now, not after training
    model, processor = load_for_training(args)
    if args.model.remote_code_repo:
        set_code_repo(args.model.remote_code_repo, model.config, processor.image_processor)
    if not args.data.skip_eval_before:
        evaluate(model, processor, eval_rows, format_example, metric, args, "before")
    trainer = train(model, processor, train_rows, format_train or format_example, args)
    save(trainer, processor, args)
    evaluate(trainer.model, processor, eval_rows, format_example, metric, args, "after")
    command = try_command(args.training.output_dir, args.model.model_name_or_path, args.lora.use_lora, example_image)
    print_once(f"Try it with:\n  {command}")
    finish()


def evaluate(model: torch.nn.Module, processor: Phi3VProcessor, rows: Sequence[Any], format_example: FormatExample,
             metric: str | Metric, args: RecipeArguments, when: str) -> dict | None:
    """Batched, sharded evaluation written to `output_dir/eval_{when}.json`; returns the summary (None
    without rows: nothing is evaluated)."""
    if not rows:
        print_once(f"Evaluation {when} training skipped: no evaluation rows")
        return None
    if args.data.max_eval_samples is not None:
        rows = [rows[i] for i in range(min(args.data.max_eval_samples, len(rows)))]
    if next(model.parameters()).device.type == "cpu" and args.training.device.type != "cpu":
        model.to(args.training.device)  # before training the Trainer hasn't placed it yet
    summary = evaluate_rows(
        model,
        processor,
        rows,
        format_example,
        metric,
        batch_size=args.training.per_device_eval_batch_size,
        max_new_tokens=args.data.max_new_tokens,
        num_crops=args.model.num_crops,
        output_file=Path(args.training.output_dir) / f"eval_{when}.json",
        disable_tqdm=args.training.disable_tqdm,
    )
    if summary["score"] is None:  # metric "none"
        print_once(f"Evaluation {when} training: {summary['num_examples']} answers written to eval_{when}.json "
                   "(metric none: not scored)")
    else:
        print_once(f"Evaluation {when} training: {summary['metric']} {100 * summary['score']:.2f} "
                   f"on {summary['num_examples']} examples")
    return summary


def train(model: torch.nn.Module, processor: Phi3VProcessor, rows: Sequence[Any], format_example: FormatExample,
          args: RecipeArguments) -> Trainer:
    """Trains on `rows` (resuming from the newest checkpoint when there is one) and returns the Trainer."""
    training = args.training
    if args.data.max_train_samples is not None:
        rows = [rows[i] for i in range(min(args.data.max_train_samples, len(rows)))]
    try:
        kept, lengths = filter_by_length(rows, format_example, processor, args.model.num_crops,
                                         args.data.max_seq_length, training.disable_tqdm)
    except ValueError as e:
        stop(str(e))
    trainer = Phi3VTrainer(
        model=model,
        args=training,
        train_dataset=RowsDataset(rows, kept, lengths),
        data_collator=Phi3VDataCollator(processor, format_example, args.model.num_crops, packing=args.data.packing),
    )
    resume = training.resume_from_checkpoint
    if resume is None and not training.no_auto_resume and Path(training.output_dir).is_dir():
        resume = get_last_checkpoint(training.output_dir)
        if resume:
            print_once(f"Resuming from {resume} (pass --no_auto_resume to start over)")
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def save(trainer: Trainer, processor: Phi3VProcessor, args: RecipeArguments) -> None:
    """Final model (full weights in the Hub layout, or the LoRA adapter) and processor in output_dir."""
    output_dir = args.training.output_dir
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        processor.image_processor.num_crops = args.model.num_crops  # what the model was trained with
        processor.save_pretrained(output_dir)
        if args.lora.use_lora:
            merge = shlex.join(["python", "-m", "phi3v.merge_lora", "--base", args.model.model_name_or_path,
                                "--adapter", output_dir, "--out", "MERGED_DIR"])
            print(f"Saved the LoRA adapter to {output_dir}. Merge it into a full model with:\n  {merge}")
        else:
            print(f"Saved the fine-tuned model to {output_dir}: Phi3VForCausalLM.from_pretrained({output_dir!r})")
