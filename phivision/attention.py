"""Which attention kernel and 16-bit type run, and "sdpa_packed": SDPA over each sample of a packed row.

The model takes transformers' `attn_implementation` names; this module registers one more,
"sdpa_packed", and says which one a training run uses, and whether the GPU computes bf16 natively.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.utils import logging

logger = logging.get_logger(__name__)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                          packed_bounds=None, **kwargs):
    """SDPA that runs each sample of a packed row on its own ("sdpa_packed").

    A packed row (batch 1, position ids restarting at 0 per sample) through plain SDPA computes
    attention over the whole row and masks the cross-sample part away; here each sample's causal
    attention runs alone, so only the useful work is done. The boundaries come from
    `cu_seq_lens_q` (phivision.collator.pack_batch) or the position ids, read once per forward pass as
    `packed_bounds` by the model (see `sample_bounds`). Anything else (padded batches, cached
    generation) goes to plain SDPA.
    """
    one_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]  # and no cache
    if packed_bounds is None and one_row:
        packed_bounds = sample_bounds(kwargs.get("position_ids"), cu_seq_lens_q)
    bounds = packed_bounds if one_row and packed_bounds is not None else []
    if len(bounds) < 3 or bounds[0] != 0 or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outputs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                       dropout_p=dropout, scale=scaling)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def sample_bounds(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None) -> list[int] | None:
    """Sample boundaries of one packed row, [0, end of sample 1, ..., row length], read to the host once.

    From `cu_seq_lens` when the collator passes them; else where the position ids of a single row
    stop counting up by one (transformers' own rule for packed rows). None for padded batches.
    """
    if cu_seq_lens is not None:
        return cu_seq_lens.tolist()
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    row = position_ids[0]
    starts = (row[1:] != row[:-1] + 1).nonzero().flatten() + 1
    return [0, *starts.tolist(), row.shape[0]]


def packed_rows_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """The mask "sdpa_packed" uses: none for a single unpadded row.

    Such a row is one sequence (SDPA's causal flag covers it) or packed samples, which
    `packed_sdpa_attention` runs one by one; the dense [1, 1, L, L] mask SDPA would get is never
    built (L x L bytes: 92 MB for four 2,400-token samples). Padded batches get SDPA's mask.
    """
    if batch_size == 1 and attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


AttentionInterface.register("sdpa_packed", packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_packed", packed_rows_mask)


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_unusable() -> str | None:
    """Why flash-attn 2 cannot run here (None when it can): it needs a CUDA GPU of compute capability 8.0 or
    newer (Ampere: A100, RTX 30xx; Hopper) and a wheel built for this torch."""
    if not flash_attn_installed():
        return "flash-attn is not installed (GPU only: pip install flash-attn --no-build-isolation)"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"this GPU (compute capability {major}.{minor}) is older than Ampere (8.0)"
    try:
        importlib.import_module("flash_attn")
    except Exception as e:  # noqa: BLE001 - a wheel built for another torch or CUDA fails in many ways
        return f"flash-attn does not load ({type(e).__name__}: {e})"
    return None


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether this CUDA GPU (there must be one) computes bf16 natively: compute capability 8.0 (Ampere) or newer.

    `torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4), many times slower
    than fp16 there.
    """
    return torch.cuda.get_device_capability(device)[0] >= 8


def training_attention(flash_attention: bool, packing: bool) -> str:
    """flash_attention_2 when asked for and usable; else SDPA (per sample on packed rows), saying why."""
    if flash_attention:
        reason = flash_attn_unusable()
        if reason is None:
            return "flash_attention_2"
        logger.warning_once(f"--use_flash_attention: {reason}; using SDPA attention.")
    return "sdpa_packed" if packing else "sdpa"
