"""What every recipe shares: flags, model set-up per mode, the Trainer, checkpoints and saving.

A task script supplies its data (rows, `format_example`, metric) and calls, in order:
`parse_args` -> `load_model_and_processor` -> `evaluate` -> `train` -> `save` -> `evaluate` -> `finish`.
"""

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import BitsAndBytesConfig, HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .collator import FormatExample, Phi3VDataCollator, count_tokens
from .data import sizes_only
from .generate import stop_token_ids, try_command
from .modeling import Phi3VForCausalLM, longrope_limit, training_attention
from .processing import Phi3VProcessor

logger = logging.get_logger(__name__)

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parent.parent / "ds_config_zero2.json"
LANGUAGE_LORA_TARGETS = ["qkv_proj", "o_proj", "down_proj", "gate_up_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LENGTH_BUCKET = 64  # tokens; granularity of length-grouped batching


@dataclass
class FinetuneArguments:
    """Flags shared by every recipe (the reference guide's flags, plus checkpointing and data)."""

    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct",
        metadata={"help": "Hub id or local directory of a Phi-3(.5)-vision checkpoint."},
    )
    dataset_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Use this dataset instead of the task's Hub dataset: a Hub id, a directory written by "
                  "DatasetDict.save_to_disk, or a folder of parquet files with the same schema."},
    )
    output_dir: str = field(default="./output/", metadata={"help": "Where checkpoints, the final model and eval files go."})
    use_flash_attention: bool = field(
        default=False, metadata={"help": "Use flash-attn 2 (bf16/fp16 on GPU); SDPA when flash-attn is not installed."}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (otherwise fp16)."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    use_qlora: bool = field(default=False, metadata={"help": "4-bit NF4 base weights + LoRA (implies --use_lora)."})
    freeze_vision_model: bool = field(
        default=False, metadata={"help": "Freeze the image encoder (CLIP, projection and separators)."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Global batch size: processes x --batch_size_per_gpu x gradient accumulation."}
    )
    batch_size_per_gpu: int = field(default=1, metadata={"help": "Samples per process and step."})
    num_crops: int = field(default=16, metadata={"help": "Max 336x336 crops per image (HD transform)."})
    num_train_epochs: float = field(default=1, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."})
    learning_rate: float = field(default=4.0e-5, metadata={"help": "Peak learning rate."})
    wd: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-7, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha_ratio: float = field(default=2, metadata={"help": "LoRA alpha = round(rank x ratio)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    no_tqdm: bool = field(default=False, metadata={"help": "Disable progress bars (also --no-tqdm)."})
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Token budget per sample (image tokens included): longer samples are skipped, never "
                  "truncated. Default: no limit."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    skip_eval_before: bool = field(default=False, metadata={"help": "Skip the evaluation before training."})
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts per process per generation batch."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer in evaluation."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints in output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Resume from this checkpoint directory. By default training resumes from the newest "
                  "checkpoint-N in output_dir if there is one (see --no_auto_resume)."},
    )
    no_auto_resume: bool = field(default=False, metadata={"help": "Start fresh even if output_dir has checkpoints."})
    deepspeed: str | None = field(
        default=None,
        metadata={"help": "DeepSpeed config for full fine-tuning (default: ds_config_zero2.json; 'none' to train "
                  "without DeepSpeed). LoRA/QLoRA always run plain DDP."},
    )
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    packing: bool = field(
        default=False,
        metadata={"help": "Concatenate each per-GPU batch into one sequence (no padding; samples stay independent)."},
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch samples of similar token counts together (less padding); ignored with --packing."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Data-loading worker processes per GPU."})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, LoRA init)."})
    report_to: str = field(default="none", metadata={"help": "Where to report metrics: none, tensorboard, wandb..."})

    def __post_init__(self):
        if self.use_qlora:
            self.use_lora = True
        if self.num_crops < 1:
            raise ValueError(f"--num_crops must be >= 1, got {self.num_crops}")
        if self.batch_size < 1 or self.batch_size_per_gpu < 1:
            raise ValueError("--batch_size and --batch_size_per_gpu must be >= 1")

    @cached_property
    def training_args(self) -> TrainingArguments:
        """The Trainer's arguments; creating them also starts torch.distributed under torchrun."""
        return training_arguments(self)


def parse_args(task_arguments: type | None = None, argv: Sequence[str] | None = None, **defaults: Any):
    """Parses the shared flags (plus a task's own dataclass); `defaults` override per task."""
    dataclasses_ = [FinetuneArguments] + ([task_arguments] if task_arguments else [])
    parser = HfArgumentParser(dataclasses_)
    parser.set_defaults(**defaults)
    parsed = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    return parsed if task_arguments else parsed[0]


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def deepspeed_config(args: FinetuneArguments) -> str | None:
    """The DeepSpeed config to use, or None (LoRA/QLoRA, or --deepspeed none)."""
    if args.use_lora or (args.deepspeed or "").lower() == "none":
        return None
    path = args.deepspeed or str(DEFAULT_DEEPSPEED_CONFIG)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--deepspeed {path}: no such file")
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError(
            "Full fine-tuning runs under DeepSpeed, which needs torchrun even for one process: "
            f"torchrun --nproc_per_node=1 {Path(sys.argv[0]).name} ...  (or pass --deepspeed none)"
        )
    return path


def training_arguments(args: FinetuneArguments) -> TrainingArguments:
    """TrainingArguments for the recipe; gradient accumulation derived from the global batch."""
    use_cpu = not torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = world_size * args.batch_size_per_gpu
    if args.batch_size % per_step:
        raise ValueError(
            f"--batch_size {args.batch_size} must be a multiple of processes x --batch_size_per_gpu = "
            f"{world_size} x {args.batch_size_per_gpu} = {per_step}"
        )
    fp16 = not args.bf16 and not use_cpu  # CPU has no fp16 autocast in the Trainer: it would silently run fp32
    if not args.bf16 and use_cpu:
        logger.warning("No GPU: fp16 mixed precision is unavailable on CPU, training in fp32 (pass --bf16 for bf16).")
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        gradient_accumulation_steps=args.batch_size // per_step,
        learning_rate=args.learning_rate,
        weight_decay=args.wd,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        bf16=args.bf16,
        fp16=fp16,
        use_cpu=use_cpu,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        deepspeed=deepspeed_config(args),
        # Every trainable parameter gets a gradient in every step (text-only batches included, see
        # Phi3VModel.unused_vision_term), so DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        save_only_model=False,
        dataloader_num_workers=args.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if args.group_by_length and not args.packing else "random",
        remove_unused_columns=False,
        disable_tqdm=args.no_tqdm,
        seed=args.seed,
        data_seed=args.seed,
        report_to=args.report_to,
    )


def lora_target_modules(model: Phi3VForCausalLM, include_vision: bool) -> list[str]:
    """Full names of the reference recipe's LoRA targets present in `model`.

    Vision targets stop at the CLIP feature layer: the later layers never run, and adapters on
    them would wait forever for a gradient under DDP.
    """
    tower = model.model.vision_embed_tokens.img_processor
    used_vision_layers = {f"encoder.layers.{i}." for i in range(tower.num_layers_used)}
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name == "lm_head" or (name.startswith("model.layers.") and leaf in LANGUAGE_LORA_TARGETS):
            targets.append(name)
        elif include_vision and name.startswith("model.vision_embed_tokens."):
            if name.endswith(("img_projection.0", "img_projection.2")):
                targets.append(name)
            elif leaf in VISION_LORA_TARGETS and any(layer in name for layer in used_vision_layers):
                targets.append(name)
    return targets


def load_model_and_processor(args: FinetuneArguments) -> tuple[torch.nn.Module, Phi3VProcessor]:
    """The model set up for the chosen mode (full, frozen vision, LoRA, QLoRA), and its processor."""
    args.training_args  # start torch.distributed first: evaluation before training is sharded too
    processor = Phi3VProcessor.from_pretrained(args.model_name_or_path)
    on_gpu = torch.cuda.is_available()
    half = torch.bfloat16 if args.bf16 else (torch.float16 if on_gpu else torch.float32)
    kwargs: dict[str, Any] = {
        "attn_implementation": training_attention(args.use_flash_attention, args.packing),
        # Full fine-tuning keeps fp32 master weights (DeepSpeed/AMP run the half precision);
        # LoRA's frozen base can live in half precision.
        "dtype": half if args.use_lora else torch.float32,
    }
    if args.use_qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half,
        )
        if on_gpu:
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = Phi3VForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    model.generation_config.eos_token_id = stop_token_ids(processor.tokenizer)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.model.vision_embed_tokens.img_processor.freeze_unused()

    if args.freeze_vision_model:
        model.model.vision_embed_tokens.requires_grad_(False)
    if args.use_lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.use_qlora:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
            lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=lora_target_modules(model, include_vision=not args.freeze_vision_model),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if is_main_process():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"Model {args.model_name_or_path}: {mode_name(args)}, trainable {trainable:,} of {total:,} parameters")
    return model, processor


def mode_name(args: FinetuneArguments) -> str:
    mode = "QLoRA" if args.use_qlora else "LoRA" if args.use_lora else "full fine-tuning"
    return mode + (" (vision frozen)" if args.freeze_vision_model else "")


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
    from tqdm.auto import tqdm

    kept, lengths = [], []
    headers = sizes_only(rows)  # image sizes from file headers: no pixel decoding for a whole dataset
    for index in tqdm(range(len(rows)), desc="Counting tokens", disable=disable_tqdm or not is_main_process()):
        conversation, images = format_example(headers[index])
        n = count_tokens(processor, conversation, [image.size for image in images], num_crops)
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
    and knows nothing of LongRoPE's switch (see LongRopeSidesSampler).
    """

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


def train(
    model: torch.nn.Module,
    processor: Phi3VProcessor,
    rows: Sequence[Any],
    format_example: FormatExample,
    args: FinetuneArguments,
) -> Trainer:
    """Trains on `rows` (resuming from the newest checkpoint when there is one) and returns the Trainer."""
    if args.max_train_samples is not None:
        rows = [rows[i] for i in range(min(args.max_train_samples, len(rows)))]
    kept, lengths = filter_by_length(rows, format_example, processor, args.num_crops, args.max_seq_length, args.no_tqdm)
    trainer = Phi3VTrainer(
        model=model,
        args=args.training_args,
        train_dataset=RowsDataset(rows, kept, lengths),
        data_collator=Phi3VDataCollator(processor, format_example, args.num_crops, packing=args.packing),
    )
    resume = args.resume_from_checkpoint
    if resume is None and not args.no_auto_resume and Path(args.output_dir).is_dir():
        resume = get_last_checkpoint(args.output_dir)
        if resume and is_main_process():
            print(f"Resuming from {resume} (pass --no_auto_resume to start over)")
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def save(trainer: Trainer, processor: Phi3VProcessor, args: FinetuneArguments) -> None:
    """Final model (full weights in the Hub layout, or the LoRA adapter) and processor in output_dir."""
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.image_processor.num_crops = args.num_crops  # what the model was trained with: generate's default
        processor.save_pretrained(args.output_dir)
        if args.use_lora:
            merge = shlex.join(["python", "-m", "phi3v.merge_lora", "--base", args.model_name_or_path,
                                "--adapter", args.output_dir, "--out", "MERGED_DIR"])
            print(f"Saved the LoRA adapter to {args.output_dir}. Merge it into a full model with:\n  {merge}")
        else:
            print(f"Saved the fine-tuned model to {args.output_dir}: Phi3VForCausalLM.from_pretrained({args.output_dir!r})")


def print_try_command(args: FinetuneArguments, example_image: str | None = None) -> None:
    """The run's last words: the command that tries the result (call after the evaluation after training)."""
    if is_main_process():
        command = try_command(args.output_dir, args.model_name_or_path, args.use_lora, example_image)
        print(f"Try it with:\n  {command}")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def stop(message: str) -> None:
    """Ends the run with a message (printed once, by the main process) and exit status 1."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def finish() -> None:
    """Ends a distributed run cleanly: all ranks meet, then each process exits at once.

    At interpreter shutdown, threads of the communication backends (gloo, DeepSpeed's CPU
    shared-memory op) sometimes abort with "terminate called without an active exception",
    which turns a finished run into a failed one (seen on CPU in about one run in eight, even
    after destroy_process_group). Everything is written by then, so skip that shutdown.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def evaluate(model, processor, rows, format_example: FormatExample, metric: str, args: FinetuneArguments, when: str) -> dict:
    """Batched, sharded evaluation written to `output_dir/eval_{when}.json`; returns the summary."""
    from .evaluation import evaluate as run_evaluation

    if args.max_eval_samples is not None:
        rows = [rows[i] for i in range(min(args.max_eval_samples, len(rows)))]
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")  # before training the Trainer hasn't placed it yet
    summary = run_evaluation(
        model,
        processor,
        rows,
        format_example,
        metric,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens,
        num_crops=args.num_crops,
        output_file=Path(args.output_dir) / f"eval_{when}.json",
        disable_tqdm=args.no_tqdm,
    )
    if is_main_process():
        print(f"Evaluation {when} training: {metric} {100 * summary['score']:.2f} on {summary['num_examples']} examples")
    return summary
