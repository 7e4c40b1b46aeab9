"""Preference-tune (DPO) Phi-3.5-vision or Phi-4-multimodal on pairs of a chosen and a rejected answer.

    torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py --output_dir out --batch_size 64 --use_lora \
        --bf16 --use_flash_attention                                      # RLAIF-V, LoRA (DDP)
    torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py --output_dir out --batch_size 64 \
        --learning_rate 5e-7 --bf16 --use_flash_attention                 # RLAIF-V, full (DeepSpeed ZeRO-2)
    torchrun --nproc_per_node=4 finetune_hf_trainer_dpo.py --data_dir my_pairs --use_lora [--metric accuracy]

Data: openbmb/RLAIF-V-Dataset (or a local copy: --dataset_name_or_path), the first --num_eval pairs held out
for evaluation; or your own pairs: --data_dir (train.jsonl|.json, optionally test.*, and images/) or
--data_file, evaluated on the test file, else on --eval_fraction of the pairs (README, "Preference tuning").
Row format: `format_example(row) -> (conversation, images)` whose last turn carries the chosen answer as
"assistant" and the rejected one as "rejected" (phivision.data.preference).
Loss: DPO (--loss_type sigmoid, --beta 0.1), IPO (--loss_type ipo), plus RPO's NLL term (--rpo_alpha).
Evaluation: preference accuracy on the held-out pairs, and answers generated against the chosen one
(--metric accuracy|anls|none).
"""

from dataclasses import dataclass, field
from functools import partial

from phivision.data import ValidationError, hold_out_first, load_hf_dataset
from phivision.data.preference import load_preference_data, preference_example, rlaif_v_example
from phivision.distributed import print_once, stop
from phivision.training import FlagError, parse_args, run
from phivision.training.preference import LOSS_TYPES, PreferenceLoss, PreferenceObjective

DATASET = "openbmb/RLAIF-V-Dataset"


@dataclass
class DPOArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Your own pairs: a folder with train.jsonl|.json, optionally test.*, and "
                                "images/ (default: RLAIF-V from the Hub, or --dataset_name_or_path)."})
    data_file: str | None = field(default=None, metadata={"help": "Your own pairs in one .jsonl or .json file."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the image paths are relative to (default: images/ beside the data)."})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Own data without a test file: hold out this fraction of the pairs for "
                                "evaluation (0: no evaluation)."})
    num_eval: int = field(default=500, metadata={"help": "Hub data: hold out the first N pairs for evaluation."})
    metric: str = field(
        default="none", metadata={"help": "Score the generated answers against the chosen one: accuracy (exact "
                                  "match), anls, or none (written to eval_*.json, not scored).",
                                  "choices": ["accuracy", "anls", "none"]})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far the policy may move from the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo.", "choices": list(LOSS_TYPES)})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Add RPO's term: alpha x the chosen answers' mean token NLL (default: none)."})

    def __post_init__(self):
        if self.data_dir is not None and self.data_file is not None:
            raise FlagError("pass --data_dir DIR or --data_file FILE, not both")
        if not 0 <= self.eval_fraction < 1:
            raise FlagError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.num_eval < 0:
            raise FlagError(f"--num_eval must be at least 0, got {self.num_eval}")
        if self.beta <= 0:
            raise FlagError(f"--beta must be above 0, got {self.beta}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise FlagError(f"--rpo_alpha must be at least 0, got {self.rpo_alpha}")


def main(argv=None):
    args = parse_args(DPOArguments, argv=argv, learning_rate=5e-6)
    task = args.task
    local = task.data_dir or task.data_file
    if local:
        try:
            data = load_preference_data(local, task.image_folder, task.eval_fraction, args.training.seed)
        except ValidationError as e:
            stop(str(e))
        train_rows, eval_rows = data.train, data.eval
        format_example = partial(preference_example, image_root=data.images_dir)
        print_once(f"{len(data.train)} training pairs; evaluation on {data.eval_source}")
    else:
        rows = load_hf_dataset(args.data.dataset_name_or_path or DATASET, split="train")
        train_rows, eval_rows = hold_out_first(rows, task.num_eval)
        format_example = rlaif_v_example
    run(args, train_rows, eval_rows, format_example, task.metric,
        objective=PreferenceObjective(PreferenceLoss(task.beta, task.loss_type, task.rpo_alpha)))


if __name__ == "__main__":
    main()
