"""What a run prints is the run: library notices that a user can do nothing about are silenced,
and what every process would say alike (our warnings, transformers' progress bars) is said once
per torchrun job, by rank 0.

`phivision` calls `quiet_library_notices()` when it is imported, before transformers, bitsandbytes or
DeepSpeed get to speak. Each filter names one message (or one family of messages, for torch's
deprecations): any other warning, and every error, still shows.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

# (logger, start of the message): what each says and why nobody needs to read it.
SILENCED_LOGS = (
    # bitsandbytes on a CPU with AVX512-BF16, at `import transformers.trainer`: the optional `kernels`
    # package is missing, so 4-bit matmuls use bitsandbytes' own CPU kernel (slower, same results).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # DeepSpeed on a machine without GPUs; the run says itself that it trains on CPU.
    ("DeepSpeed", "Setting accelerator to CPU."),
)
# DeepSpeed's CPU collectives print this from every process when they start.
SILENCED_PRINTS = (("deepspeed.comm.torch", "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"),)
# torch.distributed's deprecation notices for its own functions, which DeepSpeed and accelerate call
# ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...").
TORCH_DISTRIBUTED_DEPRECATIONS = r"`torch\.distributed\."
# (category, start of the message) of library warnings that no flag of ours changes. Python shows a warning again
# each time a library touches the warning filters, so they came once per save and once per process.
SILENCED_WARNINGS = (
    # transformers, when PEFT reads the deprecated `model.is_gradient_checkpointing` (in PeftModel's set-up).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # PEFT at every adapter save: lm_head is a LoRA target (phivision.training.modes), so its weights are saved too.
    (UserWarning, r"Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`"),
)


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _print_without(prefix: str) -> Callable[..., None]:
    """`print` that drops one message: it shadows the builtin in the one module that prints it."""

    def print_(*args, **kwargs) -> None:
        if not (args and str(args[0]).startswith(prefix)):
            print(*args, **kwargs)

    return print_


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is first imported (a post-import hook).

    DeepSpeed is imported only when a run uses it, deep inside the Trainer: importing it ourselves
    just to patch it would cost every other run seconds.
    """

    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and so that the search below does not find us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: ModuleType) -> None:
                exec_module(module)
                self.patch(module)

            spec.loader.exec_module = exec_and_patch
        return spec


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """`patch(module)` now if `name` is imported already, else as soon as it is."""
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, patch))


def quiet_library_notices() -> None:
    """Installs the filters above (idempotent); on torchrun ranks other than 0, `phivision` warnings and
    transformers' progress bars go quiet."""
    for name, prefix in SILENCED_LOGS:
        logger = logging.getLogger(name)  # the same object the library configures later
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    for name, prefix in SILENCED_PRINTS:
        after_import(name, lambda module, prefix=prefix: setattr(module, "print", _print_without(prefix)))
    warnings.filterwarnings("ignore", message=TORCH_DISTRIBUTED_DEPRECATIONS, category=FutureWarning)
    for category, message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if int(os.environ.get("RANK", "0")) > 0:
        # Every rank runs the same code: rank 0 says each warning and draws transformers' bars
        # ("Loading weights"), the others only report errors.
        from transformers.utils import logging as transformers_logging

        logging.getLogger("phivision").setLevel(logging.ERROR)
        transformers_logging.disable_progress_bar()
