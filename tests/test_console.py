"""phivision.console: the library notices nobody can act on are dropped, everything else still shows."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from phivision.console import after_import, quiet_library_notices

ROOT = Path(__file__).resolve().parents[1]


def test_bitsandbytes_kernels_notice_is_dropped_other_records_are_kept(caplog):
    quiet_library_notices()
    quiet_library_notices()  # idempotent: one filter per message
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("CPU kernel failed: out of memory")
    assert [record.getMessage() for record in caplog.records] == ["CPU kernel failed: out of memory"]


def test_torch_distributed_deprecations_are_ignored_other_future_warnings_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_notices()  # its filter goes in front of "always"
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.foo` is deprecated", UserWarning)  # not a FutureWarning
        warnings.warn("`transformers.bar` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`torch.distributed.foo` is deprecated", "`transformers.bar` is deprecated"]


def test_phivision_warnings_and_transformers_bars_are_for_rank_0_only(monkeypatch):
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("phivision")
    monkeypatch.setattr(logger, "level", logging.NOTSET)  # both restored after the test
    monkeypatch.setattr(transformers_logging, "_tqdm_active", True)
    monkeypatch.setenv("RANK", "0")
    quiet_library_notices()
    assert logging.getLogger("phivision.training.arguments").isEnabledFor(logging.WARNING)
    assert transformers_logging.is_progress_bar_enabled()
    monkeypatch.setenv("RANK", "1")
    quiet_library_notices()
    assert not logging.getLogger("phivision.training.arguments").isEnabledFor(logging.WARNING)
    assert logging.getLogger("phivision.training.arguments").isEnabledFor(logging.ERROR)
    assert not transformers_logging.is_progress_bar_enabled()


def test_after_import_patches_a_module_when_it_is_first_imported(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_module", raising=False)
    after_import("late_module", lambda module: setattr(module, "VALUE", module.VALUE + 1))
    import late_module

    assert late_module.VALUE == 2
    after_import("late_module", lambda module: setattr(module, "VALUE", module.VALUE * 10))  # imported: at once
    assert late_module.VALUE == 20


def test_deepspeed_says_neither_its_cpu_accelerator_nor_its_shm_build():
    """In a fresh interpreter, as a run imports DeepSpeed: after phivision, deep inside the Trainer."""
    pytest.importorskip("deepspeed")
    code = textwrap.dedent("""
        import sys
        import phivision
        import deepspeed.comm.torch
        module = sys.modules["deepspeed.comm.torch"]
        module.print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        module.print("DeepSpeed says something else")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "DeepSpeed says something else\n"
    assert "Setting accelerator to CPU" not in result.stderr


def test_peft_and_transformers_notices_of_a_lora_save_are_dropped(tmp_path):
    """Both libraries' notices come from the real calls a LoRA run makes: set-up, and a save per checkpoint."""
    from peft import LoraConfig, get_peft_model

    from phivision.phi3v.modeling import Phi3VForCausalLM
    from phivision.tiny import build_tiny_processor, tiny_config
    from phivision.training.modes import lora_target_modules

    def lora_run_warnings(quiet: bool) -> list[str]:
        model = Phi3VForCausalLM(tiny_config(vocab_size=len(build_tiny_processor(num_crops=1).tokenizer)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_library_notices()
            peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=lora_target_modules(model, True)))
            for step in (1, 2):
                peft_model.save_pretrained(tmp_path / f"checkpoint-{step}")
        return [str(w.message) for w in caught]

    noisy = lora_run_warnings(quiet=False)
    assert any("`is_gradient_checkpointing` is deprecated" in m for m in noisy)
    assert sum("Setting `save_embedding_layers` to `True`" in m for m in noisy) == 2
    quiet = lora_run_warnings(quiet=True)
    assert not any("is_gradient_checkpointing" in m or "save_embedding_layers" in m for m in quiet), quiet
