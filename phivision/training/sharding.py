"""Sharded full fine-tuning (DeepSpeed ZeRO-3, FSDP2) outside the Trainer's own steps.

Under ZeRO-3 every rank holds a slice of each weight from the moment the model is built
(`from_pretrained` builds it inside `deepspeed.zero.Init`): outside a gather a weight has shape [0].
The Trainer's DeepSpeed engine gathers them module by module in each forward pass, but only once
training has started; before that (the evaluation before training) and when a run finishes from its
last checkpoint without training, the recipe gathers them itself (`full_weights`).
FSDP2 shards the model only when the Trainer prepares it, so before that it is a plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled


def sharding_strategy(training: TrainingArguments) -> str:
    """How a full or frozen-vision run keeps its state (see phivision.training.sizing.state_bytes): "fsdp2",
    "zero3", "zero2" (also for ZeRO-1) or "ddp" (no DeepSpeed, no FSDP)."""
    if training.fsdp:
        return "fsdp2"
    if not training.deepspeed:
        return "ddp"
    return "zero3" if is_deepspeed_zero3_enabled() else "zero2"


def start_deepspeed_comm() -> None:
    """Makes DeepSpeed's communication layer use the process group torch.distributed already has.

    `zero.Init` counts the processes through that layer. On GPUs accelerate has started it by then;
    on CPU (gloo) it has not, and zero.Init would count one process and reject the batch sizes
    ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def is_partitioned_without_engine(model: torch.nn.Module) -> bool:
    """ZeRO-3 weights with no DeepSpeed engine to gather them in forward passes (before training starts)."""
    return is_deepspeed_zero3_enabled() and not hasattr(model, "ds_id")  # the engine numbers the modules it hooks


@contextlib.contextmanager
def full_weights(model: torch.nn.Module, modify: bool = False) -> Iterator[None]:
    """Every weight whole on every rank for the duration (ZeRO-3 before training; nothing to do otherwise).

    Costs the 16-bit model once per rank, as plain data-parallel evaluation does. With `modify`, what
    rank 0 writes into the weights (a loaded checkpoint) is partitioned back to every rank on exit.
    """
    if not is_partitioned_without_engine(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None):
        yield


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of a weight, also when ZeRO-3 holds only this rank's slice of it."""
    return getattr(parameter, "ds_numel", parameter.numel())


def keep_used_key_conversions(model: torch.nn.Module) -> None:
    """Saves under ZeRO-3 write the checkpoint's key names, as the load read them.

    A save reverts the key conversions the load applied. transformers' ZeRO-3 load
    (integrations/deepspeed.py, `model_to_load._weight_conversions = weight_mapping`) records every
    registered conversion, used or not, so the save would also revert CLIP's unused prefix removal and
    write `vision_model.vision_model.*` keys that no loader knows. The plain load keeps the used ones only.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def enable_fsdp_on_cpu() -> None:
    """Lets accelerate run FSDP on CPU processes (gloo), as it does on GPUs: for CPU-only CI and checks.

    accelerate turns FSDP on only for multi-GPU-like runs (accelerate/state.py, `AcceleratorState.__init__`:
    the FSDP branch sits under `self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]`), so a CPU run with
    --fsdp would silently train as plain DDP. torch's FSDP2 itself shards CPU tensors over gloo.
    """
    from accelerate import state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState.__init__, "fsdp_on_cpu", False):
        return
    original = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__.fsdp_on_cpu = True
    state.AcceleratorState.__init__ = __init__
