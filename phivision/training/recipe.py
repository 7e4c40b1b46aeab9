"""The run every recipe makes: evaluate, train, save, evaluate again, draw the run, say how to try the result.

A task script supplies its data: the rows, `format_example(row) -> (conversation, images)` (the
contract is in `phivision.chat`) and a metric (a name in `phivision.metrics.METRICS` or a function), then:

    args = parse_args(TaskArguments, argv)
    run(args, train_rows, eval_rows, format_example, "accuracy")

A run never loses work: it holds --output_dir for itself, resumes from the newest complete
checkpoint, stops at a step boundary with a checkpoint on SIGTERM/SIGINT, skips (and names)
samples it cannot read, and a finished run re-run changes nothing.
"""

from __future__ import annotations

import math
import shlex
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..chat import FormatExample
from ..collator import DataCollator
from ..distributed import (finish, gather_lists, is_main_process, main_process_decides, parameters_are_sharded,
                           print_once)
from ..errors import SetupError
from ..evaluation import evaluate as evaluate_rows
from ..families import Processor
from ..files import tree_follows_umask, write_json
from ..generation import try_command, web_command
from ..metrics import Metric, resolve_metric
from ..phi3v.remote_code import set_code_repo
from .arguments import RecipeArguments
from .checkpointing import AutoCheckpointing, longest_layout
from .checkpoints import (FINAL_EVAL, CheckpointError, copy_model_files, find_resume_point, load_model_weights, log_history,
                          run_is_complete, trained_steps)
from .modes import check_family_flags, load_for_training, load_processor
from .output_lock import OutputDirBusy, OutputDirLock
from .report import save_eval_examples, save_example_image, write_pictures
from .sharding import full_weights
from .stopping import RunInterrupted, StopAtStepEnd, StopSignals
from .trainer import RecipeTrainer, TrainingRows, TrainingSamples, filter_by_length
from .vision_cache import VisionFeatureCache


def run(
    args: RecipeArguments,
    train_rows: Sequence[Any],
    eval_rows: Sequence[Any],
    format_example: FormatExample,
    metric: str | Metric,
    *,
    format_train: FormatExample | None = None,
    example_image: str | None = None,
    objective: Objective | None = None,
) -> None:
    """Fine-tunes on `train_rows` and evaluates on `eval_rows` before and after; everything goes to --output_dir.

    `format_train` formats the training rows when they differ from the evaluation rows (DocVQA's
    --full_train); `example_image` goes into the closing "Try it with" command (default: the first
    evaluation image, saved to output_dir). The run ends with training_curves.png and eval_report.html.
    `objective` says what training learns (default: the answers, `Objective`; preference tuning:
    phivision.training.preference.PreferenceObjective).
    """
    resolve_metric(metric)  # an unknown metric name fails now, not after training
    lock = OutputDirLock(args.training.output_dir)
    signals = StopSignals()
    try:
        with signals.installed():
            main_process_decides(lock.acquire, errors=(OutputDirBusy,))
            if lock.taken_over:
                print_once(f"Took over {lock.path}, left by a run that is gone (pid {lock.taken_over.get('pid')}).")
            steps(args, train_rows, eval_rows, format_example, metric, format_train or format_example, example_image,
                  signals, objective or Objective())
    except RunInterrupted as e:
        print_once(f"Stopped by {signal.Signals(e.signum).name} outside training: nothing new to save. Run the same "
                   "command again to continue.")
        raise SystemExit(128 + e.signum) from None
    finally:
        lock.release()
    finish()


class Objective:
    """What a run trains for, where the steps differ by it: here, supervised fine-tuning on the answers (preference
    tuning overrides it: phivision.training.preference.PreferenceObjective)."""

    def check(self, args: RecipeArguments) -> None:
        """A FlagError for flags this objective cannot honour, before the model loads."""

    def length_format(self, format_train: FormatExample, processor: Processor) -> FormatExample:
        """The format whose token count is a training row's (for --max_seq_length and length grouping)."""
        return format_train

    def collator(self, processor: Processor, format_train: FormatExample, args: RecipeArguments) -> DataCollator:
        """The training batches' collator."""
        return DataCollator(processor, format_train, args.model.num_crops, packing=args.data.packing)

    def trainer(self, **kwargs: Any) -> RecipeTrainer:
        """The trainer, made from the Trainer's keyword arguments."""
        return RecipeTrainer(**kwargs)

    def before_training(self, trainer: RecipeTrainer, train_rows: Sequence[Any], rows: TrainingRows,
                        collator: DataCollator, eval_rows: Sequence[Any], args: RecipeArguments) -> None:
        """What must be computed on the starting model before its first step (called only when training runs)."""

    def evaluate(self, model: torch.nn.Module, processor: Processor, eval_rows: Sequence[Any],
                 format_example: FormatExample, args: RecipeArguments, when: str, summary: dict) -> None:
        """More evaluation beside the task metric's (`summary`: the evaluation's, to add to)."""


def steps(args: RecipeArguments, train_rows: Sequence[Any], eval_rows: Sequence[Any], format_example: FormatExample,
          metric: str | Metric, format_train: FormatExample, example_image: str | None, signals: StopSignals,
          objective: Objective) -> None:
    """The run's steps, in order; each one checks what it can before the model loads."""
    training, output_dir = args.training, Path(args.training.output_dir)
    if run_is_complete(output_dir) and training.resume_from_checkpoint is None and not training.no_auto_resume:
        print_once(f"The run in {output_dir} is complete (its model and eval_after.json are there): nothing was changed. "
                   "--no_auto_resume trains again from the start; --resume_from_checkpoint with a larger --max_steps "
                   "or --num_train_epochs trains on.")
        return
    point = main_process_decides(lambda: find_resume_point(output_dir, training.resume_from_checkpoint,
                                                           not training.no_auto_resume, True),
                                 errors=(CheckpointError,))
    for incomplete, moved_to in point.set_aside:
        print_once(f"{incomplete} is incomplete (the run was stopped while writing it): moved to {moved_to}.")

    processor = load_processor(args.model.model_name_or_path)
    check_family_flags(args)
    objective.check(args)
    rows = filter_by_length(train_rows, objective.length_format(format_train, processor), processor,
                            args.model.num_crops, args.data.max_seq_length, training.disable_tqdm,
                            limit=args.data.max_train_samples)
    max_bad = args.data.max_bad_samples
    max_bad = math.ceil(0.01 * len(rows.indices)) if max_bad is None else max_bad
    if len(rows.unreadable) > max_bad:
        raise SetupError(f"{len(rows.unreadable)} training rows cannot be read (listed above), more than "
                         f"--max_bad_samples {max_bad}: fix or remove them")
    model = load_for_training(args, processor)
    if args.model.remote_code_repo:
        set_code_repo(args.model.remote_code_repo, model.config, processor.image_processor)

    if point.checkpoint is not None:
        print_once(f"Resuming from {point.checkpoint} (pass --no_auto_resume to start over)")
    evaluated = point.checkpoint is not None and (output_dir / "eval_before.json").is_file()
    evaluate_before = not args.data.skip_eval_before and not evaluated
    # FSDP2 shards the model only when the Trainer prepares it: evaluated now, every rank would hold the whole
    # fp32 model. A fresh run evaluates once the Trainer has sharded it, before the first step (a resumed one
    # has loaded its checkpoint by then, so it evaluates the base model now).
    on_sharded_model = evaluate_before and bool(training.fsdp) and point.checkpoint is None
    if evaluate_before and not on_sharded_model:
        evaluate(model, processor, eval_rows, format_example, metric, args, "before", objective)

    collator = objective.collator(processor, format_train, args)
    cache = VisionFeatureCache(output_dir / "vision_features") if args.model.cache_vision_features else None
    trainer = objective.trainer(
        model=model,
        args=training,
        train_dataset=TrainingSamples(train_rows, rows.indices, rows.lengths, encode=collator.encode, features=cache),
        data_collator=collator.collate,
        base_checkpoint=args.model.model_name_or_path,
        **evaluation_during_training(args, processor, eval_rows, format_example, metric),
    )
    # --gradient_checkpointing auto sizes a step on the meta device, for the families that can (the others
    # checkpoint every layer).
    if training.auto_checkpointing and training.activation_checkpointing and rows.lengths and trainer.family.supports_step_sizing:
        # Encoded from its row, pixels included: the feature cache (--cache_vision_features) is filled later.
        samples = TrainingSamples(train_rows, rows.indices, rows.lengths, encode=collator.encode)
        trainer.add_callback(AutoCheckpointing(args, longest_layout(samples, trainer.model.config)))
    if on_sharded_model:
        trainer.add_callback(EvaluateBefore(lambda model: evaluate(model, processor, eval_rows, format_example, metric,
                                                                   args, "before", objective)))
    stopper = StopAtStepEnd(signals, trainer.bad_samples, max_bad - len(rows.unreadable))
    trainer.add_callback(stopper)
    finished = point.checkpoint is not None and trained_steps(point.checkpoint) >= planned_steps(trainer)
    if finished:  # stopped after its last step: the checkpoint holds the trained model
        print_once(f"{point.checkpoint} is the last step of training: finishing from it.")
        load_model_weights(model, point.checkpoint)
    else:
        if cache is not None:
            computed = cache.fill(model, train_rows, rows.indices, collator.encode, args.model.num_crops,
                                  autocast=trainer.accelerator.autocast, device=training.device,
                                  num_workers=training.dataloader_num_workers, disable_tqdm=training.disable_tqdm)
            print_once(f"Image features of the training samples are in {cache.directory} ({computed} computed now)")
        objective.before_training(trainer, train_rows, rows, collator, eval_rows, args)
        with signals.deferring():
            trainer.train(resume_from_checkpoint=str(point.checkpoint) if point.checkpoint else None)
    bad = rows.unreadable + sorted(set(gather_lists(trainer.bad_samples)))
    for where in bad[len(rows.unreadable):]:
        print_once(f"  unreadable, skipped during training: {where}")
    if stopper.reason is not None:
        stopped(stopper, trainer, bad, max_bad)

    save(trainer, processor, args, from_checkpoint=point.checkpoint if finished else None)
    if cache is not None and is_main_process():
        cache.remove()  # training is over: nothing reads them again
    after = evaluate(model if finished else trainer.model, processor, eval_rows, format_example, metric, args, "after",
                     objective)
    if bad:
        print_once(f"{len(bad)} unreadable sample(s) were skipped (listed above).")
    if is_main_process():
        history = log_history(point.checkpoint) if finished else trainer.state.log_history
        curves, report = write_pictures(args, history, eval_rows, format_example, after)
        if after is not None:
            save_eval_examples(eval_rows, format_example, after, output_dir)
        example_image = example_image or save_example_image(eval_rows, format_example, output_dir)
        command = try_command(str(output_dir), args.model.model_name_or_path, args.lora.use_lora, example_image)
        page = web_command(str(output_dir), args.model.model_name_or_path, args.lora.use_lora)
        report = report or "none (no evaluation rows)"
        print(f"Try it with:\n  {command}\n  {page}    # chat in a browser (pip install gradio)\n"
              f"Training curves: {curves}\nEvaluation report: {report}", flush=True)


def save_merged(trainer: Trainer, base: str, output_dir: str) -> None:
    """The trained adapter (and the modules saved with it) merged into the model, saved as a full model."""
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    if trainer.args.should_save:
        merged.save_pretrained(output_dir, state_dict=trainer.family.state_dict_to_save(merged.state_dict(), base))
        trainer.family.finish_saved_model(output_dir)
        tree_follows_umask(output_dir)


class EvaluateBefore(TrainerCallback):
    """The evaluation before training, on the model as the Trainer has prepared it (FSDP2: sharded)."""

    def __init__(self, evaluate_model: Callable[[torch.nn.Module], Any]):
        self.evaluate_model = evaluate_model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.evaluate_model(model)


def evaluation_during_training(args: RecipeArguments, processor: Processor, eval_rows: Sequence[Any],
                               format_example: FormatExample, metric: str | Metric) -> dict[str, Any]:
    """With --eval_strategy steps|epoch: the rows whose loss is measured, and the task metric (the same batched
    generation as the evaluations before and after) that the Trainer logs as eval_<metric> beside eval_loss."""
    if args.training.eval_strategy == "no" or not eval_rows:
        return {}
    data, model_args = args.data, args.model
    rows = filter_by_length(eval_rows, format_example, processor, model_args.num_crops, None,
                            args.training.disable_tqdm, limit=data.max_eval_samples, label="Evaluation samples")
    encoder = DataCollator(processor, format_example, model_args.num_crops)

    def task_metric(model: torch.nn.Module) -> dict:
        with half_precision(args, model):
            return evaluate_rows(model, processor, eval_rows, format_example, metric,
                                 batch_size=args.training.per_device_eval_batch_size,
                                 max_new_tokens=data.max_new_tokens, num_crops=model_args.num_crops,
                                 disable_tqdm=True, limit=data.max_eval_samples)

    return {"eval_dataset": TrainingSamples(eval_rows, rows.indices, rows.lengths, encode=encoder.encode),
            "task_metric": task_metric}


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps this run's flags and data make (what --max_steps or the epochs come to)."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def stopped(stopper: StopAtStepEnd, trainer: Trainer, bad: list[str], max_bad: int) -> None:
    """Ends a run that stopped early, after its checkpoint was written."""
    step = trainer.state.global_step
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if stopper.reason == "bad samples":
        raise SetupError(f"{len(bad)} samples could not be read (listed above), more than --max_bad_samples "
                         f"{max_bad}: stopped at step {step} with {checkpoint}. Fix or remove them, then run the same "
                         "command again to resume.")
    name = signal.Signals(stopper.signum).name
    print_once(f"Stopped by {name} at step {step}: {checkpoint} holds everything. Run the same command again to resume.")
    raise SystemExit(128 + stopper.signum)


def evaluate(model: torch.nn.Module, processor: Processor, rows: Sequence[Any], format_example: FormatExample,
             metric: str | Metric, args: RecipeArguments, when: str, objective: Objective | None = None) -> dict | None:
    """Batched, sharded evaluation written to `output_dir/eval_{when}.json`; returns the summary (None
    without rows: nothing is evaluated). The `objective` may add its own results to the summary."""
    if not rows:
        print_once(f"Evaluation {when} training skipped: no evaluation rows")
        if when == "after" and is_main_process():
            # eval_after.json marks a run complete: without it a re-run would train again (from scratch when
            # no checkpoint was kept). It says that nothing was evaluated; no score, so no 0.00.
            write_json(Path(args.training.output_dir) / FINAL_EVAL,
                       {"metric": resolve_metric(metric)[0], "score": None, "num_examples": 0, "examples": [],
                        "note": "no evaluation rows"})
        return None
    on_training_device(model, args)
    with half_precision(args, model), full_weights(model):
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
            limit=args.data.max_eval_samples,
        )
        if objective is not None:
            objective.evaluate(model, processor, rows, format_example, args, when, summary)
    for item in summary.get("skipped", []):
        print_once(f"  unreadable, not evaluated: {item['where']}: {item['reason']}")
    sharded = " (weights sharded: the processes generate in step)" if parameters_are_sharded(model) else ""
    if summary["score"] is None:  # metric "none"
        print_once(f"Evaluation {when} training: {summary['num_examples']} answers written to eval_{when}.json "
                   f"(metric none: not scored){sharded}")
    else:
        print_once(f"Evaluation {when} training: {summary['metric']} {100 * summary['score']:.2f} "
                   f"on {summary['num_examples']} examples{sharded}")
    return summary


def on_training_device(model: torch.nn.Module, args: RecipeArguments) -> None:
    """Puts a model still on the CPU onto the training device: before training the Trainer hasn't placed it yet
    (under DeepSpeed it never does before `train`)."""
    if next(model.parameters()).device.type == "cpu" and args.training.device.type != "cpu":
        model.to(args.training.device)


def half_precision(args: RecipeArguments, model: torch.nn.Module):
    """Evaluation in the precision training computes in (autocast to bf16/fp16), also for fp32 weights:
    flash attention takes half-precision inputs only, and a 4B model needs twice the memory in fp32.

    Without autocast's cache: it would keep a 16-bit copy of every fp32 weight that requires grad (full
    fine-tuning: 8.3 GB) for the whole evaluation, beside the fp32 weights and the generation cache.
    """
    training = args.training
    dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


def save(trainer: Trainer, processor: Processor, args: RecipeArguments, from_checkpoint: Path | None = None) -> None:
    """Final model (full weights in the Hub layout, or the LoRA adapter) and processor in output_dir.

    With --continue_vision_lora the trained vision LoRA is merged in: the output is a full model, as in
    Microsoft's recipe, that loads and generates without an adapter (and without the shipped one merged twice).
    """
    output_dir = args.training.output_dir
    if args.lora.continue_vision_lora:
        save_merged(trainer, args.model.model_name_or_path, output_dir)
    elif from_checkpoint is None:
        trainer.save_model(output_dir)
    elif is_main_process():
        copy_model_files(from_checkpoint, output_dir)
    if trainer.is_world_process_zero() and not args.lora.use_lora and not args.lora.continue_vision_lora:
        # The final model only (save_merged does its own): checkpoints keep the config.json transformers wrote, which
        # the Trainer reads back on resume (Phi-4-MM's Hub form fails there: PreTrainedConfig lacks its fields).
        trainer.family.finish_saved_model(output_dir)
    if trainer.is_world_process_zero():
        processor.image_processor.num_crops = args.model.num_crops  # what the model was trained with
        processor.save_pretrained(output_dir)
        if args.lora.use_lora:
            merge = shlex.join(["python", "-m", "phivision.merge_lora", "--base", args.model.model_name_or_path,
                                "--adapter", output_dir, "--out", "MERGED_DIR"])
            print(f"Saved the LoRA adapter to {output_dir}. Merge it into a full model with:\n  {merge}")
        else:
            model_class = trainer.family.model_class().__name__
            print(f"Saved the fine-tuned model to {output_dir}: {model_class}.from_pretrained({output_dir!r})")
