"""Shared fixtures. Tests run offline; reference files (shared/ beside the repo) are optional: tests skip without them."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import built_once

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per process (set before torch loads; subprocesses inherit it): the tiny models' ops are too small to
# share, and OpenMP workers spinning on a 2-core machine beside another test process made in-process runs 4-7x
# slower (the task-metric recipe test: 54-79 s with the default 2 threads, 12 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


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
