"""Where this process stands in a torchrun job, and how a run ends: once per job, cleanly."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def print_once(*args, **kwargs) -> None:
    """`print` on the main process only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def stop(message: str, status: int = 1) -> None:
    """Ends the run with a one-line message on stderr (printed once under torchrun) and `status`."""
    print_once(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def finish() -> None:
    """Ends a distributed run cleanly: all ranks meet, then each process exits at once.

    At interpreter shutdown, threads of the communication backends (gloo, DeepSpeed's CPU
    shared-memory op) sometimes abort with "terminate called without an active exception",
    which turns a finished run into a failed one (seen on CPU in about one run in eight, even
    after destroy_process_group). Everything is written by then, so skip that shutdown.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main_process_decides(decide: Callable[[], T], errors: tuple[type[BaseException], ...] = ()) -> T:
    """Runs `decide` on the main process only and gives every process its result.

    For decisions that touch shared files (locks, renamed folders): one process acts, all agree.
    An exception of the `errors` kinds is raised on every process.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = decide()
        except errors as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def gather_lists(items: list) -> list:
    """Every process's `items`, concatenated in rank order (the same list on every process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(items)
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


@contextlib.contextmanager
def main_process_first(local: bool = True) -> Iterator[None]:
    """The block runs on one process first (per node with `local`, else one in the whole job), then on the others.

    For downloads and caches: the first process fetches into the cache, the others then find it there.
    Per node is right whether the nodes share a filesystem or not: each node's cache gets filled once,
    and on a shared one the Hub cache's file locks make the other nodes' first processes wait for it.
    Every process enters the block, the first too when it fails (the others then fail the same way).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0 if local else dist.get_rank() == 0
    if not first:
        dist.barrier()  # wait for the first ones
    try:
        yield
    finally:
        if first:
            dist.barrier()  # let the others in
