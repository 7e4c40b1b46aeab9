"""Writes tests/golden/phi4mm/*.json: outputs of transformers' own Phi-4-multimodal image processor and processor.

Run by hand (not by pytest) in a venv WITH torchvision, which transformers' classes need and ours must not:

    python3 -m venv /work/tv-venv
    /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/tv-venv/bin/pip install transformers==5.23.0 pillow numpy safetensors tokenizers
    /work/tv-venv/bin/python tests/golden/make_phi4mm_golden.py            # image processor goldens
    python -m phivision.tiny /tmp/tiny4 --family phi4mm                         # (main venv) the tiny checkpoint
    /work/tv-venv/bin/python tests/golden/make_phi4mm_golden.py --tiny /tmp/tiny4   # + processor goldens

Pixels are stored as per-crop sums and a fixed sample of values (the full tensors would be hundreds of MB);
ids, sizes, token counts and attention masks (zlib-packed bits) exactly. tests/test_phi4mm_processing.py
rebuilds the same images with `golden_image` (no randomness: integer patterns) and compares.
"""

from __future__ import annotations

import argparse
import base64
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OUT_DIR = Path(__file__).resolve().parent / "phi4mm"
CROP_LIMITS = [1, 4, 16, 36]
# (width, height, PIL mode): squares, both orientations, tiny, extreme strips, over every crop limit, RGBA and grey.
IMAGES = [
    (640, 480, "RGB"), (448, 448, "RGB"), (300, 700, "RGB"), (1000, 200, "RGB"), (50, 60, "RGB"), (1, 1, "RGB"),
    (2000, 1500, "RGB"), (4000, 300, "RGB"), (200, 3000, "RGB"), (4500, 3100, "RGB"), (333, 222, "RGBA"),
    (500, 900, "L"),
]
# Too extreme for a crop limit of 1 (the resized height would be 1 pixel): both processors refuse it.
EXTREME = (5000, 20, "RGB")
SAMPLES_PER_CROP = 16
PROMPTS = [
    ("<|user|><|image_1|>What is shown here?<|end|><|assistant|>", [0]),
    ("<|user|>Compare <|image_1|> and <|image_2|>, please.<|end|><|assistant|>", [2, 3]),
    ("<|user|>No image at all: hello world!<|end|><|assistant|>", []),
    ("<|system|>You are a helpful assistant.<|end|><|user|><|image_1|>\nDescribe the picture in one sentence."
     "<|end|><|assistant|>A small dog.<|end|><|endoftext|>", [6]),
]


def golden_image(width: int, height: int, mode: str) -> Image.Image:
    """A deterministic image with edges and gradients in every channel (integer arithmetic, no RNG)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    channels = [((x * 37 + y * 91 + c * 53 + (x * y % 7) * 19 + ((x // 16 + y // 16) % 2) * 100) % 256)
                for c in range(4)]
    pixels = np.stack(channels, axis=-1).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(pixels, "RGBA")
    image = Image.fromarray(pixels[..., :3], "RGB")
    return image.convert(mode) if mode != "RGB" else image


def image_name(spec: tuple[int, int, str]) -> str:
    return f"{spec[0]}x{spec[1]}_{spec[2]}"


def sample_positions(crop_numel: int) -> list[int]:
    """Fixed flat positions inside one crop [3, S, S] whose values are stored."""
    return [(k * 37589 + 11) % crop_numel for k in range(SAMPLES_PER_CROP)]


def pack_mask(mask: np.ndarray) -> str:
    """A 0/1 array as base64(zlib(packbits)): exact and small."""
    return base64.b64encode(zlib.compress(np.packbits(mask.astype(np.uint8).ravel()).tobytes(), 9)).decode()


def unpack_mask(text: str, shape: list[int]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape)


def summarize(outputs) -> dict:
    """The stored form of an image processor's outputs (see the module docstring)."""
    pixels = np.asarray(outputs["image_pixel_values"], dtype=np.float32)
    mask = np.asarray(outputs["image_attention_mask"])
    crop_numel = int(np.prod(pixels.shape[2:]))
    positions = sample_positions(crop_numel)
    flat = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    return {
        "pixel_shape": list(pixels.shape),
        "image_sizes": np.asarray(outputs["image_sizes"]).tolist(),
        "num_img_tokens": [int(t) for t in np.asarray(outputs["num_img_tokens"]).ravel()],
        "mask_shape": list(mask.shape),
        "mask": pack_mask(mask),
        "crop_sums": np.add.reduce(flat, axis=-1, dtype=np.float64).tolist(),  # no float64 copy of it all
        "samples": flat[:, :, positions].tolist(),
    }


def image_goldens() -> dict:
    import torch
    from transformers import Phi4MultimodalImageProcessor

    processor = Phi4MultimodalImageProcessor()
    images = [golden_image(*spec) for spec in IMAGES]
    cases = []
    for limit in CROP_LIMITS:
        outputs = processor(images, dynamic_hd=limit, return_tensors="pt")
        cases.append({"dynamic_hd": limit, **summarize(outputs)})
    errors = []
    for limit in CROP_LIMITS:
        try:
            processor([golden_image(*EXTREME)], dynamic_hd=limit)
            errors.append({"dynamic_hd": limit, "raises": False})
        except ValueError:
            errors.append({"dynamic_hd": limit, "raises": True})
    return {
        "transformers_class": type(processor).__name__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "images": [image_name(spec) for spec in IMAGES],
        "extreme_image": image_name(EXTREME),
        "cases": cases,
        "extreme": errors,
        "config": processor.to_dict(),
    }


def processor_goldens(tiny_dir: str) -> dict:
    from transformers import AutoProcessor
    import re

    processor = AutoProcessor.from_pretrained(tiny_dir)
    rows = []
    for prompt, image_indices in PROMPTS:
        images = [golden_image(*IMAGES[i]) for i in image_indices]
        # transformers' processor marks each image with one image token, which it expands.
        text = re.sub(r"<\|image_\d+\|>", processor.image_token, prompt)
        outputs = processor(text=text, images=images or None, return_tensors="pt")
        rows.append({
            "prompt": prompt, "images": image_indices, "input_ids": outputs["input_ids"][0].tolist(),
            "keys": sorted(outputs.keys()),
        })
    return {"processor_class": type(processor).__name__, "image_token": processor.image_token,
            "image_token_id": processor.image_token_id, "prompts": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", help="A tiny Phi-4-MM checkpoint (python -m phivision.tiny DIR --family phi4mm): "
                                       "also write the processor goldens, from transformers' AutoProcessor on it.")
    parser.add_argument("--skip_images", action="store_true", help="Keep the image goldens already written.")
    args = parser.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if not args.skip_images:
        (OUT_DIR / "image_processor.json").write_text(json.dumps(image_goldens()) + "\n")
    if args.tiny:
        (OUT_DIR / "processor.json").write_text(json.dumps(processor_goldens(args.tiny)) + "\n")
    for path in sorted(OUT_DIR.iterdir()):
        print(f"{path}: {path.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
