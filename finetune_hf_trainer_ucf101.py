"""Fine-tune Phi-3.5-vision or Phi-4-multimodal on UCF-101 video classification, each clip as 8 frames.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101

Data: the converted-data format (ucf101_{train,test}.jsonl + images/). Metric: exact-match accuracy on
test. For your own data, video or not, use finetune_hf_trainer_custom.py (see README).
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from phivision.data import ValidationError, first_image, load_jsonl_dataset, record_example
from phivision.distributed import stop
from phivision.training import parse_args, run

METRIC = "accuracy"


@dataclass
class UCF101Arguments:
    data_dir: str = field(default="./converted_ucf101", metadata={"help": "Output folder of convert_ucf101.py."})


def format_example(row, image_root: Path):
    """A converted record -> (conversation, frames), the frames opened but not decoded."""
    return record_example(row, image_root)


def main(argv=None):
    args = parse_args(UCF101Arguments, argv=argv, num_crops=4)
    data_dir = args.task.data_dir
    try:
        train_rows, eval_rows = load_jsonl_dataset(data_dir, "train"), load_jsonl_dataset(data_dir, "test")
    except ValidationError as e:
        stop(f"{e}\nCheck the whole folder with: python -m phivision.data validate {data_dir}")
    image_root = Path(data_dir) / "images"
    run(args, train_rows, eval_rows, partial(format_example, image_root=image_root), METRIC,
        example_image=first_image(eval_rows, image_root))


if __name__ == "__main__":
    main()
