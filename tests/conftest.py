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
