"""Fine-tune Phi-3.5-vision or Phi-4-multimodal on DocVQA (questions about document images), scored with ANLS.

    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py                    # mini-train split
    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py --full_train --bf16 --use_flash_attention \
        --batch_size 64 --output_dir out --learning_rate 4e-5 --num_train_epochs 2

Data: nielsr/docvqa_1200_examples (train 1000 / test 200; --dataset_name_or_path for a local copy);
--full_train trains on HuggingFaceM4/the_cauldron "docvqa" instead. Evaluation: the 200 test rows.
"""

from dataclasses import dataclass, field

from phivision.data import cauldron_example, load_hf_dataset
from phivision.training import parse_args, run

MINI_DATASET, CAULDRON, METRIC = "nielsr/docvqa_1200_examples", "HuggingFaceM4/the_cauldron", "anls"


@dataclass
class DocVQAArguments:
    full_train: bool = field(default=False, metadata={"help": "Train on the_cauldron's full DocVQA train set."})
    cauldron_name_or_path: str = field(
        default=CAULDRON, metadata={"help": "the_cauldron for --full_train: Hub id or local copy of its docvqa config."}
    )


def load_data(args):
    """(train rows, their format function, eval rows)."""
    mini = args.data.dataset_name_or_path or MINI_DATASET
    eval_rows = load_hf_dataset(mini, split="test")
    if args.task.full_train:
        return load_hf_dataset(args.task.cauldron_name_or_path, "docvqa", split="train"), cauldron_example, eval_rows
    return load_hf_dataset(mini, split="train"), format_example, eval_rows


def format_example(row):
    """A docvqa_1200_examples row -> (conversation, images); all answers count for ANLS."""
    question = row["query"]["en"] + "\nAnswer briefly."
    turn = {"user": question, "assistant": row["answers"][0], "answers": row["answers"], "images": [row["image"]]}
    return [turn], [row["image"]]


def main(argv=None):
    args = parse_args(DocVQAArguments, argv=argv)
    train_rows, format_train, eval_rows = load_data(args)
    run(args, train_rows, eval_rows, format_example, METRIC, format_train=format_train)


if __name__ == "__main__":
    main()
