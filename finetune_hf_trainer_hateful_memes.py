"""Fine-tune Phi-3.5-vision or Phi-4-multimodal on Hateful Memes (yes/no: is this meme hateful?).

    torchrun --nproc_per_node=8 finetune_hf_trainer_hateful_memes.py --output_dir out --batch_size 64 \
        --use_flash_attention --bf16                  # full fine-tuning (DeepSpeed ZeRO-2)
    torchrun --nproc_per_node=2 finetune_hf_trainer_hateful_memes.py --output_dir out --batch_size 64 --use_lora

Data: HuggingFaceM4/the_cauldron, config "hateful_memes" (or a local copy: --dataset_name_or_path).
The first 500 rows are held out for evaluation; the metric is exact-match accuracy.
"""

from phivision.data import cauldron_example, hold_out_first, load_hf_dataset
from phivision.training import parse_args, run

DATASET, CONFIG, NUM_EVAL, METRIC = "HuggingFaceM4/the_cauldron", "hateful_memes", 500, "accuracy"


def load_data(args):
    """(train rows, eval rows)."""
    return hold_out_first(load_hf_dataset(args.data.dataset_name_or_path or DATASET, CONFIG, split="train"), NUM_EVAL)


def format_example(row):
    """A the_cauldron row -> (conversation, images)."""
    return cauldron_example(row)


def main(argv=None):
    args = parse_args(argv=argv)
    train_rows, eval_rows = load_data(args)
    run(args, train_rows, eval_rows, format_example, METRIC)


if __name__ == "__main__":
    main()
