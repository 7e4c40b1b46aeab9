"""Runs a Python script or module and prints its process's peak GPU memory when it ends (phivision.gpu_check reads it).

    python -m phivision.peak_memory SCRIPT [ARGS...]
    python -m phivision.peak_memory -m MODULE [ARGS...]
    torchrun --nproc_per_node=8 -m phivision.peak_memory finetune_hf_trainer_docvqa.py ...   # one line per rank

The line reads `peak GPU memory: {"rank": 0, "allocated_gb": 61.2, "reserved_gb": 70.4}`: the caching
allocator's peaks over the whole process (loading, evaluations and training), which the recipes do not log.
Nothing is printed when the process never used CUDA.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

MARKER = "peak GPU memory: "


def report() -> None:
    """Prints this process's peak allocated and reserved CUDA memory (GB), if CUDA was used."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    peaks = {"rank": int(os.environ.get("RANK", "0")),
             "allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
             "reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)}
    print(MARKER + json.dumps(peaks), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[:1] == ["-m"] and len(argv) < 2:
        raise SystemExit("usage: python -m phivision.peak_memory SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    atexit.register(report)  # also after an exception or SystemExit: the peak up to the failure
    # The recipes end with os._exit (phivision.distributed.finish), which skips atexit.
    real_exit = os._exit

    def report_and_exit(status: int) -> None:
        report()
        real_exit(status)

    os._exit = report_and_exit
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` sets it
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
