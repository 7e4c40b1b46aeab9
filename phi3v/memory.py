"""Per-GPU memory of the training state under sharded full fine-tuning (DeepSpeed ZeRO-3, FSDP2).

    sharded_training_bytes(4_150_000_000, 4_150_000_000, gpus=8, strategy="zero3")
    # {"weights": ..., "gradients": ..., "optimizer": ..., "total": ...}   bytes per GPU

Both shard every persistent tensor evenly over the GPUs, so each term is (bytes per parameter x
parameters) / GPUs. Not counted: activations, the one or two layers gathered whole at a time while
they compute, communication buckets and the CUDA context.
"""

from __future__ import annotations

# Bytes per parameter, as our configs set them up (ds_config_zero3.json, fsdp_config.json, modes.py):
# - zero3: 16-bit weights (the model loads in bf16/fp16), gradients accumulated in fp32
#   ("grad_accum_dtype": "fp32"), and the optimizer's fp32 master copy + Adam's two fp32 moments.
# - fsdp2: fp32 weights, which are also the optimizer's (FSDP computes in bf16 from them: no separate
#   master copy), fp32 gradients, Adam's two fp32 moments.
# Frozen parameters keep their weights only.
BYTES_PER_PARAMETER = {
    "zero3": {"weights": 2, "gradients": 4, "optimizer": 4 + 4 + 4},
    "fsdp2": {"weights": 4, "gradients": 4, "optimizer": 4 + 4},
}


def sharded_training_bytes(num_params: int, trainable: int, gpus: int, strategy: str) -> dict[str, int]:
    """Bytes per GPU of the weights, gradients and optimizer states of a run sharded over `gpus` GPUs.

    `num_params` counts every weight, `trainable` those that train; `strategy` is "zero3" or "fsdp2".
    """
    if strategy not in BYTES_PER_PARAMETER:
        raise ValueError(f"strategy must be one of {sorted(BYTES_PER_PARAMETER)}, got {strategy!r}")
    if gpus < 1 or not 0 <= trainable <= num_params:
        raise ValueError(f"need gpus >= 1 and 0 <= trainable <= num_params, got {gpus}, {trainable}, {num_params}")
    per = BYTES_PER_PARAMETER[strategy]
    parts = {
        "weights": per["weights"] * num_params,
        "gradients": per["gradients"] * trainable,
        "optimizer": per["optimizer"] * trainable,
    }
    per_gpu = {name: -(-total // gpus) for name, total in parts.items()}  # a shard rounds up
    per_gpu["total"] = sum(per_gpu.values())
    return per_gpu
