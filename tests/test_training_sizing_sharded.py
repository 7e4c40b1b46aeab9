"""phivision.training.sizing.state_bytes under ZeRO-3 and FSDP2: per-GPU training state with the weights split too."""

import pytest

from phivision.training.sizing import StateBytes, mode_arguments, parameter_counts, state_bytes
from test_training_sizing import model

FULL, LORA = mode_arguments("full")[1], mode_arguments("lora")[1]


def test_zero3_holds_zero2s_bytes_with_the_weights_split_too():
    full = model("full")
    total, trainable, _ = parameter_counts(full)
    assert state_bytes(full, FULL, 1, "zero3") == state_bytes(full, FULL, 1, "zero2")
    assert state_bytes(full, FULL, 8, "zero3") == StateBytes(2 * total // 8, 4 * trainable // 8, 12 * trainable // 8)


def test_fsdp2_needs_no_separate_master_copy_and_frozen_weights_cost_weights_only():
    frozen = model("frozen")
    total, trainable, _ = parameter_counts(frozen)
    assert trainable < total
    assert state_bytes(frozen, FULL, 4, "fsdp2") == StateBytes(4 * total // 4, 4 * trainable // 4, 8 * trainable // 4)
    assert state_bytes(frozen, FULL, 1, "fsdp2") == state_bytes(frozen, FULL, 1, "ddp")


@pytest.mark.parametrize("gpus, strategy", [(0, "zero3"), (1, "zero4")])
def test_bad_arguments_are_refused(gpus, strategy):
    with pytest.raises(ValueError):
        state_bytes(model("full"), FULL, gpus, strategy)
