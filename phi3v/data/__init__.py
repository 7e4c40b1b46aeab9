"""Data for the recipes: the converted-data format (your own image, multi-image and video data) and
Hub datasets (or local copies of them).

- `converted`: the jsonl + images/ format, its validator and loader (`load_jsonl_dataset`);
- `hub`: `load_hf_dataset` for Hub ids and local copies, `cauldron_example` for the_cauldron's rows;
- `python -m phi3v.data validate DATA_DIR` (`cli`): checks a folder before training.
"""

from .converted import ValidationError, load_jsonl_dataset, record_images, validate_file, validate_record
from .hub import DatasetError, cauldron_example, hold_out, load_hf_dataset, sizes_only

__all__ = ["DatasetError", "ValidationError", "cauldron_example", "hold_out", "load_hf_dataset", "load_jsonl_dataset", "record_images",
           "sizes_only", "validate_file", "validate_record"]
