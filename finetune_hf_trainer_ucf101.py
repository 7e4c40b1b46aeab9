"""Fine-tune Phi-3.5-vision on UCF-101 video classification, each clip as 8 frames.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101

Data: the converted-data format (ucf101_{train,test}.jsonl + images/), which is also the format
for your own image, multi-image or video data (see README). Metric: exact-match accuracy on test.
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from phi3v.data import ValidationError, load_jsonl_dataset, record_images
from phi3v.distributed import stop
from phi3v.training import parse_args, run

METRIC = "accuracy"


@dataclass
class UCF101Arguments:
    data_dir: str = field(default="./converted_ucf101", metadata={"help": "Output folder of convert_ucf101.py."})


def format_example(row, image_root: Path):
    """A converted record -> (conversation, frames).

    Frames are opened, not decoded: counting tokens at start reads only their sizes, and the
    processor decodes (and converts to RGB) the ones it trains on.
    """
    return row["conversations"], [Image.open(image_root / path) for path in record_images(row)]


def main(argv=None):
    args = parse_args(UCF101Arguments, argv=argv, num_crops=4)
    data_dir = args.task.data_dir
    try:
        train_rows, eval_rows = load_jsonl_dataset(data_dir, "train"), load_jsonl_dataset(data_dir, "test")
    except ValidationError as e:
        stop(f"{e}\nCheck the whole folder with: python -m phi3v.data validate {data_dir}")
    image_root = Path(data_dir) / "images"
    example = next((path for row in eval_rows for path in record_images(row)), None)
    run(args, train_rows, eval_rows, partial(format_example, image_root=image_root), METRIC,
        example_image=str(image_root / example) if example else None)


if __name__ == "__main__":
    main()
