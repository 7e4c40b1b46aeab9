"""Training-efficiency benchmark: how much of the compute goes to padding, padded crops and unused logits.

    python -m phivision.bench                      # CPU: small model, DocVQA-like, full + LoRA (1-2 minutes)
    python -m phivision.bench --size full --device cuda --distribution all --modes full frozen lora qlora --steps 10
    python -m phivision.bench --size full --device meta --distribution all --modes full frozen lora qlora   # no GPU

Trains on generated inputs (random weights, no download), every row on the same samples (the first
--steps x --batch_size), and prints one row per configuration: samples/s, tokens/s (real tokens), peak
memory of a training step (GPU: the allocator's peak allocated and reserved; CPU: live tensor bytes, see
PeakTensorMemory), padding fraction (padding tokens / all tokens in the batches), executed/useful FLOPs
(torch.utils.flop_counter; useful = the same samples one by one: no padding, real crops only, logits only
where labels are not -100), bytes of the logits the loss reads, and MFU (the model's FLOPs: no
recomputation) beside HFU (every FLOP executed, checkpointed layers' recomputation included), both over
the timed batches (on GPU, or anywhere with --peak_tflops). Steps autocast to bf16 on GPUs with native bf16,
fp16 on older ones (V100, T4). The JSON rows name them samples_per_s, peak_allocated_gb, peak_reserved_gb,
mfu and hfu. Each mode's baseline row
behaves like the reference recipe in that mode: batch 1, every crop slot through CLIP, full-sequence
logits, every layer checkpointed, eager attention (flash attention with --attn flash_attention_2, as the
reference's --use_flash_attention); it is measured in the same run (--no_baseline skips it) and the
mode's other rows print their speed-up over it: the same samples, the same work.

With --torch_compile_backend each mode also gets a row timed under torch.compile (its FLOPs, and its peak
memory on CPU, are measured eagerly; compiling happens before the clock).

Length distributions (`--distribution`): docvqa (one document image, num_crops 16, about 2,400
tokens), memes (one photo, num_crops 16), nlvr2 (two photos, num_crops 4).
"""

import argparse
import contextlib
import functools
import json
import random
import re
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_pt_utils import LengthGroupedSampler

from .attention import native_bf16, training_attention
from .collator import pack_batch, pad_batch
from .families import family_for_type, family_of_model, known_families
from .phi3v.configuration import Phi3VConfig
from .phi3v.image_processing import CROP_SIZE, hd_image_size, num_image_tokens
from .phi3v.processing import Phi3VProcessor
from .phi4mm.image_processing import pad_crops
from .phi3v.family import reference_clip
from .training.sizing import STRATEGIES, Layout, StepCost, meta_model, mode_arguments, state_bytes, step_cost
from .training.arguments import LoraArguments, ModelArguments
from .training.modes import quantization_config, setup_mode
from .training.trainer import length_buckets
from .training.vision_cache import image_embedding


# name: (images per sample, num_crops, (width range), (height range), prompt tokens, answer tokens)
DISTRIBUTIONS = {
    "docvqa": (1, 16, (1000, 2500), (1200, 3300), (15, 40), (2, 10)),
    "memes": (1, 16, (300, 900), (300, 900), (20, 40), (1, 2)),
    "nlvr2": (2, 4, (300, 800), (200, 600), (15, 35), (1, 2)),
}
# Model sizes: "small" keeps the real vocabulary (so logits cost what they do) with narrow layers; "clip" is
# the full-size CLIP ViT-L/14-336 tower with a 2-layer, 64-wide LM: the vision tower dominates, as it does in
# frozen-vision and vision-LoRA steps at full size.
SIZES = {
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)),
    "clip": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vision=None),
    "tiny": None,  # phivision.tiny's config with the real vocabulary: for smoke tests
    "full": None,
}
FAMILIES = {"phi3v": "phi3_v", "phi4mm": "phi4_multimodal"}  # --family: its config.json model_type
BASELINE = "baseline (reference)"  # the rows that behave as the reference recipe, one per mode
# Dense 16-bit tensor-core TFLOP/s with fp32 accumulation (bf16; fp16 on V100 and T4, which have no bf16), by
# the words of torch.cuda.get_device_name(); the first entry whose words all appear wins.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
               "L4": 121.0, "A10": 125.0, "A6000": 155.0, "4090": 165.0, "3090": 71.0, "V100 PCIe": 112.0,
               "V100": 125.0, "T4": 65.0}


def peak_tflops(device_name: str) -> float | None:
    """The GPU's entry in PEAK_TFLOPS (None when it has none): "NVIDIA A10" is an A10, not an A100."""
    words = set(re.split(r"[\s-]+", device_name))
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if set(key.split()) <= words), None)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """What the steps autocast to: bf16 on GPUs that compute it natively, fp16 on older ones (V100, T4 only emulate
    bf16), none (fp32) on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


# torch's flop counter knows the GPU attention kernels but not the CPU one: count it the same way
# (the full q x k product, mask or not: what the kernel executes).
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensors while the block runs, on any device (CPU has no allocator statistics).

    Starts from the given tensors (weights, gradients, optimizer states) and adds every storage an
    op creates, each once however many views share it, until it is freed. A GPU allocator adds its
    rounding and cached blocks on top of this; `torch.cuda.max_memory_allocated` includes them.
    """

    def __init__(self, tensors):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage -> (weak reference, bytes)
        self.total = 0  # bytes of `live`, freed storages included until the next sweep
        for tensor in tensors:
            self._add(tensor)
        self.peak = self._sweep()

    def _add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        known = self.live.get(ref.cdata)
        if known is not None and not known[0].expired():
            return
        if known is not None:  # a freed storage's address taken by a new one
            self.total -= known[1]
        self.live[ref.cdata] = (ref, storage.nbytes())
        self.total += storage.nbytes()

    def _sweep(self) -> int:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.total -= self.live.pop(key)[1]
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self._add(tensor)
        if self.total > self.peak:  # only an upper bound: count what is really still alive
            self.peak = max(self.peak, self._sweep())
        return out


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Weights, buffers, gradients and optimizer states: what a step holds before it starts."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return tensors + [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    image_sizes: torch.Tensor  # [images, 2] (H, W) of the HD images
    num_crops: int
    seed: int
    crop_size: int = CROP_SIZE  # the family's crop side: image_sizes / crop_size is each image's grid
    # None: Phi-3-V's encoding (negative image ids, every image num_crops + 1 crop slots); else Phi-4-MM's
    # (this placeholder id, the sample's images padded to their most crops, with a patch attention mask).
    image_token_id: int | None = None
    crop_masks: list[torch.Tensor] | None = None  # Phi-4-MM: each image's [1 + crops, S/p, S/p] patch mask

    def as_dict(self) -> dict:
        """The collator's input; pixels are drawn here, so hundreds of samples don't hold GBs of crops."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.image_token_id is not None:
            crops, size = [len(mask) for mask in self.crop_masks], self.crop_size
            pixels = torch.zeros(len(crops), max(crops), 3, size, size)
            for i, real in enumerate(crops):
                pixels[i, :real] = torch.randn(real, 3, size, size, generator=generator)
            return {"input_ids": [self.image_token_id if i < 0 else i for i in self.input_ids], "labels": self.labels,
                    "image_pixel_values": pixels, "image_sizes": self.image_sizes,
                    "image_attention_mask": pad_crops(self.crop_masks, fill=1.0, empty_shape=())}
        pixels = torch.zeros(len(self.image_sizes), self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        for i, (h, w) in enumerate(self.image_sizes.tolist()):
            real = 1 + (h // CROP_SIZE) * (w // CROP_SIZE)
            pixels[i, :real] = torch.randn(real, 3, CROP_SIZE, CROP_SIZE, generator=generator)
        return {"input_ids": self.input_ids, "labels": self.labels, "pixel_values": pixels,
                "image_sizes": self.image_sizes}


def make_config(size: str, family: str = "phi3v"):
    """The config of a `--size` of a `--family` (phi4mm: "full", the Hub's, and "tiny" with the real vocabulary)."""
    if family == "phi4mm":
        if size == "full":
            return known_families()[FAMILIES[family]].full_size_config()
        if size == "tiny":
            from .phi4mm.tiny import build_tiny_tokenizer, tiny_config

            return tiny_config(build_tiny_tokenizer(), vocab_size=200064)
        raise ValueError(f"--size {size}: --family phi4mm has sizes full and tiny")
    if size == "tiny":
        from .tiny import tiny_config

        return tiny_config(vocab_size=32064, pad_token_id=32000)
    if size == "full":
        return known_families()[FAMILIES["phi3v"]].full_size_config()  # the Hub's config.json, shipped
    settings = dict(SIZES[size])
    vision = settings.pop("vision")
    head_dim = settings["hidden_size"] // settings["num_attention_heads"]
    return Phi3VConfig(
        **settings, vocab_size=32064, pad_token_id=32000, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": [1.0] * (head_dim // 2), "long_factor": [4.0] * (head_dim // 2)},
        img_processor={"image_dim_out": 1024} if vision is None else  # CLIP ViT-L/14-336
        {"image_dim_out": vision["hidden_size"], "vision_config": vision},
    )


def make_samples(distribution: str, count: int, seed: int = 0, num_crops: int | None = None,
                 image_processor=None, image_token_id: int | None = None) -> list[Sample]:
    """Token ids laid out as the processor lays them out (image tokens as negative ids), with random text and
    random pixels; `num_crops` overrides the distribution's own. `image_processor`: the family whose crop grids
    and image-token counts the samples get (`ModelFamily.default_image_processor()`; None: Phi-3-V's), and
    `image_token_id` its placeholder token (see `Sample`)."""
    images, default_crops, widths, heights, prompt, answer = DISTRIBUTIONS[distribution]
    num_crops = num_crops or default_crops
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        ids, sizes, masks = [1, 32010], [], []
        for k in range(1, images + 1):
            width, height = rng.randint(*widths), rng.randint(*heights)
            if image_processor is None:
                size, tokens = hd_image_size(width, height, num_crops), num_image_tokens(width, height, num_crops)
            else:
                size = image_processor.hd_image_size(width, height, num_crops)
                tokens = image_processor.num_image_tokens(width, height, num_crops)
                if image_token_id is not None:
                    masks.append(image_processor.crop_masks(image_processor.crop_layout(width, height, num_crops)))
            sizes.append(list(size))
            ids += [-k] * tokens + [1]
        ids += [rng.randint(100, 31000) for _ in range(rng.randint(*prompt))] + [32007, 32001]
        answer_ids = [rng.randint(100, 31000) for _ in range(rng.randint(*answer))] + [32007, 32000]
        labels = [-100] * len(ids) + answer_ids
        samples.append(Sample(ids + answer_ids, labels, torch.tensor(sizes), num_crops, seed + index,
                              CROP_SIZE if image_processor is None else image_processor.crop_size, image_token_id,
                              masks or None))
    return samples


def batches(samples: list[Sample], batch_size: int, grouped: bool, seed: int = 0) -> list[list[Sample]]:
    """Consecutive batches in random order, or length-grouped as the recipes do (64-token buckets)."""
    if grouped:
        torch.manual_seed(seed)
        order = list(LengthGroupedSampler(batch_size, lengths=length_buckets([len(s.input_ids) for s in samples])))
    else:
        order = random.Random(seed).sample(range(len(samples)), len(samples))
    return [[samples[i] for i in order[j : j + batch_size]] for j in range(0, len(order) - batch_size + 1, batch_size)]


def padding_fraction(groups: list[list[Sample]]) -> float:
    """Padding tokens / all tokens when each group is right-padded to its longest sample."""
    real = sum(len(s.input_ids) for g in groups for s in g)
    total = sum(len(g) * max(len(s.input_ids) for s in g) for g in groups)
    return 1 - real / total


def crop_padding_fraction(groups: list[list[Sample]]) -> float:
    """Padding crops / all crops the vision tower is given when each group's images are padded to the most crops of
    an image in the group (Phi-4-MM's processor, padded or packed batches alike)."""
    crops = [[1 + h * w for s in g for h, w in layout(s)[2]] for g in groups]
    real = sum(sum(c) for c in crops)
    return 1 - real / sum(len(c) * max(c) for c in crops if c)


def collate_samples(group: list[Sample], packing: bool, family=None, pad_token_id: int = 32000) -> dict:
    """A batch as the recipes' collator builds it for `family` (None: Phi-3-V)."""
    samples = [s.as_dict() for s in group]
    batch_images = Phi3VProcessor.batch_images if family is None else family.batch_images
    return (pack_batch(samples, batch_images) if packing
            else pad_batch(samples, pad_token_id=pad_token_id, batch_images=batch_images))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def all_crops_embedding(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """The reference's image embedding: all of CLIP over every crop slot, padding included."""
    crops_hw = self.crop_grids(image_sizes)
    dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
    features = reference_clip(self.img_processor, pixel_values.flatten(0, 1).to(dtype))
    slots = pixel_values.shape[1]
    real = torch.cat([features[i * slots : i * slots + 1 + h * w] for i, (h, w) in enumerate(crops_hw)])
    return self.image_tokens(real, crops_hw)


def training_loss(model, batch: dict) -> torch.Tensor:
    """The loss the recipes' trainer computes: the family's own (Phi-4-MM: answer-only logits), else the model's."""
    loss = family_of_model(model).training_loss(model, batch)
    return model(**batch).loss if loss is None else loss


def loss_of(model, batch: dict, full_logits: bool) -> tuple[torch.Tensor, int]:
    """(loss, bytes of the logits it read)."""
    if not full_logits:
        loss = training_loss(model, batch)
        return loss, int((batch["labels"][:, 1:] != -100).sum()) * model.config.vocab_size * 4
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()  # the reference: HF's loss upcasts all logits
    batch["labels"] = labels
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return loss, logits.numel() * 4


def build_model(config, mode: str, attn: str, device: torch.device, dtype: torch.dtype, workdir: Path,
                checkpointing: bool = True):
    """A random model of `config`'s family set up as the recipes set up each mode, every layer checkpointed or none."""
    config._attn_implementation = attn
    model_class = family_for_type(config.model_type, "--family").model_class()
    if mode == "qlora":
        path = workdir / "random-checkpoint"
        if not path.exists():
            model_class(config).to(torch.bfloat16).save_pretrained(path)  # as on the Hub: 8 GB at full size
        model = model_class.from_pretrained(path, quantization_config=quantization_config(dtype),
                                            attn_implementation=attn, dtype=dtype, device_map={"": device})
    else:
        with torch.device(device):
            model = model_class(config).to(dtype if mode == "lora" else torch.float32)
    # The recipes' own set-up, with their default LoRA settings.
    lora = LoraArguments(use_lora=mode in ("lora", "qlora"), use_qlora=mode == "qlora")
    model = setup_mode(model, ModelArguments(freeze_vision_model=mode == "frozen"), lora)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_step_flops(step, model: torch.nn.Module) -> tuple[int, int]:
    """(FLOPs `step()` executes, the part of them that recomputes checkpointed layers in the backward pass).

    A checkpointed layer hands its forward to its `_gradient_checkpointing_func` (transformers'
    GradientCheckpointingLayer), which runs it once in the forward pass and again, in the backward pass, for
    the recomputation: the FLOPs of those later runs are counted. They can be less than the layer's forward,
    since non-reentrant checkpointing stops recomputing once the tensors the backward pass needs are back.
    """
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and m.training]
    recomputed = 0

    def counting(checkpoint):
        def checkpointed(function, *args, **kwargs):
            calls = 0

            def run(*inner_args, **inner_kwargs):
                nonlocal calls, recomputed
                calls += 1
                start = counter.get_total_flops()
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:  # a recomputation that stops early ends in an exception
                    if calls > 1:
                        recomputed += counter.get_total_flops() - start

            return checkpoint(run, *args, **kwargs)

        return checkpointed

    originals = [layer._gradient_checkpointing_func for layer in layers]
    for layer, original in zip(layers, originals):
        layer._gradient_checkpointing_func = counting(original)
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        for layer, original in zip(layers, originals):
            layer._gradient_checkpointing_func = original
    return counter.get_total_flops(), recomputed


@dataclass
class Row:
    """One configuration the bench measures."""

    name: str
    mode: str
    attn: str
    groups: list[list[Sample]]  # the batches, in order: every row of a distribution times the same samples
    packing: bool = False
    full_logits: bool = False  # the reference's loss over every position (and all crop slots through CLIP)
    checkpointing: bool = True
    cached: bool = False  # image features computed before the clock, as --cache_vision_features does
    compile_backend: str | None = None  # timed steps run torch.compile(model), as --torch_compile does


def run_config(row_config: Row, model, device, amp_dtype, peak_tflops, useful_flops: dict | None = None) -> dict:
    """Times `model` on every batch of the row; MFU counts the model's FLOPs (what the step computes once), HFU
    every FLOP executed (recomputation of checkpointed layers included), both over the timed batches.

    `useful_flops`: the useful work's FLOPs by (mode, attention, checkpointing, cached features), shared by the
    rows of a distribution (they time the same samples), so each is counted once."""
    name, groups, packing, full_logits = row_config.name, row_config.groups, row_config.packing, row_config.full_logits
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    family = family_of_model(model)
    # Phi-3-V's reference runs every crop slot through all of CLIP (`all_crops_embedding`, set by `main`).
    all_crops = full_logits and family.pads_crops_to_limit

    def collate(group: list[Sample], packing: bool) -> dict:
        batch = collate_samples(group, packing, family, model.config.pad_token_id)
        if not row_config.cached or "pixel_values" not in batch:
            return batch
        with torch.no_grad(), autocast:  # the frozen tower's output, as the cache's pre-pass computes it
            pixels, sizes = batch.pop("pixel_values").to(device), batch.pop("image_sizes").to(device)
            return {**batch, "image_features": image_embedding(model)(pixels, sizes)}

    def step(batch, model=model):
        batch = to_device(batch, device)
        with autocast:
            loss, logit_bytes = loss_of(model, batch, full_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logit_bytes

    def useful_step(alone: list[dict]):  # each sample alone: no padding, real crops, answer-only logits
        for batch in alone:
            batch = to_device(batch, device)
            with autocast:
                loss = training_loss(model, batch)
            loss.backward()
        optimizer.zero_grad(set_to_none=True)

    # Batches are built before the clock starts, as DataLoader workers build them ahead of the GPU.
    timed_batches = [collate(group, packing) for group in groups]
    # FLOPs are counted on the very batches that are timed, before the clock; these steps also warm up
    # (on CPU they give the peak memory, the optimizer states that the first one creates included).
    memory = PeakTensorMemory(training_state(model, optimizer)) if device.type != "cuda" else contextlib.nullcontext()
    executed = recomputed = 0
    with memory:
        for batch in timed_batches:
            flops, again = count_step_flops(functools.partial(step, batch), model)
            executed, recomputed = executed + flops, recomputed + again
    useful_flops = {} if useful_flops is None else useful_flops
    key = (row_config.mode, row_config.attn, row_config.checkpointing, row_config.cached)
    if key not in useful_flops:
        baseline_embedding = image_embedding(model) if all_crops else None
        if baseline_embedding is not None:  # useful FLOPs use the real-crop embedding
            del baseline_embedding.forward
        alone = [collate([sample], False) for group in groups for sample in group]
        useful_flops[key] = count_flops(lambda: useful_step(alone))
        if baseline_embedding is not None:
            baseline_embedding.forward = types.MethodType(all_crops_embedding, baseline_embedding)
    useful = useful_flops[key]

    if row_config.compile_backend:  # FLOPs and (on CPU) memory were measured eagerly: compiling changes no FLOP
        model = torch.compile(model, backend=row_config.compile_backend)
        for batch in timed_batches:  # compiles (and recompiles for each new length) before the clock
            step(batch, model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    logit_bytes, seconds = 0, []  # each step's time shows the noise; samples/s is over all of them
    for batch in timed_batches:
        start = time.perf_counter()
        logit_bytes = max(logit_bytes, step(batch, model))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    elapsed = sum(seconds)
    samples = sum(len(g) for g in groups)
    tokens = sum(len(s.input_ids) for g in groups for s in g)
    cuda = device.type == "cuda"

    def utilisation(flops: int) -> float | None:
        return flops / elapsed / (peak_tflops * 1e12) if peak_tflops else None

    return {
        "config": name,
        "samples": samples,
        "tokens": tokens,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_allocated_gb": (torch.cuda.max_memory_allocated() if cuda else memory.peak) / 1e9,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,  # CPU: no allocator cache
        "padding": 0.0 if packing else padding_fraction(groups),
        "exec/useful": executed / useful,
        "logits MB": logit_bytes / 1e6,
        "model TFLOP": (executed - recomputed) / 1e12,
        "executed TFLOP": executed / 1e12,
        "mfu": utilisation(executed - recomputed),
        "hfu": utilisation(executed),
        "step seconds": seconds,
    }


META_SAMPLES = 4  # samples per distribution whose steps are measured on the meta device
GPU_COUNTS = (1, 2, 4, 8)


def reference_crop_slots(sample: Sample, family) -> int:
    """Crops per image of the sample's batch-1 step as the processor pads them (`ModelFamily.pads_crops_to_limit`):
    every image to the crop limit (Phi-3-V), or to the most crops of the sample's images (Phi-4-MM)."""
    if family.pads_crops_to_limit:
        return sample.num_crops + 1
    return max(1 + h * w for h, w in layout(sample)[2])


def meta_report(config, distributions: list[str], modes: list[str],
                num_crops: int | None = None) -> list[dict]:
    """Per mode and distribution, at the size of `config` with no memory allocated: FLOPs of one sample's
    step (mean of META_SAMPLES), against the reference recipe's (all crop slots through CLIP, logits at every
    position, gradient checkpointing forced on); ours with every layer checkpointed, with none (what
    --gradient_checkpointing auto picks when memory allows) and, for frozen vision, with cached image
    features (--cache_vision_features, epoch 2 on); the activations of the longest sample; and the bytes
    per GPU (weights, gradients, optimizer states + activations) for 1-8 GPUs."""
    family = family_for_type(config.model_type, "--family")
    images = None if family.pads_crops_to_limit else family.default_image_processor()
    rows = []
    for distribution in distributions:
        samples = make_samples(distribution, META_SAMPLES, num_crops=num_crops, image_processor=images)
        slots = {id(s): reference_crop_slots(s, family) for s in samples}  # crop slots per image, padding included
        longest = max(samples, key=lambda s: len(s.input_ids))
        print(f"\n{distribution}: {len(samples)} samples, mean {sum(len(s.input_ids) for s in samples) / len(samples):.0f}"
              f" tokens, longest {len(longest.input_ids)}; TFLOP per sample's step (batch 1) and speed-up in FLOPs "
              "over the reference recipe's step; activations of the longest; GB per GPU for 1/2/4/8 GPUs", flush=True)
        if not family.pads_crops_to_limit:  # the tower also runs the zero crops a batch pads its images with
            many = make_samples(distribution, 400, num_crops=num_crops, image_processor=images)
            shares = {f"batch {size}, {order}": crop_padding_fraction(batches(many, size, grouped=order == "grouped"))
                      for size in (1, 4) for order in ("random", "grouped")}
            rows.append({"config": "crop padding", "distribution": distribution, **shares})
            print("  padding crops the vision tower runs: "
                  + ", ".join(f"{key} {share:.1%}" for key, share in shares.items()), flush=True)
        measured = {}  # QLoRA computes as LoRA does (its 4-bit base is dequantised to 16-bit): measured once
        for mode in modes:
            model_args, lora = mode_arguments(mode)
            model = meta_model(config, model_args, lora)
            same_as = "lora" if mode == "qlora" else mode
            if same_as not in measured:
                cached = model_args.freeze_vision_model and family.supports_vision_cache
                measured[same_as] = measure_mode(config, model, meta_model(config, model_args, lora, False),
                                                 samples, longest, slots, cached=cached)
            row = {"config": mode, "distribution": distribution, **measured[same_as]}
            for key, activations in (("GB per GPU", row["activations GB"]),
                                     ("GB per GPU, no checkpointing", row["activations GB, no checkpointing"])):
                row[key] = {gpus: state_bytes(model, lora, gpus).total / 1e9 + activations for gpus in GPU_COUNTS}
            if not lora.use_lora:  # the other ways to train all weights (LoRA always runs under DDP)
                row["GB per GPU by strategy"] = {
                    strategy: {gpus: state_bytes(model, lora, gpus, strategy).total / 1e9 + row["activations GB"]
                               for gpus in GPU_COUNTS} for strategy in STRATEGIES}
            rows.append(row)
            print(format_meta_row(row), flush=True)
    return rows


def measure_mode(config, model: torch.nn.Module, unchecked: torch.nn.Module, samples: list[Sample],
                 longest: Sample, slots: dict[int, int], cached: bool) -> dict:
    """The FLOPs and activations of `meta_report`'s row for one mode (`model` checkpointed, `unchecked` not;
    `slots`: each sample's crop slots per image in the reference's step, by id)."""

    def costs(model: torch.nn.Module, padded: bool = False, **options) -> dict[int, StepCost]:
        return {id(s): step_cost(model, *layout(s), crop_slots=slots[id(s)] if padded else None, **options)
                for s in samples}

    def mean_flops(model: torch.nn.Module, padded: bool = False, **options) -> float:
        return sum(cost.flops for cost in costs(model, padded, **options).values()) / len(samples)

    # Our steps, checkpointed or not, also give the longest sample's activations (it is one of the samples).
    checked, free_costs = costs(model), costs(unchecked)
    ours, free = (sum(c.flops for c in measured.values()) / len(samples) for measured in (checked, free_costs))
    # The reference's step, one saving at a time: every crop slot, then all of CLIP, then logits everywhere
    # (Phi-4-MM's own model always runs its whole tower: no second saving there).
    slots_only = mean_flops(model, padded=True)
    whole_tower = mean_flops(model, padded=True, whole_tower=True)
    reference = mean_flops(model, padded=True, whole_tower=True, full_logits=True)
    row = {"TFLOP/sample": ours / 1e12, "TFLOP/sample, no checkpointing": free / 1e12,
           "reference TFLOP/sample": reference / 1e12, "x vs reference": reference / ours,
           "x vs reference, no checkpointing": reference / free,
           "saved by real crops": (slots_only - ours) / reference,
           "saved by stopping CLIP at its feature layer": (whole_tower - slots_only) / reference,
           "saved by answer-only logits": (reference - whole_tower) / reference,
           "activations GB": checked[id(longest)].activation_bytes / 1e9,
           "activations GB, no checkpointing": free_costs[id(longest)].activation_bytes / 1e9}
    if cached:
        features = mean_flops(unchecked, cached_features=True)
        row.update({"TFLOP/sample, cached features": features / 1e12, "x vs reference, cached features":
                    reference / features})
    return row


def format_meta_row(row: dict) -> str:
    cached = (f", cached features {row['TFLOP/sample, cached features']:.2f} (x{row['x vs reference, cached features']:.2f})"
              if "TFLOP/sample, cached features" in row else "")
    return (f"  {row['config']:<7} checkpointed {row['TFLOP/sample']:.2f} TFLOP (x{row['x vs reference']:.2f}), "
            f"not {row['TFLOP/sample, no checkpointing']:.2f} (x{row['x vs reference, no checkpointing']:.2f}){cached}; "
            f"reference {row['reference TFLOP/sample']:.2f}: {row['saved by real crops']:.1%} less from real crops, "
            f"{row['saved by stopping CLIP at its feature layer']:.1%} from stopping CLIP at its feature layer, "
            f"{row['saved by answer-only logits']:.1%} from answer-only logits\n"
            f"          activations {row['activations GB']:.2f} GB checkpointed, "
            f"{row['activations GB, no checkpointing']:.1f} GB not; per GPU "
            + " / ".join(f"{gb:.1f}" for gb in row["GB per GPU"].values()) + " GB checkpointed, "
            + " / ".join(f"{gb:.1f}" for gb in row["GB per GPU, no checkpointing"].values()) + " GB not"
            + "".join(f"\n          {strategy}: " + " / ".join(f"{gb:.1f}" for gb in per_gpu.values()) + " GB checkpointed"
                      for strategy, per_gpu in row.get("GB per GPU by strategy", {}).items()))


def layout(sample: Sample) -> Layout:
    """The sample as `step_cost` takes it (its ids have the image tokens negative already)."""
    return (list(sample.input_ids), list(sample.labels),
            [(h // sample.crop_size, w // sample.crop_size) for h, w in sample.image_sizes.tolist()])


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line (gpu_check checks its commands against it)."""
    parser = argparse.ArgumentParser(prog="python -m phivision.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), default="phi3v",
                        help="Model family: phi3v (Phi-3.5-vision) or phi4mm (Phi-4-multimodal: --device meta with "
                             "--size full, the Hub checkpoint's, or tiny, so far).")
    parser.add_argument("--size", choices=list(SIZES), default="small", help="Model size (random weights).")
    parser.add_argument("--distribution", choices=[*DISTRIBUTIONS, "all"], default="docvqa", help="Sample lengths.")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"],
                        choices=["full", "frozen", "lora", "qlora"], help="Training modes to measure.")
    parser.add_argument("--num_crops", type=int, default=None,
                        help="Crops per image instead of the distribution's own (docvqa and memes 16, nlvr2 4).")
    parser.add_argument("--batch_size", type=int, default=4,
                        help="Per-device batch of the batched rows (padded, packed); 1: batch-1 rows only.")
    parser.add_argument("--steps", type=int, default=3,
                        help="Timed batches of the batched rows; the batch-1 rows time the same samples one by one "
                             "(--steps x --batch_size optimizer steps).")
    parser.add_argument("--num_samples", type=int, default=400,
                        help="Generated samples (padding statistics); the first --steps x --batch_size are timed.")
    parser.add_argument("--no_baseline", action="store_true", help="Skip the reference-like baseline rows.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda; meta: no timing, FLOPs and memory per GPU at any size in seconds (sizing).")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"],
                        help="Attention of our rows (packed rows without flash-attn: SDPA per sample); the baselines run "
                             "flash_attention_2 when it is picked (the reference's --use_flash_attention), else eager.")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="Device peak dense 16-bit TFLOP/s for MFU and HFU (default: by GPU name, see PEAK_TFLOPS; "
                             "none on CPU).")
    parser.add_argument("--torch_compile_backend", default=None,
                        help="Also time each mode's batch-1 row (no checkpointing) under torch.compile with this "
                             "backend, as the recipes' --torch_compile does (inductor; compiling takes minutes on CPU).")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    device = torch.device(args.device)
    if args.family != "phi3v" and args.size not in ("full", "tiny"):
        raise SystemExit(f"error: --size {args.size}: --family {args.family} has sizes full and tiny")
    if device.type == "meta":
        rows = meta_report(make_config(args.size, args.family), list(DISTRIBUTIONS) if args.distribution == "all"
                           else [args.distribution], args.modes, args.num_crops)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    amp_dtype = autocast_dtype(device)
    peak = args.peak_tflops
    if device.type == "cuda" and peak is None:
        peak = peak_tflops(torch.cuda.get_device_name(device))
    timed = args.steps * args.batch_size
    if args.num_samples < timed:
        raise SystemExit(f"error: --num_samples {args.num_samples} is fewer than the --steps x --batch_size = {timed} "
                         "samples every row times")
    config = make_config(args.size, args.family)
    family = family_for_type(config.model_type, "--family")
    images = None if family.pads_crops_to_limit else family.default_image_processor()
    image_token = None if images is None else config.vision_config.image_token_id
    distributions = list(DISTRIBUTIONS) if args.distribution == "all" else [args.distribution]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for distribution in distributions:
            samples = make_samples(distribution, args.num_samples, num_crops=args.num_crops, image_processor=images,
                                   image_token_id=image_token)
            grouped = batches(samples, args.batch_size, grouped=True)
            random_order = batches(samples, args.batch_size, grouped=False)
            print(f"\n{distribution}: {len(samples)} samples, mean {sum(len(s.input_ids) for s in samples) / len(samples):.0f} "
                  f"tokens; padding at batch {args.batch_size}: {padding_fraction(random_order):.1%} in random order, "
                  f"{padding_fraction(grouped):.1%} length-grouped", flush=True)
            if images is not None:  # the processor pads a batch's images to its most crops
                print(f"  padding crops the vision tower runs at batch {args.batch_size}: "
                      f"{crop_padding_fraction(random_order):.1%} in random order (and packed rows), "
                      f"{crop_padding_fraction(grouped):.1%} length-grouped", flush=True)
            # Every row times the same samples: the batch-1 rows one by one, the batched rows in --steps batches.
            pool = samples[:timed]
            one_by_one, grouped, random_order = (batches(pool, 1, False), batches(pool, args.batch_size, True),
                                                 batches(pool, args.batch_size, False))
            configs = []
            flash = args.attn == "flash_attention_2"
            attn, packed_attn = training_attention(flash, packing=False), training_attention(flash, packing=True)
            for mode in args.modes:
                if not args.no_baseline:  # the reference recipe in the same mode: flash attention or fp32 eager
                    configs.append(Row(f"{mode} {BASELINE}", mode, "flash_attention_2" if flash else "eager",
                                       one_by_one, full_logits=True))
                configs.append(Row(f"{mode} b1", mode, attn, one_by_one))
                # What --gradient_checkpointing auto picks when memory allows: no layer recomputed.
                configs.append(Row(f"{mode} b1 no checkpointing", mode, attn, one_by_one, checkpointing=False))
                if args.torch_compile_backend:
                    configs.append(Row(f"{mode} b1 no checkpointing compiled", mode, attn, one_by_one,
                                       checkpointing=False, compile_backend=args.torch_compile_backend))
                if mode == "frozen" and family.supports_vision_cache:  # --cache_vision_features from epoch 2 on
                    configs.append(Row(f"{mode} b1 cached features", mode, attn, one_by_one,
                                       checkpointing=False, cached=True))
                if args.batch_size > 1:
                    configs.append(Row(f"{mode} b{args.batch_size} padded+grouped", mode, attn, grouped))
                    configs.append(Row(f"{mode} b{args.batch_size} packed", mode, packed_attn, random_order,
                                       packing=True))
            base_speed = {}  # mode -> the baseline's samples_per_s
            useful_flops = {}  # see run_config
            for row_config in configs:
                name, mode, full_logits = row_config.name, row_config.mode, row_config.full_logits
                torch.manual_seed(0)
                try:
                    model = build_model(config, mode, row_config.attn, device,
                                        amp_dtype if mode != "full" else torch.float32, Path(workdir),
                                        row_config.checkpointing)
                    if full_logits and family.pads_crops_to_limit:
                        embedding = image_embedding(model)
                        embedding.forward = types.MethodType(all_crops_embedding, embedding)
                    row = run_config(row_config, model, device, amp_dtype, peak, useful_flops)
                except (torch.OutOfMemoryError, ImportError) as error:  # report it, measure the rest
                    model = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    reason = (f"out of memory on {device}" if isinstance(error, torch.OutOfMemoryError)
                              else f"skipped: {str(error).splitlines()[0]}")  # e.g. QLoRA without bitsandbytes
                    rows.append({"config": name, "distribution": distribution, "error": reason})
                    print(f"  {name:<28} {reason}", flush=True)
                    continue
                row["distribution"] = distribution
                if full_logits:
                    base_speed[mode] = row["samples_per_s"]
                if mode in base_speed:  # same samples: against the reference's step in the same mode
                    row["vs baseline"] = row["samples_per_s"] / base_speed[mode]
                rows.append(row)
                print(format_row(row), flush=True)
                del model
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def format_row(row: dict) -> str:
    utilisation = f"  MFU {row['mfu']:.1%} HFU {row['hfu']:.1%}" if row["mfu"] is not None else ""
    reserved = f" ({row['peak_reserved_gb']:.2f} reserved)" if row["peak_reserved_gb"] is not None else ""
    versus = f"  x{row['vs baseline']:.2f} vs baseline" if "vs baseline" in row else ""
    return (f"  {row['config']:<28} {row['samples_per_s']:7.3g} samples/s {row['tokens_per_s']:9.0f} tok/s  "
            f"peak {row['peak_allocated_gb']:6.2f} GB{reserved}  padding {row['padding']:5.1%}  "
            f"exec/useful {row['exec/useful']:.3f}  logits {row['logits MB']:8.1f} MB{utilisation}{versus}")


if __name__ == "__main__":
    main()
