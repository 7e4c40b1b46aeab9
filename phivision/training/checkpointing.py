"""--gradient_checkpointing auto: recompute the activations of only as many layers as memory requires.

Checkpointing every layer costs a third more compute (each layer's forward runs twice); with memory to
spare, most runs need none of it (LoRA and QLoRA hold 2-10 GB of weights on 40-80 GB GPUs). At the start of
training the plan measures, on the meta device (phivision.training.sizing), what one layer of the LM and of the
vision tower keeps for the backward pass on the longest batch, and checkpoints the fewest layers that fit
the budget: the GPU memory this process can still have (free memory plus what its allocator holds) less
DeepSpeed's communication buffers, NCCL's and a margin for fragmentation, or --memory_budget_gb. A frozen
tower has nothing to recompute and is never checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ..distributed import print_once
from ..families import family_of_model
from .arguments import LoraArguments, ModelArguments, RecipeArguments
from .sharding import sharding_strategy
from .sizing import Layout, StepCost, meta_model, sample_layout, state_bytes, step_cost

FRAGMENTATION_SHARE = 0.05  # of the GPU's memory: the caching allocator's rounding and fragmented blocks
# NCCL's buffers live outside torch's allocator; the first collectives of each kind and channel allocate more
# (4 MiB per channel and peer by default, NVLS and tree buffers on top).
NCCL_RESERVE_BYTES = 1 << 29


@dataclass
class LayerGroup:
    """Layers of one kind that a plan checkpoints or not: each keeps `saved_bytes` more for the backward pass
    when it is not checkpointed, and saves `flops` of recomputation."""

    name: str
    layers: list[torch.nn.Module]
    saved_bytes: int
    flops: int
    checkpointed: int = 0


@dataclass
class CheckpointingPlan:
    groups: list[LayerGroup]
    needed_bytes: int  # weights, gradients, optimizer states and activations with this plan
    budget_bytes: int

    def describe(self) -> str:
        layers = ", ".join(f"{g.checkpointed} of {len(g.layers)} {g.name} layers" for g in self.groups)
        fits = "" if self.needed_bytes <= self.budget_bytes else " (does not fit even so: lower --batch_size_per_gpu)"
        return (f"Gradient checkpointing auto: checkpointing {layers}: {self.needed_bytes / 1e9:.3g} GB of "
                f"{self.budget_bytes / 1e9:.3g}{fits}")


def checkpointable_layers(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The LM's decoder layers and the vision tower's layers that run and train (a frozen tower has none), by
    the model's family."""
    return family_of_model(model).checkpointable_layers(model)


def set_checkpointing(groups: dict[str, list[torch.nn.Module]], counts: dict[str, int]) -> None:
    """Checkpoint the first `counts[name]` layers of each group (after the Trainer enabled checkpointing on all)."""
    for name, layers in groups.items():
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < counts.get(name, len(layers))


def plan_checkpointing(model: torch.nn.Module, model_args: ModelArguments, lora: LoraArguments,
                       layout: Layout, batch_size: int, gpus: int,
                       strategy: str, budget_bytes: int) -> CheckpointingPlan:
    """The fewest checkpointed layers whose step fits `budget_bytes`, for the longest sample (`layout`, as
    `step_cost` takes it) `batch_size` times.

    Layers whose recomputation costs the most FLOPs per byte they keep are left unchecked first. Besides
    the activations held when the forward pass ends, the backward pass needs one layer's activations more
    (a checkpointed layer recomputed) and the logits' gradient: counted as one more unchecked layer.
    """
    meta = meta_model(model.config, model_args, lora)
    layers = checkpointable_layers(meta)

    def cost(counts: dict[str, int]) -> StepCost:
        set_checkpointing(layers, counts)
        return step_cost(meta, *layout)

    everything = cost({})
    groups = []
    for name, group in layers.items():
        if group:
            without = cost({name: 0})
            groups.append(LayerGroup(name, checkpointable_layers(model)[name],
                                     math.ceil((without.activation_bytes - everything.activation_bytes) / len(group)),
                                     (everything.flops - without.flops) // len(group), len(group)))
    state = state_bytes(meta, lora, gpus, strategy).total
    transient = max((g.saved_bytes for g in groups), default=0)
    needed = state + batch_size * (everything.activation_bytes + transient)
    for group in sorted(groups, key=lambda g: g.flops / max(g.saved_bytes, 1), reverse=True):
        unchecked = min(group.checkpointed, max(0, (budget_bytes - needed) // max(batch_size * group.saved_bytes, 1)))
        group.checkpointed -= unchecked
        needed += unchecked * batch_size * group.saved_bytes
    return CheckpointingPlan(groups, needed, budget_bytes)


def longest_layout(samples: Sequence[dict], config) -> Layout:
    """The layout of the longest of the encoded `samples` (a dataset with their token counts in `lengths`), for a
    model of `config`."""
    longest = samples[max(range(len(samples.lengths)), key=samples.lengths.__getitem__)]
    return sample_layout(config, longest["input_ids"], longest["labels"], longest.get("image_sizes"))


def deepspeed_buffer_bytes(config: dict | None) -> int:
    """Bytes of the communication buffers DeepSpeed allocates on the GPU for a step, from its (finalised) config,
    whose sizes are in elements; 0 without ZeRO.

    ZeRO-1/2 reduce gradients through `reduce_bucket_size` buffers (two with overlap_comm) in the gradient
    accumulation dtype (stage_1_and_2.py, `ipg_buckets`); their all-gather of updated weights writes into the
    weights' own flat buffers in chunks of `allgather_bucket_size` (runtime/utils.py, `all_gather_dp_groups`),
    with no buffer of its own. ZeRO-3 reduces through one 16-bit `reduce_bucket_size` buffer (stage3.py) and
    holds `stage3_prefetch_bucket_size` 16-bit elements gathered ahead of the layer that runs.
    """
    zero = (config or {}).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))

    def elements(key: str, default: float) -> int:  # "auto" left unresolved: DeepSpeed's default
        value = zero.get(key, default)
        return int(value if isinstance(value, (int, float)) else default)

    reduce_buffers = elements("reduce_bucket_size", 5e8) if zero.get("contiguous_gradients", True) else 0
    if stage in (1, 2):
        grad_bytes = 4 if (config.get("data_types") or {}).get("grad_accum_dtype") == "fp32" else 2
        return reduce_buffers * grad_bytes * (2 if zero.get("overlap_comm", False) else 1)
    if stage == 3:
        return 2 * (reduce_buffers + elements("stage3_prefetch_bucket_size", 5e7))
    return 0


def memory_budget(budget_gb: float | None, device: torch.device, reserve_bytes: int = 0) -> int | None:
    """Bytes a step may use: --memory_budget_gb, else what this process can still have of the GPU, less
    `reserve_bytes` (communication buffers) and a margin for fragmentation; None on CPU (no default there: every
    layer stays checkpointed).

    Free memory already leaves out the CUDA context and other processes; what this process's allocator holds
    (the weights and states loaded so far) is counted back, since the plan counts the whole training state.
    """
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - reserve_bytes - FRAGMENTATION_SHARE * total)
    return None


def apply_auto_checkpointing(model: torch.nn.Module, model_args: ModelArguments, lora: LoraArguments,
                             layout: Layout, batch_size: int, gpus: int,
                             strategy: str, budget_gb: float | None, device: torch.device,
                             reserve_bytes: int = 0) -> CheckpointingPlan | None:
    """Plans and sets per-layer checkpointing on `model`; says what it chose. None (every layer checkpointed)
    on CPU without a budget. `reserve_bytes`: GPU memory the step needs besides the plan's (communication)."""
    budget = memory_budget(budget_gb, device, reserve_bytes)
    if budget is None:
        print_once("Gradient checkpointing auto: every layer checkpointed (on CPU without --memory_budget_gb).")
        return None
    plan = plan_checkpointing(model, model_args, lora, layout, batch_size, gpus, strategy, budget)
    set_checkpointing({g.name: g.layers for g in plan.groups}, {g.name: g.checkpointed for g in plan.groups})
    print_once(plan.describe())
    return plan


class AutoCheckpointing(TrainerCallback):
    """--gradient_checkpointing auto: the plan, set once the Trainer has turned checkpointing on for every layer."""

    def __init__(self, args: RecipeArguments, longest: Layout):
        self.args, self.longest, self.plan = args, longest, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        training = self.args.training
        self.plan = apply_auto_checkpointing(model, self.args.model, self.args.lora, self.longest,
                                             training.per_device_train_batch_size, training.world_size,
                                             sharding_strategy(training), training.memory_budget_gb, training.device,
                                             communication_reserve(training))


def communication_reserve(training) -> int:
    """GPU bytes a run's communication takes outside the plan: DeepSpeed's buffers (its config as the Trainer
    finalised it) and, with several processes, NCCL's."""
    ds_config = getattr(getattr(training, "hf_deepspeed_config", None), "config", None)
    return deepspeed_buffer_bytes(ds_config) + (NCCL_RESERVE_BYTES if training.world_size > 1 else 0)
