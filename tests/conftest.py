"""Shared fixtures. Tests run offline; reference files (shared/ beside the repo) are optional: tests skip without them."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import built_once

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per process (set before torch loads; subprocesses inherit it): the tiny models' ops are too small to
# share, and OpenMP workers spinning on a 2-core machine beside another test process made in-process runs 4-7x
# slower (the task-metric recipe test: 54-79 s with the default 2 threads, 12 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

# The slowest tests (test file::name prefix), longest first, from a run's --durations (9:21 on 2 cores, 695 tests).
# They run before the rest so that under `pytest -n 2 --dist worksteal` (the Makefile's) the two workers end
# together: found at the end of the collection instead, one of them could leave a worker alone with it for a minute.
SLOW_FIRST = [
    "test_gpu_check.py::test_the_whole_plan_runs_on_cpu",  # 85 s: six recipe runs, each a torchrun launch
    "test_dpo_recipe.py::test_full_fine_tuning_zero2_with_stored_reference",  # 62 s: DPO's two learning runs
    "test_recipes.py::test_learning_colour_task",  # 40 s
    "test_dpo_recipe.py::test_lora_learns_the_preference",  # 35 s
    "test_long_runs.py::test_killed_at_any_moment",  # builds the ZeRO-2 reference that the next one reads
    "test_long_runs.py::test_sigterm_stops",  # a real torchrun launch signalled, its rerun
    "test_web.py::test_chat_in_a_browser",  # 25 s alone, more beside another test process
    "test_phi4mm_sizing.py::test_bench_cpu_rows_for_phi4mm",
    "test_dpo_recipe.py::test_sigterm_stops",
    "test_bench.py::test_bench_rows_count_flops",
    "test_recipe_report.py::test_full_finetuning_torchrun",
    "test_sharded_training.py::test_sharded_full_finetuning",
    "test_dpo_recipe.py::test_killed_and_rerun",
    "test_phi4mm_sizing.py::test_bench_meta_rows_for_phi4mm",
    "test_long_runs.py::test_two_seeded_runs_are_bit_identical",
    "test_bench.py::test_bench_runs_every_training_mode",
    "test_modeling_compile.py::test_length_grouped_batches_recompile",
    "test_modeling_compile.py::test_torch_compile_trains_and_evaluates_a_recipe",
    "test_bench.py::test_the_compiled_row",
    "test_long_runs.py::test_a_setup_mistake_under_torchrun",
    "test_gpu_check_phi4mm.py::test_microsofts_recipe_check_runs_on_cpu",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Puts the tests in SLOW_FIRST first, in its order; the others keep theirs."""
    def rank(item: pytest.Item) -> int:
        name = item.nodeid.rsplit("/", 1)[-1]
        return next((i for i, prefix in enumerate(SLOW_FIRST) if name.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """shared/reference beside the repository root (skips the test when absent)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference files not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def golden(reference_dir: Path) -> dict:
    """Outputs of the original Phi-3.5-vision processor (golden/processor_golden.json)."""
    return json.loads((reference_dir / "golden" / "processor_golden.json").read_text())


@pytest.fixture(scope="session")
def hub_processor(reference_dir: Path):
    """Phi3VProcessor loaded from the real Hub tokenizer/preprocessor files."""
    from phivision.phi3v.processing import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(reference_dir / "phi35v_hub_files")


@pytest.fixture(scope="session")
def tiny_processor():
    """Real image processor (num_crops 4) with the tiny offline tokenizer. Do not mutate."""
    from phivision.tiny import build_tiny_processor

    return build_tiny_processor(num_crops=4)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def shared(folder: Path) -> Iterator[Path]:
    """Yields `folder`, then fails the run if a test wrote into it (such a test needs its own copy: copytree)."""
    before = listing(folder)
    yield folder
    assert listing(folder) == before, f"a test wrote into the shared {folder}: give it a copy (shutil.copytree)"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Iterator[Path]:
    """A random tiny checkpoint saved with num_crops 1, for end-to-end recipe runs (one per test run: read only)."""
    from phivision.tiny import build_tiny_checkpoint

    yield from shared(built_once(tmp_path_factory, "tiny-phi3v", lambda path: build_tiny_checkpoint(path, num_crops=1)))


@pytest.fixture(scope="session")
def tiny_phi4mm(tmp_path_factory) -> Iterator[Path]:
    """A random tiny Phi-4-multimodal checkpoint in the Hub's native layout (vision-lora/ and speech-lora/ beside
    the weights), for end-to-end recipe runs (one per test run: read only)."""
    from phivision import tiny

    yield from shared(built_once(tmp_path_factory, "tiny-phi4mm",
                                 lambda path: tiny.main([str(path), "--family", "phi4mm"])))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Iterator[Path]:
    """500 eval rows + 32 train rows, one in four text-only (one per test run: read only)."""
    from phivision.synthetic import make_shapes_dataset

    yield from shared(built_once(tmp_path_factory, "shapes",
                                 lambda path: make_shapes_dataset(path, num_train=32, text_only_every=4)))


class ReferenceRun(NamedTuple):
    """An uninterrupted run that the kill, preemption and resume tests compare with (ZeRO-2's, or LoRA's)."""

    flags: list[str]  # the memes recipe's flags, less --output_dir
    out: Path  # its --output_dir (read only)
    seconds: float  # how long the whole run took (the kill tests kill their runs within it)


def reference_run(tmp_path_factory, name: str, flags: list[str], nproc: int | None) -> Iterator[ReferenceRun]:
    """The memes recipe run once per test run with `flags` (on `nproc` ranks, or as one plain process: nproc None;
    forked as the kill tests' runs are, tests/forked.py), every checkpoint kept (any step can be a resume point);
    yields it read only."""
    from test_recipes import forked_recipe

    def run(folder: Path) -> None:
        start = time.time()
        forked_recipe("finetune_hf_trainer_hateful_memes.py", *flags, "--save_total_limit", "6",
                      "--output_dir", str(folder / "out"), nproc=nproc)
        (folder / "seconds").write_text(str(time.time() - start))

    folder = built_once(tmp_path_factory, name, run)
    for _ in shared(folder):
        yield ReferenceRun(flags, folder / "out", float((folder / "seconds").read_text()))


@pytest.fixture(scope="session")
def zero2_reference(tiny, shapes, tmp_path_factory) -> Iterator[ReferenceRun]:
    """Full fine-tuning under ZeRO-2 on 2 ranks, 6 steps with a checkpoint at each, evaluated before and after on 2
    rows. One run per test run."""
    flags = ["--model_name_or_path", str(tiny), "--dataset_name_or_path", str(shapes), "--batch_size", "4",
             "--batch_size_per_gpu", "1", "--max_steps", "6", "--save_steps", "1", "--max_eval_samples", "2",
             "--learning_rate", "1e-3", "--seed", "1"]
    yield from reference_run(tmp_path_factory, "zero2-reference", flags, nproc=2)


@pytest.fixture(scope="session")
def lora_reference(tiny, shapes, tmp_path_factory) -> Iterator[ReferenceRun]:
    """LoRA as one plain process (no torchrun), as the LoRA kill test's killed runs are (its time sets when they are
    killed), 6 steps with a checkpoint at each, evaluated before and after on 2 rows: what the LoRA kill and resume
    tests compare with."""
    flags = ["--model_name_or_path", str(tiny), "--dataset_name_or_path", str(shapes), "--batch_size", "4",
             "--max_steps", "6", "--save_steps", "1", "--max_eval_samples", "2", "--learning_rate", "1e-3", "--seed",
             "1", "--batch_size_per_gpu", "2", "--use_lora", "--lora_rank", "4"]
    yield from reference_run(tmp_path_factory, "lora-reference", flags, nproc=None)
