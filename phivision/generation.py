"""Generating answers with Phi-3(.5)-vision: batched prompts, stop tokens, precision, loading for inference.

The library behind evaluation and `python -m phivision.generate`:

    model, processor = load_pretrained("microsoft/Phi-3.5-vision-instruct")          # or a base + adapter
    generate_answers(model, processor, [conversation_prompt(turns, 1, processor)], [[image]])   # -> ["answer"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.utils import GenerationMixin

from .attention import native_bf16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_PROMPT = "Describe the image."


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go (a peft wrapper or a device-mapped 4-bit model included)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def use_chat_stop_tokens(model: torch.nn.Module, processor) -> None:
    """Makes `model.generate` stop where chat answers end, and pad with the tokenizer's pad token.

    The Hub's generation_config.json names `</s>` as EOS, which chat answers never produce.
    What a run saves then carries the right stop tokens in its generation_config.json.
    """
    model.generation_config.eos_token_id = processor.stop_token_ids
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id


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
        model: a model of one of the families (phivision.families), or a peft model wrapping one, in eval mode, on
            any device.
        processor: its processor; gives the stop ids (`<|end|>`, `<|endoftext|>`), and its tokenizer decodes.
        prompts: full prompts with `<|image_N|>` tags (see `phivision.chat.conversation_prompt`).
        images: per prompt, its images (PIL) in tag order; empty for text-only prompts.
        num_crops: crops per image (None: the processor's default).
        max_new_tokens: generation budget per answer.
        streamer: a transformers streamer (batch of one prompt, no beam search).
        generate_kwargs: passed to `generate` (do_sample, temperature, top_p, top_k, num_beams...).
            `repetition_penalty` goes through `ImageSafeRepetitionPenalty`.
    """
    tokenizer = processor.tokenizer
    stop_ids = processor.stop_token_ids
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


class StopWhenSet:
    """A stopping criterion: generation ends at the next token once `event` is set (a page's stop button)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_answer(model: torch.nn.Module, processor, prompt: str, images: Sequence[Any], *,
                  stop: threading.Event | None = None, context: Callable[[], ContextManager] | None = None,
                  **options: Any) -> Iterator[str]:
    """One prompt's answer as it grows: yields the text so far after each decoded piece, then the final answer
    exactly as `generate_answers` returns it (stripped). `options`: those of `generate_answers`.

    Generation runs in a thread, inside `context()` when given (a lock, a LoRA adapter switched off): the thread
    leaves it when generation ends, even if the caller stops reading and never closes the iterator. It ends early
    when `stop` is set or when the caller closes the iterator."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    stop = stop or threading.Event()
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    criteria = StoppingCriteriaList([*(options.pop("stopping_criteria", None) or []), StopWhenSet(stop)])
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with context() if context is not None else nullcontext(), torch.no_grad():
                result["answer"] = generate_answers(model, processor, [prompt], [images], streamer=streamer,
                                                    stopping_criteria=criteria, **options)[0]
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = e
            streamer.end()  # the caller waits on the streamer: let it go

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    text, read_to_the_end = "", False
    try:
        for piece in streamer:
            text += piece
            yield text
        read_to_the_end = True
    finally:
        if not read_to_the_end:
            stop.set()  # the caller stopped reading (a closed iterator): stop generating
        thread.join()
    if "error" in result:
        raise result["error"]
    yield result["answer"]


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, limit: int | None, max_new_tokens: int
) -> list[list[int]]:
    """Batches of prompt indices, shortest prompts first, so that batches pad little and LongRoPE stays exact.

    LongRoPE picks its short or long factors from the longest sequence of the whole batch, so a
    short prompt batched with one past `limit` would be answered differently than alone. Prompts
    that stay within `limit` through the whole generation batch together, prompts already past it
    batch together, and the few that cross it while generating run alone.
    """

    def regime(length: int) -> int:
        return 0 if limit is None or length + max_new_tokens <= limit else 2 if length > limit else 1

    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        batch = batches[-1] if batches else []
        if batch and len(batch) < batch_size and regime(lengths[index]) == regime(lengths[batch[0]]) != 1:
            batch.append(index)
        else:
            batches.append([index])
    return batches


# ----------------------------------------------------------------------------- loading

def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`--dtype`: "auto" is bf16 on GPUs with native bf16 (Ampere and newer), fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if native_bf16(torch.device(device)) else torch.float16
    return torch.float32


def processor_source(model_name: str, adapter: str | None) -> str:
    """Where the processor of a model (or base + adapter) comes from: the adapter folder when a run saved
    one there (it holds the num_crops trained with), else the model."""
    if adapter is not None and (Path(adapter) / "preprocessor_config.json").is_file():
        return adapter
    return model_name


def apply_adapter(model: torch.nn.Module, adapter: str | Path, base_name: str, base_flag: str = "--model"):
    """`model` with the LoRA adapter applied, after checking that it fits.

    Layers of other shapes (an adapter trained on another base) are one ValueError naming both; an
    adapter recorded as trained on another base of the same shapes is applied with a warning.
    """
    from peft import PeftModel
    from safetensors import safe_open

    adapter = Path(adapter)
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    same = recorded is None or recorded == base_name or (
        Path(recorded).exists() and Path(base_name).exists() and Path(recorded).resolve() == Path(base_name).resolve())
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    problems = []
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.")
            module, _, leaf = name.rpartition(".lora_") if ".lora_" in name else (name, "", "")
            shape = tuple(f.get_slice(key).get_shape())
            target = shapes.get(f"{module}.weight") if leaf else shapes.get(name.replace(".base_layer.", "."))
            fits = target is not None and (target[-1] == shape[-1] if leaf.startswith("A.") else
                                           target[0] == shape[0] if leaf.startswith("B.") else target == shape)
            if not fits:
                problems.append(f"{name}: {list(shape)} in the adapter, "
                                f"{list(target) if target else 'no such layer'} in the model")
    if problems:
        raise ValueError(f"--adapter {adapter} does not fit {base_flag} {base_name} ({len(problems)} layer(s) differ, "
                         f"e.g. {problems[0]}): pass the base it was trained on")
    if not same:
        print(f"warning: the adapter {adapter} was trained on {recorded}, and is applied to {base_name}",
              file=sys.stderr)
    return PeftModel.from_pretrained(model, str(adapter))


def load_pretrained(model_name: str, adapter: str | None = None, *, dtype: str = "auto",
                    device: str | None = None, attn_implementation: str = "sdpa"):
    """The model (with the LoRA adapter applied when given), in eval mode on `device`, and its processor."""
    from .families import family_of

    if (Path(model_name) / "adapter_config.json").is_file() and not (Path(model_name) / "config.json").is_file():
        base = json.loads((Path(model_name) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ValueError(f"--model {model_name} is a LoRA adapter: pass --model {base or 'BASE_MODEL'} "
                         f"--adapter {model_name}")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter}: no adapter_config.json in it (is it a LoRA output folder?)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights_dtype = resolve_dtype(dtype, device)
    if attn_implementation == "flash_attention_2" and weights_dtype == torch.float32:
        print("notice: --attn_implementation flash_attention_2 runs bf16/fp16 only (flash-attn rejects fp32 "
              "weights): using sdpa with --dtype fp32", file=sys.stderr)
        attn_implementation = "sdpa"
    family = family_of(model_name, "--model")
    model = family.model_class().from_pretrained(model_name, dtype=weights_dtype,
                                             attn_implementation=attn_implementation, device_map={"": device})
    model = family.as_it_runs_on_images(model, model_name)
    if adapter is not None:
        model = apply_adapter(model, adapter, model_name)
    processor = family.load_processor(processor_source(model_name, adapter))
    use_chat_stop_tokens(model, processor)
    return model.eval(), processor


def add_model_flags(parser: argparse.ArgumentParser, adapter_help: str = "LoRA/QLoRA adapter folder to apply on "
                                                                          "--model.") -> None:
    """--model and --adapter, as the command lines that load a model for inference (`load_pretrained`) take them."""
    parser.add_argument("--model", required=True,
                        help="Hub id or local folder of the model (a fine-tuned --output_dir, a merged model, "
                             "or the base model of --adapter).")
    parser.add_argument("--adapter", default=None, help=adapter_help)


def add_hardware_flags(parser: argparse.ArgumentParser) -> None:
    """The "hardware" flags of `load_pretrained`: --dtype, --device, --attn_implementation."""
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="Weights precision (default auto: bf16 on GPUs that support it, else fp16; fp32 on CPU).")
    hw.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if available, else cpu).")
    hw.add_argument("--attn_implementation", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                    help="Attention kernel (default sdpa; flash_attention_2 falls back to sdpa without flash-attn, "
                         "before Ampere, or with fp32 weights).")


def try_command(output_dir: str, base_model: str | None, is_adapter: bool, example_image: str | None = None, *,
                num_crops: int | None = None, prompt: str = DEFAULT_PROMPT) -> str:
    """The `python -m phivision.generate` command that tries a model (printed at the end of a run or a merge).

    `output_dir` holds a full model, or a LoRA adapter of `base_model` when `is_adapter`. `num_crops`: the
    value the run trained with (the saved processor keeps the base's default).
    """
    if is_adapter and not base_model:
        raise ValueError("try_command: an adapter needs its base_model")
    parts = ["python", "-m", "phivision.generate"]
    parts += ["--model", base_model, "--adapter", output_dir] if is_adapter else ["--model", output_dir]
    parts += ["--image", example_image or "path/to/image.jpg", "--prompt", prompt]
    if num_crops is not None:
        parts += ["--num_crops", str(num_crops)]
    return shlex.join(parts)


def web_command(output_dir: str, base_model: str | None, is_adapter: bool, *, num_crops: int | None = None) -> str:
    """The `python -m phivision.web` command that opens a chat page on a model (printed beside `try_command`'s)."""
    if is_adapter and not base_model:
        raise ValueError("web_command: an adapter needs its base_model")
    parts = ["python", "-m", "phivision.web"]
    parts += ["--model", base_model, "--adapter", output_dir] if is_adapter else ["--model", output_dir]
    if num_crops is not None:
        parts += ["--num_crops", str(num_crops)]
    return shlex.join(parts)
