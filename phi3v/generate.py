"""Answer prompts about images with Phi-3(.5)-vision: a Hub model, a fine-tuned one, or a base + LoRA adapter.

    python -m phi3v.generate --model microsoft/Phi-3.5-vision-instruct --image photo.jpg --prompt "What is shown?"
    python -m phi3v.generate --model BASE --adapter LORA_OUTPUT_DIR --image a.jpg --image b.jpg \\
        --prompt "Is <|image_1|> brighter than <|image_2|>?"
    python -m phi3v.generate --model MODEL --input data/test.jsonl --output predictions.jsonl [--batch_size 8]

One prompt: the answer is streamed to stdout as it is generated (nothing else goes to stdout). Without
`<|image_N|>` tags in the prompt, the tags of the given images go first, one per line, as in training.
`--input`: records in the converted-data format (see `phi3v.data`); the last turn of each conversation is
answered (its "assistant", if any, is ignored), image paths are relative to `--images_dir` (default: the
`images/` folder beside the jsonl). Every input record is written to `--output` with a "prediction" field
added, in the input order. Decoding is greedy unless `--do_sample` / `--num_beams` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.utils import GenerationMixin

from .evaluation import conversation_prompt, generation_prompt, length_batches, prompt_length
from .modeling import longrope_limit

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_PROMPT = "Describe the image."
STOP_TOKENS = ("<|end|>", "<|endoftext|>")  # chat answers end with <|end|>; <|endoftext|> ends a sample


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go (a peft wrapper or a device-mapped 4-bit model included)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of <|end|> and <|endoftext|> in this tokenizer (its EOS if it has neither)."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != unk and token_id not in ids:
            ids.append(token_id)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


class ImageSafeRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """`repetition_penalty` for inputs with image positions, which hold negative ids (-k for image k).

    transformers' processor gathers the scores at every id of `input_ids` and fails on negative ones.
    Here they are mapped to its out-of-vocabulary slot (index `vocab_size`, which it drops), so exactly
    the text tokens of the prompt and of the answer are penalised, as for a text-only model.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return super().__call__(input_ids.masked_fill(input_ids < 0, scores.shape[-1]), scores)


def _check_expansion(model: torch.nn.Module, images: Sequence[Sequence[Any]], kwargs: dict[str, Any]) -> None:
    """Refuses beam search / several sequences on multi-image prompts when the model would mix up images.

    generate() repeats every input tensor per beam along dim 0: pixel_values [a, b] become [a, a, b, b],
    right when each prompt has at most one image, wrong for a prompt with images a and b ([a, b, a, b]).
    """
    if max(kwargs.get("num_beams") or 1, kwargs.get("num_return_sequences") or 1) == 1:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    expand = getattr(type(base), "_expand_inputs_for_generation", None)
    if expand is GenerationMixin._expand_inputs_for_generation and any(len(i) > 1 for i in images):
        raise ValueError("--num_beams > 1 with several images in one prompt is not supported by this model version "
                         "(the images would be repeated per beam in the wrong order); use --num_beams 1")


def generate_answers(
    model: torch.nn.Module,
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    *,
    num_crops: int | None = None,
    max_new_tokens: int = 64,
    streamer=None,
    **generate_kwargs: Any,
) -> list[str]:
    """Answers to a batch of prompts (left-padded into one `generate` call), stripped, without special tokens.

    Args:
        model: `Phi3VForCausalLM` or a peft model wrapping one, in eval mode, on any device.
        processor: `Phi3VProcessor`; its tokenizer gives the stop ids (`<|end|>`, `<|endoftext|>`) and decodes.
        prompts: full prompts with `<|image_N|>` tags (see `generation_prompt` / `conversation_prompt`).
        images: per prompt, its images (PIL) in tag order; empty for text-only prompts.
        num_crops: crops per image (None: the processor's default).
        max_new_tokens: generation budget per answer.
        streamer: a transformers streamer (batch of one prompt, no beam search).
        generate_kwargs: passed to `generate` (do_sample, temperature, top_p, top_k, num_beams...).
            `repetition_penalty` goes through `ImageSafeRepetitionPenalty`.
    """
    tokenizer = processor.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[-1]
    _check_expansion(model, images, generate_kwargs)
    penalty = generate_kwargs.pop("repetition_penalty", None)
    penalty = penalty or getattr(getattr(model, "generation_config", None), "repetition_penalty", None)
    if penalty is not None and penalty != 1.0:
        processors = [*(generate_kwargs.get("logits_processor") or []), ImageSafeRepetitionPenalty(float(penalty))]
        generate_kwargs["logits_processor"] = LogitsProcessorList(processors)
        generate_kwargs["repetition_penalty"] = 1.0  # no second, crashing, processor from the generation config
    processor_kwargs = {} if num_crops is None else {"num_crops": num_crops}
    if len(prompts) == 1:  # a single prompt: the processor's errors then say "prompt", not "prompt 0"
        text, images_arg = prompts[0], list(images[0]) or None
    else:
        text, images_arg = list(prompts), [list(i) for i in images] if any(images) else None
    inputs = processor(text=text, images=images_arg, padding_side="left", return_tensors="pt", **processor_kwargs)
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                            use_cache=True, streamer=streamer, **generate_kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
    # Cut at the first stop token: what generate puts after it is padding.
    new_tokens = [ids[: next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))] for ids in new_tokens]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ----------------------------------------------------------------------------- loading

def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`--dtype`: "auto" is bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model_and_processor(model_name: str, adapter: str | None = None, *, dtype: str = "auto",
                             device: str | None = None, attn_implementation: str = "sdpa"):
    """The model (with the LoRA adapter applied when given), in eval mode on `device`, and its processor.

    The processor comes from the adapter folder when it has one (training saves it there), else from the model.
    """
    from .modeling import Phi3VForCausalLM
    from .processing import Phi3VProcessor

    if (Path(model_name) / "adapter_config.json").is_file() and not (Path(model_name) / "config.json").is_file():
        base = json.loads((Path(model_name) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ValueError(f"--model {model_name} is a LoRA adapter: pass --model {base or 'BASE_MODEL'} "
                         f"--adapter {model_name}")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter}: no adapter_config.json in it (is it a LoRA output folder?)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = Phi3VForCausalLM.from_pretrained(model_name, dtype=resolve_dtype(dtype, device),
                                             attn_implementation=attn_implementation, device_map={"": device})
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    has_processor = adapter is not None and (Path(adapter) / "preprocessor_config.json").is_file()
    processor = Phi3VProcessor.from_pretrained(adapter if has_processor else model_name)
    return model.eval(), processor


def open_image(path: str | Path, flag: str = "--image") -> Image.Image:
    """The image at `path`, decoded (errors name the flag and the file)."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise ValueError(f"{flag} {path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    return image


# ----------------------------------------------------------------------------- the two modes

def answer_prompt(model, processor, prompt: str, images: Sequence[Image.Image], *, stream: bool = True,
                  num_crops: int | None = None, max_new_tokens: int = 64, **generate_kwargs: Any) -> str:
    """One answer; streamed to stdout as it is generated when `stream` (printed at the end under beam search)."""
    from transformers import TextStreamer

    streaming = stream and (generate_kwargs.get("num_beams") or 1) == 1  # generate() streams no beam search
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if streaming else None
    answer = generate_answers(model, processor, [generation_prompt(prompt, len(images))], [images],
                              num_crops=num_crops, max_new_tokens=max_new_tokens, streamer=streamer,
                              **generate_kwargs)[0]
    if stream and not streaming:
        print(answer, flush=True)
    return answer


def read_records(jsonl: str | Path, images_dir: str | Path) -> list[dict]:
    """The records of an input jsonl, checked like training data except that the last turn needs no answer."""
    from .data import Problem, ValidationError, validate_record

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

    from .data import image_size, record_images

    images_root = Path(images_dir) if images_dir is not None else Path(input_file).parent / "images"
    records = read_records(input_file, images_root)
    prompts = [conversation_prompt(r["conversations"], len(record_images(r))) for r in records]
    sizes = [[image_size(images_root / path) for path in record_images(record)] for record in records]
    lengths = [prompt_length(processor, prompt, image_sizes, num_crops) for prompt, image_sizes in zip(prompts, sizes)]
    order = sorted(range(len(records)), key=lambda i: (lengths[i], i))
    batches = length_batches([lengths[i] for i in order], batch_size, longrope_limit(model), max_new_tokens)
    predictions: list[str | None] = [None] * len(records)
    with tqdm(total=len(records), desc="generating", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for start, end in batches:
            batch = order[start:end]
            images = [[open_image(images_root / p, "--input") for p in record_images(records[i])] for i in batch]
            answers = generate_answers(model, processor, [prompts[i] for i in batch], images, num_crops=num_crops,
                                       max_new_tokens=max_new_tokens, **generate_kwargs)
            for i, answer in zip(batch, answers):
                predictions[i] = answer
            bar.update(len(batch))
    results = [{**record, "prediction": prediction} for record, prediction in zip(records, predictions)]
    write_jsonl(output_file, results)
    return results


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """One JSON object per line (UTF-8), through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:  # U+2028/9 escaped: str.splitlines and JavaScript split lines at them
                line = json.dumps(row, ensure_ascii=False)
                f.write(line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- the command line

def try_command(output_dir: str, base_model: str | None, is_adapter: bool, example_image: str | None = None, *,
                num_crops: int | None = None, prompt: str = DEFAULT_PROMPT) -> str:
    """The `python -m phi3v.generate` command that tries a recipe's result (printed at the end of a run).

    `output_dir` holds a full model, or a LoRA adapter of `base_model` when `is_adapter`. `num_crops`: the
    value the run trained with (the saved processor keeps the base's default).
    """
    if is_adapter and not base_model:
        raise ValueError("try_command: an adapter needs its base_model")
    parts = ["python", "-m", "phi3v.generate"]
    parts += ["--model", base_model, "--adapter", output_dir] if is_adapter else ["--model", output_dir]
    parts += ["--image", example_image or "path/to/image.jpg", "--prompt", prompt]
    if num_crops is not None:
        parts += ["--num_crops", str(num_crops)]
    return shlex.join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phi3v.generate",
        description="Answer a prompt about images (streamed), or every record of a jsonl file, with Phi-3(.5)-vision.",
    )
    parser.add_argument("--model", required=True,
                        help="Hub id or local folder of the model (a fine-tuned --output_dir, a merged model, "
                             "or the base model of --adapter).")
    parser.add_argument("--adapter", default=None, help="LoRA/QLoRA adapter folder to apply on --model.")
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
    many.add_argument("--images_dir", default=None,
                      help="Folder the image paths of --input are relative to (default: images/ beside --input).")
    many.add_argument("--batch_size", type=int, default=8, help="Prompts per generate call with --input (default 8).")
    many.add_argument("--no_tqdm", action="store_true", help="No progress bar.")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--num_crops", type=int, default=None,
                     help="Max 336x336 crops per image (default: the processor's; use the value you trained with).")
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
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="Weights precision (default auto: bf16 on GPUs that support it, else fp16; fp32 on CPU).")
    hw.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if available, else cpu).")
    hw.add_argument("--attn_implementation", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                    help="Attention kernel (default sdpa; flash_attention_2 falls back to sdpa without flash-attn).")
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
    if args.input is not None and not Path(args.input).is_file():
        parser.error(f"--input {args.input}: no such file")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    generate_kwargs = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                       if getattr(args, k) is not None}
    generate_kwargs.update(do_sample=args.do_sample, num_beams=args.num_beams)
    options = dict(num_crops=args.num_crops, max_new_tokens=args.max_new_tokens, **generate_kwargs)
    from .data import ValidationError

    try:
        images = [open_image(path) for path in args.image]  # before loading the model: fail fast
        model, processor = load_model_and_processor(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                                    attn_implementation=args.attn_implementation)
        if args.input is None:
            answer_prompt(model, processor, args.prompt, images, **options)
        else:
            results = answer_file(model, processor, args.input, args.output, args.images_dir,
                                  batch_size=args.batch_size, progress=not args.no_tqdm, **options)
            print(f"Wrote {len(results)} predictions to {args.output}", file=sys.stderr)
    except (ValidationError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
