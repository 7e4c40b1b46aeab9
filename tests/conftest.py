"""Shared fixtures. Tests run offline; reference files (shared/ beside the repo) are optional: tests skip without them."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    from phi3v.processing import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(reference_dir / "phi35v_hub_files")


@pytest.fixture(scope="session")
def tiny_processor():
    """Real image processor (num_crops 4) with the tiny offline tokenizer. Do not mutate."""
    from phi3v.tiny import build_tiny_processor

    return build_tiny_processor(num_crops=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random tiny checkpoint saved with num_crops 1, for end-to-end recipe runs."""
    from phi3v.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-phi3v", num_crops=1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """500 eval rows + 32 train rows, one in four text-only."""
    from phi3v.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=32, text_only_every=4)
