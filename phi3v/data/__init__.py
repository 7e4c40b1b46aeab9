"""Data for the recipes: the converted-data format (your own image, multi-image and video data) and
Hub datasets (or local copies of them).

- `converted`: the jsonl + images/ format, its validator and loader (`load_jsonl_dataset`);
- `hub`: `load_hf_dataset` for Hub ids and local copies, `cauldron_example` for the_cauldron's rows;
- `python -m phi3v.data validate DATA_DIR` (`cli`): checks a folder before training.
"""

from .converted import ValidationError, load_jsonl_dataset, record_images, validate_file, validate_record
from .hub import cauldron_example, load_hf_dataset, sizes_only

__all__ = ["ValidationError", "cauldron_example", "load_hf_dataset", "load_jsonl_dataset", "record_images",
           "sizes_only", "validate_file", "validate_record"]
