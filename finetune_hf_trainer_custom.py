"""Fine-tune Phi-3.5-vision or Phi-4-multimodal on your own data: converted jsonl, LLaVA / ShareGPT JSON, or
a CSV of image, question, answer.

    python -m phivision.data validate my_data                                           # check it first
    torchrun --nproc_per_node=4 finetune_hf_trainer_custom.py --data_dir my_data [--metric anls]
    torchrun --nproc_per_node=4 finetune_hf_trainer_custom.py --data_file llava.json --image_folder /data/coco

Data (README, "Your own data"): --data_dir holds train.jsonl|.json|.csv, optionally test.*, and images/;
or --data_file is one such file (images: --image_folder, default images/ beside it). Evaluation: the test
file, else --eval_fraction of the training records. Images: --num_crops 16, or 4 when most samples have 4
or more images (video frames). Metric: --metric accuracy|anls|none (none: answers written, not scored),
or set METRIC below to your own function.
"""

from dataclasses import dataclass, field
from functools import partial

from phivision.data import ValidationError, first_image, is_video_like, load_own_data, record_example
from phivision.distributed import print_once, stop
from phivision.training import FlagError, parse_args, run

METRIC = None  # your own metric instead of --metric: a function (prediction, answers) -> score in 0..1


@dataclass
class CustomArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with train.jsonl|.json|.csv, optionally test.*, and images/."})
    data_file: str | None = field(
        default=None, metadata={"help": "One data file (.jsonl, LLaVA .json or .csv) instead of --data_dir."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the image paths are relative to (default: images/ beside the data)."})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Without a test file, hold out this fraction of the training records for "
                                "evaluation (0: no evaluation)."})
    metric: str = field(
        default="accuracy", metadata={"help": "accuracy (exact match), anls (DocVQA's), or none (answers are "
                                      "written to eval_*.json, not scored).", "choices": ["accuracy", "anls", "none"]})

    def __post_init__(self):
        if (self.data_dir is None) == (self.data_file is None):
            raise FlagError("pass --data_dir DIR or --data_file FILE (one of them)")
        if not 0 <= self.eval_fraction < 1:
            raise FlagError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")


def format_example(row, image_root):
    """A record (converted form) -> (conversation, images), the images opened but not decoded."""
    return record_example(row, image_root)


def main(argv=None):
    args = parse_args(CustomArguments, argv=argv, num_crops=None)  # None: picked from the data below
    task = args.task
    data_path = task.data_dir or task.data_file
    try:
        data = load_own_data(data_path, task.image_folder, task.eval_fraction, args.training.seed)
    except ValidationError as e:
        stop(f"{e}\nCheck the data with: python -m phivision.data validate {data_path}")
    if args.model.num_crops is None:
        args.model.num_crops = 4 if is_video_like(data.train) else 16
    print_once(f"{len(data.train)} training records; evaluation on {data.eval_source}; "
               f"--num_crops {args.model.num_crops}")
    run(args, data.train, data.eval, partial(format_example, image_root=data.images_dir), METRIC or task.metric,
        example_image=first_image(data.eval or data.train, data.images_dir))


if __name__ == "__main__":
    main()
