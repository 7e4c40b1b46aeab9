"""Data for the recipes: your own data (converted jsonl, LLaVA / ShareGPT JSON, CSV) and Hub datasets (or local
copies of them).

- `converted`: the jsonl + images/ format every reader produces, its validator and loader (`load_jsonl_dataset`);
- `llava`: LLaVA / ShareGPT records (`<image>` placeholders become numbered tags);
- `csv_table`: a CSV of image, question, answer;
- `formats`: which reader reads a file, and a dataset from a folder or a file (`load_own_data`);
- `hub`: `load_hf_dataset` for Hub ids and local copies, `cauldron_example` for the_cauldron's rows;
- `preference`: preference data for DPO (a chosen and a rejected answer; finetune_hf_trainer_dpo.py), jsonl or a
  JSON list in two layouts, flat (RLAIF-V's columns) `{"id"?, "image"?: path or [paths], "question", "chosen",
  "rejected"}` or `{"id"?, "conversations": [turn, ..., {"images"?, "user", "chosen", "rejected"}]}`, read into the
  converted form whose last turn has "assistant" (chosen) and "rejected" (`load_preference_data`,
  `preference_example`), and openbmb/RLAIF-V-Dataset's Hub rows (`rlaif_v_example`). The supervised loaders and
  the preference one refuse each other's files;
- `python -m phivision.data validate DATA` (`cli`): checks a folder or a file before training (preference files too).
"""

from .converted import (ValidationError, first_image, load_jsonl_dataset, record_example, record_images, validate_file,
                        validate_record)
from .formats import OwnData, is_video_like, load_own_data, validate_data_file
from .hub import DatasetError, cauldron_example, hold_out_first, load_hf_dataset, sizes_only
from .preference import REJECTED, load_preference_data, preference_example, rejected_conversation, rlaif_v_example

__all__ = ["REJECTED", "DatasetError", "OwnData", "ValidationError", "cauldron_example", "hold_out_first", "first_image",
           "is_video_like", "load_hf_dataset", "load_jsonl_dataset", "load_own_data", "load_preference_data",
           "preference_example", "record_example", "record_images", "rejected_conversation", "rlaif_v_example",
           "sizes_only", "validate_data_file", "validate_file", "validate_record"]
