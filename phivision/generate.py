"""Answer prompts about images with Phi-3.5-vision or Phi-4-multimodal: a Hub model, a fine-tuned one, or a
base + LoRA adapter.

    python -m phivision.generate --model microsoft/Phi-3.5-vision-instruct --image photo.jpg --prompt "What is shown?"
    python -m phivision.generate --model BASE --adapter LORA_OUTPUT_DIR --image a.jpg --image b.jpg \\
        --prompt "Is <|image_1|> brighter than <|image_2|>?"
    python -m phivision.generate --model MODEL --input data/test.jsonl --output predictions.jsonl [--batch_size 8]

One prompt: the answer is streamed to stdout as it is generated (nothing else goes to stdout). Without
`<|image_N|>` tags in the prompt, the tags of the given images go first, one per line, as in training.
`--input`: records in the converted-data format (see `phivision.data`); the last turn of each conversation is
answered (its "assistant", if any, is ignored), image paths are relative to `--images_dir` (default: the
`images/` folder beside the jsonl). Every input record is written to `--output` with a "prediction" field
added, in the input order. Decoding is greedy unless `--do_sample` / `--num_beams` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .chat import conversation_prompt, generation_prompt
from .data.converted import Problem, ValidationError, record_images, validate_record
from .data.hub import missing_local_folder
from .errors import SetupError
from .files import cannot_write_in, write_jsonl
from .generation import (add_hardware_flags, add_model_flags, generate_answers, length_sorted_batches,
                         load_pretrained)
from .images import image_size, open_image
from .phi3v.modeling import longrope_limit


# ----------------------------------------------------------------------------- the two modes

def answer_prompt(model, processor, prompt: str, images: Sequence[Image.Image], *, stream: bool = True,
                  num_crops: int | None = None, max_new_tokens: int = 64, **generate_kwargs: Any) -> str:
    """One answer; streamed to stdout as it is generated when `stream` (printed at the end under beam search)."""
    from transformers import TextStreamer

    streaming = stream and (generate_kwargs.get("num_beams") or 1) == 1  # generate() streams no beam search
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if streaming else None
    answer = generate_answers(model, processor, [generation_prompt(prompt, len(images), processor)], [images],
                              num_crops=num_crops, max_new_tokens=max_new_tokens, streamer=streamer,
                              **generate_kwargs)[0]
    if stream and not streaming:
        print(answer, flush=True)
    return answer


def read_records(jsonl: str | Path, images_dir: str | Path) -> list[dict]:
    """The records of an input jsonl, checked like training data except that the last turn needs no answer."""
    try:
        text = Path(jsonl).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValidationError(f"not UTF-8 text ({e})", jsonl) from None
    records, problems = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(), which also splits at U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            turns = record.get("conversations") if isinstance(record, dict) else None
            if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
                # the turn to answer: its "assistant" may be missing or empty
                record_to_check = {**record, "conversations": [*turns[:-1], {**turns[-1], "assistant": "?"}]}
            else:
                record_to_check = record
            validate_record(record_to_check, images_dir, path=str(jsonl), line=number)
            records.append(record)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(jsonl), number, f"not valid JSON ({e})"))
        except ValidationError as e:
            problems += e.problems
    if problems:
        raise ValidationError(problems)
    if not records:
        raise ValidationError("no records", jsonl)
    return records


def answer_file(model, processor, input_file: str, output_file: str, images_dir: str | None = None, *,
                batch_size: int = 8, num_crops: int | None = None, max_new_tokens: int = 64,
                progress: bool = True, **generate_kwargs: Any) -> list[dict]:
    """Answers the last turn of every record of `input_file`; writes them with "prediction" to `output_file`.

    Prompts are batched by token count to pad less, never across LongRoPE's switch (as `evaluate`
    does); the output keeps the input order and is written at the end, through a temporary file
    renamed into place.
    """
    from tqdm.auto import tqdm

    images_root = Path(images_dir) if images_dir is not None else Path(input_file).parent / "images"
    records = read_records(input_file, images_root)
    prompts = [conversation_prompt(r["conversations"], len(record_images(r)), processor) for r in records]
    sizes = [[image_size(images_root / path) for path in record_images(record)] for record in records]
    lengths = [processor.num_prompt_tokens(prompt, image_sizes, num_crops) for prompt, image_sizes in zip(prompts, sizes)]
    batches = length_sorted_batches(lengths, batch_size, longrope_limit(model), max_new_tokens)
    predictions: list[str | None] = [None] * len(records)
    with tqdm(total=len(records), desc="generating", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for batch in batches:
            images = [[open_image(images_root / p, "--input") for p in record_images(records[i])] for i in batch]
            answers = generate_answers(model, processor, [prompts[i] for i in batch], images, num_crops=num_crops,
                                       max_new_tokens=max_new_tokens, **generate_kwargs)
            for i, answer in zip(batch, answers):
                predictions[i] = answer
            bar.update(len(batch))
    results = [{**record, "prediction": prediction} for record, prediction in zip(records, predictions)]
    write_jsonl(output_file, results)
    return results


# ----------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phivision.generate",
        description="Answer a prompt about images (streamed), or every record of a jsonl file, with Phi-3.5-vision "
                    "or Phi-4-multimodal.",
    )
    add_model_flags(parser)
    one = parser.add_argument_group("one prompt")
    one.add_argument("--prompt", default=None,
                     help="The question. May place the images with <|image_1|>, <|image_2|>...; without tags the "
                          "images go first.")
    one.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="An image for --prompt; repeat the flag for several images (image 1, 2, ... in order).")
    many = parser.add_argument_group("many prompts")
    many.add_argument("--input", default=None, metavar="FILE.jsonl",
                      help="Records in the converted-data format; the last turn of each conversation is answered.")
    many.add_argument("--output", default=None, metavar="FILE.jsonl",
                      help="Where to write the records with a 'prediction' field added (same order as --input).")
    many.add_argument("--overwrite", action="store_true", help="Replace --output if it exists (never --input).")
    many.add_argument("--images_dir", default=None,
                      help="Folder the image paths of --input are relative to (default: images/ beside --input).")
    many.add_argument("--batch_size", type=int, default=8, help="Prompts per generate call with --input (default 8).")
    many.add_argument("--no_tqdm", action="store_true", help="No progress bar.")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--num_crops", type=int, default=None,
                     help="Max crops per image (336x336 for Phi-3.5-vision, 448x448 for Phi-4-multimodal; default: "
                          "the processor's; use the value you trained with).")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="Longest answer, in tokens (default 64).")
    gen.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    gen.add_argument("--temperature", type=float, default=None, help="Sampling temperature (with --do_sample).")
    gen.add_argument("--top_p", type=float, default=None, help="Nucleus sampling probability mass (with --do_sample).")
    gen.add_argument("--top_k", type=int, default=None,
                     help="Sample among the k most likely tokens (with --do_sample).")
    gen.add_argument("--num_beams", type=int, default=1,
                     help="Beam search width (default 1; above 1 the answer is printed at the end, not streamed).")
    gen.add_argument("--repetition_penalty", type=float, default=None,
                     help="Penalty > 1 for tokens already in the prompt or the answer (image positions excluded).")
    gen.add_argument("--seed", type=int, default=None, help="Random seed, for reproducible sampling.")
    add_hardware_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.input is None):
        parser.error("give either --prompt (with --image ...) or --input FILE.jsonl --output FILE.jsonl")
    if args.input is not None and (args.output is None or args.image):
        parser.error("--input needs --output FILE.jsonl, and takes its images from the records (no --image)")
    for flag in ("batch_size", "num_crops", "max_new_tokens", "num_beams"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if missing_local_folder(args.model):
        parser.error(f"--model {args.model}: no such folder")
    if args.input is not None:  # all of it before the model loads and every prompt is answered
        if Path(args.output).is_dir():
            parser.error(f"--output {args.output} is a folder: give the file to write (e.g. "
                         f"{Path(args.output) / 'predictions.jsonl'})")
        if problem := cannot_write_in(Path(args.output).parent):
            parser.error(f"--output {args.output}: cannot write there ({problem})")
    if args.input is not None and not Path(args.input).is_file():
        parser.error(f"--input {args.input}: no such file")
    if args.input is not None and Path(args.output).resolve() == Path(args.input).resolve():
        parser.error(f"--output {args.output} is the --input file: write the predictions elsewhere")
    if args.input is not None and Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output} exists: pass --overwrite to replace it, or choose another file")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    generate_kwargs = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                       if getattr(args, k) is not None}
    generate_kwargs.update(do_sample=args.do_sample, num_beams=args.num_beams)
    options = dict(num_crops=args.num_crops, max_new_tokens=args.max_new_tokens, **generate_kwargs)
    try:
        images = [open_image(path) for path in args.image]  # before loading the model: fail fast
        model, processor = load_pretrained(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                                    attn_implementation=args.attn_implementation)
        if args.input is None:
            answer_prompt(model, processor, args.prompt, images, **options)
        else:
            results = answer_file(model, processor, args.input, args.output, args.images_dir,
                                  batch_size=args.batch_size, progress=not args.no_tqdm, **options)
            print(f"Wrote {len(results)} predictions to {args.output}", file=sys.stderr)
    except (ValidationError, ValueError, OSError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
