"""The recipes' flags: every `TrainingArguments` flag, plus the model, LoRA and data options.

    args = parse_args(TaskArguments, argv)   # args.training, args.model, args.lora, args.data, args.task

`RecipeTrainingArguments` is `transformers.TrainingArguments` with the reference recipe's defaults
and its flag names as aliases (`--wd`, `--batch_size_per_gpu`, `--no-tqdm`, `--gradient_checkpointing`),
plus `--batch_size`, the global batch from which gradient accumulation is derived. Any other
Trainer flag (`--optim`, `--lr_scheduler_kwargs`, `--save_only_model`, `--push_to_hub`...) works as
transformers documents it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
from transformers.utils import logging

from ..attention import native_bf16
from ..distributed import print_once
from ..errors import SetupError, report_setup_errors
from ..files import cannot_write_in
from .sharding import enable_fsdp_on_cpu

logger = logging.get_logger(__name__)

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[2] / "ds_config_zero2.json"


class FlagError(SetupError, ValueError):
    """A flag with a value that cannot work; the message names the flag."""

    exit_status = 2


@dataclass
class ModelArguments:
    """The model and how it is set up."""

    _argument_group_name = "model"

    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct",
        metadata={"help": "Hub id or local directory of a Phi-3(.5)-vision or Phi-4-multimodal checkpoint."},
    )
    num_crops: int | None = field(
        default=16, metadata={"help": "Max crops per image: 336x336 for Phi-3(.5)-vision (HD transform), 448x448 for "
                              "Phi-4-multimodal (its dynamic_hd). None only until a recipe picks its default from the "
                              "data (finetune_hf_trainer_custom.py)."}
    )
    use_flash_attention: bool = field(
        default=False, metadata={"help": "Use flash-attn 2 (bf16/fp16 on GPU); SDPA when flash-attn is not installed."}
    )
    freeze_vision_model: bool = field(
        default=False, metadata={"help": "Freeze the image encoder (CLIP or SigLIP, projection and separators)."}
    )
    cache_vision_features: bool = field(
        default=False,
        metadata={"help": "With --freeze_vision_model: compute each training sample's image features once (a pre-pass "
                  "before training) and reuse them in every epoch, bit-identical to recomputing them. Kept in "
                  "output_dir/vision_features (the system keeps in memory what fits; a resumed run reuses them) and "
                  "removed when training ends. A sample whose pixels change between epochs stops the run."},
    )
    remote_code_repo: str | None = field(
        default=None,
        metadata={"help": "Hub repo of the original code that the saved config.json and processor files name in "
                  "their auto_map, for vLLM and trust_remote_code readers (default: the repo the model came from; "
                  "microsoft/Phi-3.5-vision-instruct for a local copy)."},
    )

    def __post_init__(self):
        if self.num_crops is not None and self.num_crops < 1:
            raise FlagError(f"--num_crops must be at least 1, got {self.num_crops}")
        if self.cache_vision_features and not self.freeze_vision_model:
            raise FlagError("--cache_vision_features needs --freeze_vision_model: the features of a vision tower or "
                            "projector that trains (fully or with LoRA) change at every step")


@dataclass
class LoraArguments:
    """LoRA and QLoRA (the default is full fine-tuning)."""

    _argument_group_name = "LoRA"

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    use_qlora: bool = field(default=False, metadata={"help": "4-bit NF4 base weights + LoRA (implies --use_lora)."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha_ratio: float = field(default=2, metadata={"help": "LoRA alpha = round(rank x ratio)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    continue_vision_lora: bool = field(
        default=False,
        metadata={"help": "Phi-4-multimodal: train the checkpoint's own vision LoRA (vision-lora/, r 256) and the "
                  "image embedding, the language model frozen: Microsoft's Phi-4-MM vision fine-tuning recipe. "
                  "Saves a full model with that LoRA merged in."},
    )

    def __post_init__(self):
        if self.continue_vision_lora and self.use_lora:
            raise FlagError("--continue_vision_lora trains the shipped vision LoRA: it does not go with --use_lora or "
                            "--use_qlora (a new adapter)")
        if self.use_qlora:
            self.use_lora = True
        if self.lora_rank < 1:
            raise FlagError(f"--lora_rank must be at least 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise FlagError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataArguments:
    """Which samples train and evaluate, and how answers are generated in evaluation."""

    _argument_group_name = "data and evaluation"

    dataset_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Use this dataset instead of the task's Hub dataset: a Hub id, a directory written by "
                  "DatasetDict.save_to_disk, or a folder of parquet files with the same schema."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Token budget per sample (image tokens included): longer samples are skipped, never "
                  "truncated. Default: no limit."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    skip_eval_before: bool = field(default=False, metadata={"help": "Skip the evaluation before training."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer in evaluation."})
    max_bad_samples: int | None = field(
        default=None,
        metadata={"help": "Unreadable samples (e.g. truncated images) met during training are named, skipped and "
                  "replaced; past this many the run saves a checkpoint and stops. Default: 1%% of the training "
                  "samples."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Concatenate each per-GPU batch into one sequence (no padding; samples stay independent)."},
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch samples of similar token counts together (less padding); off with --packing. "
                  "Sets --train_sampling_strategy group_by_length (on) or random (off)."},
    )

    def __post_init__(self):
        if self.max_bad_samples is not None and self.max_bad_samples < 0:
            raise FlagError(f"--max_bad_samples must be at least 0, got {self.max_bad_samples}")
        for flag in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_new_tokens"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise FlagError(f"--{flag} must be at least 1, got {value}")


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the reference recipe's defaults and flag names."""

    _argument_group_name = "training (every transformers TrainingArguments flag)"

    output_dir: str = field(default="./output/", metadata={"help": "Where checkpoints, the final model and eval files go."})
    batch_size: int = field(
        default=16,
        metadata={"help": "Global batch size: processes x --batch_size_per_gpu x gradient accumulation (derived; "
                  "it must divide)."},
    )
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Samples per process and step.", "aliases": ["--batch_size_per_gpu"]}
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "Prompts per process per generation batch in evaluation.",
                             "aliases": ["--eval_batch_size"]}
    )
    num_train_epochs: float = field(default=1, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=4.0e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay.", "aliases": ["--wd"]})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-7, metadata={"help": "AdamW epsilon."})
    warmup_steps: float = field(default=50, metadata={"help": "Linear warm-up steps (a float < 1: a ratio of all steps)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Save a checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints in output_dir."})
    gradient_checkpointing: str = field(
        default="auto",
        metadata={"help": "Recompute activations in the backward pass: auto (only as many layers as memory needs, "
                  "see --memory_budget_gb; on CPU without it every layer), true (every layer) or false "
                  "(--no_gradient_checkpointing). --activation_checkpointing true|false, when given, wins.",
                  "nargs": "?", "const": "true"},
    )
    memory_budget_gb: float | None = field(
        default=None,
        metadata={"help": "GB per GPU a training step may use, for --gradient_checkpointing auto (default: the GPU "
                  "memory free to the process, less DeepSpeed's and NCCL's buffers and 5%% for fragmentation)."},
    )
    auto_checkpointing: bool = field(default=False, init=False, metadata={"help": "Set from --gradient_checkpointing."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Data-loading worker processes per GPU."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars.", "aliases": ["--no-tqdm", "--no_tqdm"]})
    report_to: str | None = field(
        default="none", metadata={"help": "Where to report metrics: none, tensorboard, wandb... (or all)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: format_example reads the raw rows."}
    )
    # Every trainable parameter gets a gradient in every step (text-only batches included, see
    # Phi3VModel.unused_vision_term), so DDP need not search the graph for unused ones.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Let DDP look for parameters without gradients (not needed here)."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Sample order: group_by_length (batches of similar token counts, LongRoPE-aware), random, "
                  "sequential.", "choices": ["random", "sequential", "group_by_length"]},
    )
    deepspeed: str | None = field(
        default=None,
        metadata={"help": "DeepSpeed config for full fine-tuning (default: ds_config_zero2.json; ds_config_zero3.json "
                  "shards the weights too; 'none' to train without DeepSpeed). Not with --fsdp. LoRA/QLoRA run plain "
                  "DDP."},
    )
    no_auto_resume: bool = field(
        default=False,
        metadata={"help": "Start fresh even if output_dir has checkpoints (by default a run resumes from the newest "
                  "checkpoint-N there; --resume_from_checkpoint picks one)."},
    )

    def __post_init__(self):
        if self.batch_size < 1 or self.per_device_train_batch_size < 1:
            raise FlagError("--batch_size and --batch_size_per_gpu must be at least 1, got "
                            f"{self.batch_size} and {self.per_device_train_batch_size}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:  # else the untrained model is saved as trained
            raise FlagError(f"--num_train_epochs must be above 0 (or --max_steps at least 1), got "
                            f"{self.num_train_epochs:g}")
        if self.per_device_eval_batch_size < 1:
            raise FlagError(f"--eval_batch_size must be at least 1, got {self.per_device_eval_batch_size}")
        for name in self._VALID_DICT_FIELDS:  # transformers reads a value starting with "{" as JSON
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("{"):
                try:
                    json.loads(value)
                except ValueError as e:
                    raise FlagError(f"--{name} {value}: not valid JSON ({e})") from None
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = world_size * self.per_device_train_batch_size
        if self.batch_size % per_step:
            raise FlagError(
                f"--batch_size {self.batch_size} must be a multiple of processes x --batch_size_per_gpu = "
                f"{world_size} x {self.per_device_train_batch_size} = {per_step}"
            )
        self.gradient_accumulation_steps = self.batch_size // per_step
        gpus = torch.cuda.device_count() if torch.cuda.is_available() and not self.use_cpu else 0
        if gpus > 1 and "LOCAL_RANK" not in os.environ:
            # The Trainer would wrap the model in nn.DataParallel, which splits pixel_values by image and
            # input_ids by sample (pairing them wrongly) and multiplies the global batch by the GPU count.
            raise FlagError(f"{gpus} GPUs are visible to one process: run it with torchrun --nproc_per_node={gpus} "
                            f"{Path(sys.argv[0]).name} ... (or CUDA_VISIBLE_DEVICES=0 for one GPU)")
        # `gradient_checkpointing` is the guide's name for `activation_checkpointing` (transformers
        # deprecates it), plus "auto": the one the user set wins, the other mirrors it.
        choice = CHECKPOINTING_CHOICES.get(str(self.gradient_checkpointing).lower())
        if choice is None:
            raise FlagError(f"--gradient_checkpointing {self.gradient_checkpointing}: auto, true or false")
        if self.activation_checkpointing is None:
            self.activation_checkpointing = choice != "false"
            self.auto_checkpointing = choice == "auto"
        self.gradient_checkpointing = None
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise FlagError(f"--memory_budget_gb {self.memory_budget_gb}: must be positive")
        if self.activation_checkpointing and self.fsdp:
            # FSDP checkpoints activations itself, in every layer it wraps (no per-layer auto plan): the Trainer's
            # way would all-gather each layer's weights a second time in the backward pass (transformers
            # refuses both at once).
            config = self.fsdp_config if isinstance(self.fsdp_config, dict) else json_file("fsdp_config", self.fsdp_config)
            self.fsdp_config = {**config, "activation_checkpointing": True}
            self.activation_checkpointing = self.auto_checkpointing = False
        if self.activation_checkpointing and self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        if not torch.cuda.is_available():
            # Without use_cpu, accelerate finds no backend for DeepSpeed/gloo runs on CPU.
            self.use_cpu = True
        if self.fsdp and self.use_cpu:
            enable_fsdp_on_cpu()
        if self.bf16 and not self.use_cpu and not native_bf16():
            # transformers checks torch.cuda.is_bf16_supported(), which also says yes where bf16 is emulated
            major, minor = torch.cuda.get_device_capability()
            logger.warning(f"--bf16: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) only emulates "
                           "bf16, many times slower: training in fp16 instead.")
            self.bf16, self.fp16 = False, True
        if self.use_cpu and self.fp16:  # the Trainer has no fp16 autocast on CPU: it would silently run fp32
            logger.warning("--fp16: fp16 mixed precision is unavailable on CPU, training in fp32 (pass --bf16 for "
                           "bf16).")
            self.fp16 = False  # and evaluation computes in fp32 too, as training does
        elif not self.bf16 and not self.fp16:
            if self.use_cpu:
                logger.warning("No GPU: fp16 mixed precision is unavailable on CPU, training in fp32 (pass --bf16 "
                               "for bf16).")
            else:
                self.fp16 = True  # the reference recipe: bf16 when asked for, else fp16
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        unknown = [name for name in names if name not in ("none", "all", *INTEGRATION_TO_CALLBACK)]
        if unknown:  # the Trainer would refuse it only once the model is loaded
            raise FlagError(f"--report_to {unknown[0]}: not one of none, all, {', '.join(INTEGRATION_TO_CALLBACK)}")
        super().__post_init__()


@dataclass
class RecipeArguments:
    """What `parse_args` returns: one object per flag group, and the task's own (None without one)."""

    training: RecipeTrainingArguments
    model: ModelArguments
    lora: LoraArguments
    data: DataArguments
    task: Any = None


def json_file(flag: str, path: str | None) -> dict:
    """The JSON config file a flag names (None: an empty config); a missing or broken file is a FlagError."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FlagError(f"--{flag} {path}: no such file")
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise FlagError(f"--{flag} {path}: not valid JSON ({e})") from None


def deepspeed_config(value: str | None, use_lora: bool, fsdp: Any = None) -> str | None:
    """The DeepSpeed config a run uses: the default ZeRO-2 file for full fine-tuning, None for LoRA, 'none' or
    --fsdp (FSDP shards the model instead; asking for both is a FlagError)."""
    if (value or "").lower() == "none":
        return None
    if fsdp:
        if value:
            raise FlagError(f"--deepspeed {value} and --fsdp both shard the model: pass one of them")
        return None
    if use_lora:
        if value:
            print_once(f"warning: --deepspeed {value} is ignored: LoRA and QLoRA train under plain DDP.",
                       file=sys.stderr)
        return None
    path = value or str(DEFAULT_DEEPSPEED_CONFIG)
    json_file("deepspeed", path)
    if "LOCAL_RANK" not in os.environ:
        raise FlagError(
            "full fine-tuning runs under DeepSpeed, which needs torchrun even for one process: "
            f"torchrun --nproc_per_node=1 {Path(sys.argv[0]).name} ...  (or pass --deepspeed none)"
        )
    return path


class RecipeArgumentParser(HfArgumentParser):
    """HfArgumentParser that takes no abbreviated flags and suggests the flag a typo meant."""

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--flag value ...]  (flags by group below; booleans also take true/false)")
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    def _print_message(self, message, file=None):
        if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
            super()._print_message(message, file)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown.group(1).split("=")[0]
            flags = [option for action in self._actions for option in action.option_strings]
            # A flag cut short (no abbreviations are taken) means one it begins, before any that merely look alike.
            close = (difflib.get_close_matches(flag, [f for f in flags if f.startswith(flag)], n=1, cutoff=0)
                     or difflib.get_close_matches(flag, flags, n=1))
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


CHECKPOINTING_CHOICES = {"auto": "auto", "true": "true", "yes": "true", "1": "true", "false": "false", "no": "false",
                         "0": "false"}


def build_parser(task_arguments: type | None = None) -> RecipeArgumentParser:
    groups = [ModelArguments, LoraArguments, DataArguments, RecipeTrainingArguments]
    return RecipeArgumentParser(groups + ([task_arguments] if task_arguments else []))


def warn_ignored_flags(parser: RecipeArgumentParser, values: dict[str, Any], lora: LoraArguments) -> None:
    """Flags set to a non-default value that the chosen mode does not use."""
    if not lora.use_lora:
        ignored = [f"--{name}" for name in ("lora_rank", "lora_alpha_ratio", "lora_dropout")
                   if values[name] != parser.get_default(name)]
        if ignored:
            print_once(f"warning: {', '.join(ignored)} ignored: without --use_lora or --use_qlora all weights train.",
                       file=sys.stderr)


def parse_args(task_arguments: type | None = None, argv: Sequence[str] | None = None, **defaults: Any) -> RecipeArguments:
    """Parses the recipe flags (and a task's own dataclass); `defaults` change per-task defaults.

    A bad value ends the program with a one-line message naming the flag (exit status 2).
    Creating the training arguments also starts torch.distributed under torchrun.
    """
    report_setup_errors()
    parser = build_parser(task_arguments)
    parser.set_defaults(**defaults)
    argv = ["--gradient_checkpointing=false" if a == "--no_gradient_checkpointing" else a
            for a in (sys.argv[1:] if argv is None else argv)]
    namespace = parser.parse_args(argv)
    values = vars(namespace)

    def build(dataclass: type):
        return dataclass(**{f.name: values[f.name] for f in fields(dataclass) if f.init and f.name in values})

    try:
        model, lora, data = build(ModelArguments), build(LoraArguments), build(DataArguments)
        task = build(task_arguments) if task_arguments else None
        if Path(values["output_dir"]).exists() and not Path(values["output_dir"]).is_dir():
            raise FlagError(f"--output_dir {values['output_dir']}: a file, not a folder")
        if problem := cannot_write_in(values["output_dir"]):
            raise FlagError(f"--output_dir {values['output_dir']}: cannot write there ({problem})")
        warn_ignored_flags(parser, values, lora)
        # The mode decides what the Trainer runs under, so these resolve before the Trainer's arguments exist.
        values["deepspeed"] = deepspeed_config(values["deepspeed"], lora.use_lora, values["fsdp"])
        if (not data.group_by_length or data.packing) and values["train_sampling_strategy"] == "group_by_length":
            values["train_sampling_strategy"] = "random"
        training = build(RecipeTrainingArguments)
    except FlagError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return RecipeArguments(training=training, model=model, lora=lora, data=data, task=task)
