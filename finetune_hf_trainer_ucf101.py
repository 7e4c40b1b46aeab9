"""Fine-tune Phi-3.5-vision on UCF-101 video classification, each clip as 8 frames.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101

Data: the converted-data format (ucf101_{train,test}.jsonl + images/), which is also the format
for your own image, multi-image or video data (see README). Metric: exact-match accuracy on test.
"""

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from phi3v import training
from phi3v.data import ValidationError, load_jsonl_dataset, record_images

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
    args, task = training.parse_args(UCF101Arguments, argv=argv, num_crops=4)
    try:
        train_rows = load_jsonl_dataset(task.data_dir, "train")
        eval_rows = load_jsonl_dataset(task.data_dir, "test")
    except ValidationError as e:
        training.stop(f"{e}\nCheck the whole folder with: python -m phi3v.data validate {task.data_dir}")
    image_root = Path(task.data_dir) / "images"

    def format_row(row):
        return format_example(row, image_root)

    model, processor = training.load_model_and_processor(args)
    if not args.skip_eval_before:
        training.evaluate(model, processor, eval_rows, format_row, METRIC, args, "before")
    trainer = training.train(model, processor, train_rows, format_row, args)
    training.save(trainer, processor, args)
    training.evaluate(trainer.model, processor, eval_rows, format_row, METRIC, args, "after")
    example = next((path for row in eval_rows for path in record_images(row)), None)
    training.print_try_command(args, str(image_root / example) if example else None)
    training.finish()


if __name__ == "__main__":
    main()
