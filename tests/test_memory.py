"""phi3v.memory: per-GPU training-state bytes under ZeRO-3 and FSDP2."""

import pytest

from phi3v.memory import sharded_training_bytes

FULL = 4_150_000_000  # Phi-3.5-vision


def test_zero3_holds_18_bytes_per_trained_parameter_split_over_the_gpus():
    one = sharded_training_bytes(FULL, FULL, 1, "zero3")
    assert one == {"weights": 2 * FULL, "gradients": 4 * FULL, "optimizer": 12 * FULL, "total": 18 * FULL}
    eight = sharded_training_bytes(FULL, FULL, 8, "zero3")
    assert eight["total"] == 18 * FULL // 8  # 9.3 GB per GPU
    assert sharded_training_bytes(10, 10, 3, "zero3")["weights"] == 7  # a shard rounds up


def test_fsdp2_needs_no_master_copy_and_frozen_weights_cost_weights_only():
    assert sharded_training_bytes(FULL, FULL, 4, "fsdp2")["total"] == 16 * FULL // 4
    frozen_half = sharded_training_bytes(100, 50, 1, "fsdp2")
    assert frozen_half == {"weights": 400, "gradients": 200, "optimizer": 400, "total": 1000}


@pytest.mark.parametrize("args", [(10, 10, 0, "zero3"), (10, 11, 1, "fsdp2"), (10, 10, 1, "zero2")])
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValueError):
        sharded_training_bytes(*args)
