"""phi3v.training.sizing.sharded_state_bytes: per-GPU training state under ZeRO-3 and FSDP2."""

import pytest

from phi3v.training.sizing import StateBytes, sharded_state_bytes

FULL = 4_150_000_000  # Phi-3.5-vision


def test_zero3_holds_zero2s_18_bytes_per_trained_parameter_split_over_the_gpus():
    assert sharded_state_bytes(FULL, FULL, 1, "zero3") == StateBytes(2 * FULL, 4 * FULL, 12 * FULL)
    assert sharded_state_bytes(FULL, FULL, 8, "zero3").total == 18 * FULL // 8  # 8.7 GiB per GPU


def test_fsdp2_needs_no_separate_master_copy_and_frozen_weights_cost_weights_only():
    assert sharded_state_bytes(FULL, FULL, 4, "fsdp2").total == 16 * FULL // 4
    assert sharded_state_bytes(100, 50, 1, "fsdp2") == StateBytes(400, 200, 400)


@pytest.mark.parametrize("args", [(10, 10, 0, "zero3"), (10, 11, 1, "fsdp2"), (10, 10, 1, "zero2")])
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValueError):
        sharded_state_bytes(*args)
