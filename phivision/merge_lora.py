"""Merge a LoRA or QLoRA adapter into its base model: a full checkpoint in the Hub layout.

    python -m phivision.merge_lora --base microsoft/Phi-3.5-vision-instruct --adapter OUTPUT_DIR --out MERGED_DIR \\
        [--dtype bf16|fp16|fp32] [--max_shard_size 5GB] [--remote_code_repo REPO]

The base is loaded in `--dtype` (bf16 by default), never in 4 bits, also for adapters trained with
QLoRA: their LoRA weights are added to the original bf16/fp16 weights (peft's `merge_and_unload`),
which is what a runtime without bitsandbytes needs. The output holds exactly the base's parameter names
and shapes (checked before writing: no `base_layer`, no `lora_` keys; `lm_head` merged too when it was
a target) as `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json` (one
`model.safetensors` when it fits in one shard), the Hub `config.json` (`architectures`
["Phi3VForCausalLM"]), `generation_config.json` (stopping on `<|end|>` / `<|endoftext|>`), and the processor
(tokenizer, preprocessor config) of the adapter folder when it has one, else of the base, written by
`Phi3VProcessor`. No code is copied: every `auto_map` entry names the Hub repo of the original code
(`phivision.phi3v.remote_code`), so vLLM and transformers 4.x load the folder with `trust_remote_code`.
A Phi-4-multimodal output is transformers-native, its `config.json` in the Hub's form
(`phivision.phi4mm.config_file`): vLLM serves it as it is (README "Serve it").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .data.hub import missing_local_folder
from .errors import SetupError
from .families import family_of
from .files import cannot_write_in, tree_follows_umask
from .generation import DTYPES, apply_adapter, processor_source, try_command, use_chat_stop_tokens, web_command
from .phi3v.remote_code import set_code_repo


def state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `save_pretrained` writes (parameters and persistent buffers; a weight tied to
    another, such as Phi-4-MM's lm_head, is written once, under its source's name)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied}


def checkpoint_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a saved checkpoint (one safetensors file, or the shards of its index)."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    shapes = {}
    for name in files:
        with safe_open(directory / name, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def shape_differences(expected: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between two name -> shape maps, as readable lines (empty when they are equal)."""
    problems = [f"missing: {k}" for k in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {k}" for k in sorted(actual.keys() - expected.keys())]
    problems += [f"shape of {k}: {actual[k]} instead of {expected[k]}"
                 for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]]
    return problems


def merge_adapter(peft_model, expected: dict[str, tuple[int, ...]], safe_merge: bool = True) -> torch.nn.Module:
    """`merge_and_unload` the adapter and check the result has exactly the `expected` names and shapes.

    `expected` is `state_shapes(base)` taken before the adapter was applied. `safe_merge` checks the
    merged weights for NaN/inf (needs real tensors: pass False on the meta device).
    """
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    problems = shape_differences(expected, state_shapes(merged))
    if problems:
        raise RuntimeError("the merged model's parameters differ from the base's:\n  " + "\n  ".join(problems[:20]))
    return merged


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's adapter_config.json (an error naming the folder when it is missing)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--adapter {adapter_dir}: no adapter_config.json in it (is it a LoRA output folder?)")
    return json.loads(path.read_text())


def merge_lora(base: str, adapter: str, out: str, dtype: str = "bf16", max_shard_size: str = "5GB",
               remote_code_repo: str | None = None) -> Path:
    """Merges `adapter` into `base` and writes the full checkpoint to `out`; returns `out`.

    `remote_code_repo`: the Hub repo whose code the written auto_map entries name (default: the one the base
    and the processor were loaded from, see `phivision.phi3v.remote_code.code_repo`).
    """
    # Everything that needs no model is checked first: a merge takes minutes at full size.
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out {out}: must be a new or empty folder (it is not: nothing was written)")
    if problem := cannot_write_in(out_dir):
        raise PermissionError(f"--out {out}: cannot write there ({problem})")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    shard_size(max_shard_size)
    read_adapter_config(adapter)
    if missing_local_folder(base):
        raise FileNotFoundError(f"--base {base}: no such folder")

    family = family_of(base, "--base")
    model = family.model_class().from_pretrained(base, dtype=DTYPES[dtype])
    model = family.as_it_runs_on_images(model, base)
    expected = state_shapes(model)
    merged = merge_adapter(apply_adapter(model, adapter, base, "--base"), expected)

    processor = family.load_processor(processor_source(base, adapter))
    if remote_code_repo:
        set_code_repo(remote_code_repo, merged.config, processor.image_processor)
    use_chat_stop_tokens(merged, processor)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
        family.finish_saved_model(out_dir)
        processor.save_pretrained(out_dir)
        tree_follows_umask(out_dir)
        problems = shape_differences(expected, checkpoint_shapes(out_dir))
        if problems:
            raise RuntimeError(f"{out_dir}: the written checkpoint differs from the base:\n  "
                               + "\n  ".join(problems[:20]))
    except BaseException:  # a half-written --out would refuse the next try: it was new or empty, so it is again
        for path in out_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if created:
            out_dir.rmdir()
        raise
    return out_dir


def shard_size(value: str) -> int:
    """--max_shard_size in bytes ("5GB", "500MB", "1.5GB"), read as `save_pretrained` will read it."""
    from huggingface_hub.serialization._base import parse_size_to_int  # what save_pretrained's sharding calls

    try:
        size = parse_size_to_int(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"--max_shard_size {value}: expected a positive size in TB, GB, MB or KB, e.g. 5GB or 500MB")
    return size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phivision.merge_lora",
        description="Merge a LoRA/QLoRA adapter into its base and write a full checkpoint in the Hub layout.",
    )
    parser.add_argument("--base", default=None,
                        help="Hub id or local folder of the base model (default: base_model_name_or_path "
                             "recorded in the adapter's adapter_config.json).")
    parser.add_argument("--adapter", required=True,
                        help="Folder with adapter_config.json and adapter_model.safetensors (a LoRA/QLoRA run's "
                             "--output_dir or one of its checkpoint-N folders).")
    parser.add_argument("--out", required=True, help="Folder to write the merged checkpoint to (new or empty).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="Precision of the base while merging and of the written weights (default bf16, the "
                             "Hub checkpoint's; QLoRA adapters too are merged into this, not into 4-bit weights).")
    parser.add_argument("--max_shard_size", default="5GB",
                        help='Largest safetensors shard, e.g. "5GB" (default) or "500MB".')
    parser.add_argument("--remote_code_repo", default=None,
                        help="Hub repo of the original code that config.json and the processor files name in their "
                             "auto_map, for vLLM and trust_remote_code readers (default: the repo the base came from; "
                             "microsoft/Phi-3.5-vision-instruct for a local copy).")
    args = parser.parse_args(argv)
    try:
        base = args.base or read_adapter_config(args.adapter).get("base_model_name_or_path")
        if not base:
            parser.error(f"--adapter {args.adapter}: its adapter_config.json names no base model; pass --base")
        print(f"Merging {args.adapter} into {base} ({args.dtype}) ...", file=sys.stderr)
        out = merge_lora(base, args.adapter, args.out, args.dtype, args.max_shard_size, args.remote_code_repo)
    except (OSError, ValueError, SetupError) as e:  # missing or bad files and folders, a base that cannot be found
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote the merged model to {out}. Try it with:\n  {try_command(str(out), None, is_adapter=False)}\n"
          f"  {web_command(str(out), None, is_adapter=False)}    # chat in a browser (pip install gradio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
