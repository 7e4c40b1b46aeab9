"""Image processor of Phi-3(.5)-vision: the HD transform, with PIL and torch only (no torchvision).

An image is resized (keeping its aspect ratio) so that it tiles into at most `num_crops` 336x336 crops,
padded with white to whole tiles, normalised with the CLIP statistics, and cut into crops. The model
gets a 336x336 global view first, then the crops in raster order, then zero crops up to `num_crops + 1`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ImagesKwargs

from ..images import model_image
from .remote_code import DEFAULT_REPO, IMAGE_PROCESSOR_AUTO_MAP, code_repo, with_repo

CROP_SIZE = 336
# Each 336 crop becomes 12x12 merged tokens; every row of 12 gets a separator, plus one global separator.
TOKENS_PER_CROP = 144
TOKENS_PER_ROW = 12

# Modes whose values do not fit 0..255; PIL's convert("RGB") would clip them to mostly white.


class Phi3VImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments that `from_pretrained(..., num_crops=16)` may override."""

    num_crops: int | None
    num_img_tokens: int | None


def _check_num_crops(num_crops: Any) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(
            f"num_crops must be an integer >= 1 (the most 336x336 crops per image, e.g. 4 or 16), got {num_crops!r}"
        )
    return num_crops


def _resized_size(width: int, height: int, num_crops: int) -> tuple[int, int, bool]:
    """Size (width, height) of the resized image before padding, in landscape, and whether it was transposed.

    Uses the same float arithmetic as the original processor so the sizes agree to the pixel.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_width = scale * CROP_SIZE
    # Very long strips would round to 0 rows (the original crashes there); keep one row instead.
    new_height = max(1, int(new_width / ratio))
    return new_width, new_height, transposed


def hd_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(H, W) of the padded HD image for an input of `width` x `height`: both multiples of 336."""
    new_width, new_height, transposed = _resized_size(width, height, _check_num_crops(num_crops))
    padded_height = math.ceil(new_height / CROP_SIZE) * CROP_SIZE
    return (new_width, padded_height) if transposed else (padded_height, new_width)


def _tokens_for_hd_size(padded_height: int, padded_width: int, num_img_tokens: int) -> int:
    h, w = padded_height // CROP_SIZE, padded_width // CROP_SIZE
    return (h * w + 1) * num_img_tokens + 1 + (h + 1) * TOKENS_PER_ROW


def num_image_tokens(width: int, height: int, num_crops: int, num_img_tokens: int = TOKENS_PER_CROP) -> int:
    """Number of placeholder tokens the model spends on an image of `width` x `height`."""
    return _tokens_for_hd_size(*hd_image_size(width, height, num_crops), num_img_tokens)


class Phi3VImageProcessor(BaseImageProcessor):
    """HD-transform image processor of Phi-3(.5)-vision (pixel-exact with the original remote code).

    Args:
        num_crops: most 336x336 crops per image (4 for multi-frame inputs, 16 for single images).
        num_img_tokens: tokens per crop (144 for CLIP ViT-L/14-336 with 2x2 merging).
        image_mean, image_std: normalisation statistics (CLIP's).
        do_convert_rgb: kept for the Hub config; images are always converted to RGB.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImageProcessorKwargs

    def __init__(
        self,
        num_crops: int = 1,
        num_img_tokens: int = TOKENS_PER_CROP,
        image_mean: list[float] | tuple[float, ...] = OPENAI_CLIP_MEAN,
        image_std: list[float] | tuple[float, ...] = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        **kwargs,
    ) -> None:
        kwargs.pop("image_processor_type", None)  # ours to write
        # Where the original code is, for readers without this package (see phivision.phi3v.remote_code); written back on save.
        self.auto_map = kwargs.pop("auto_map", None)
        super().__init__(**kwargs)
        self.num_crops = _check_num_crops(num_crops)
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb

    def hd_image_size(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """(H, W) of the padded HD image for an input of `width` x `height` (no pixels needed)."""
        return hd_image_size(width, height, self.num_crops if num_crops is None else num_crops)

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Placeholder tokens for an image of `width` x `height` (no pixels needed)."""
        return num_image_tokens(
            width, height, self.num_crops if num_crops is None else num_crops, self.num_img_tokens
        )

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """`num_image_tokens` at this processor's num_crops, under the original processor's name (vLLM calls it)."""
        return self.num_image_tokens(width, height)

    def _crops(self, image: Image.Image, num_crops: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """[num_crops + 1, 3, 336, 336] crops of one RGB image, and the (H, W) of its padded HD image."""
        new_width, new_height, transposed = _resized_size(image.width, image.height, num_crops)
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        padded_height = math.ceil(new_height / CROP_SIZE) * CROP_SIZE
        if padded_height != new_height:
            canvas = Image.new("RGB", (new_width, padded_height), (255, 255, 255))
            canvas.paste(image, (0, (padded_height - new_height) // 2))
            image = canvas
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)

        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        pixels = (pixels - mean) / std

        global_view = torch.nn.functional.interpolate(
            pixels[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False
        )
        _, height, width = pixels.shape
        h, w = height // CROP_SIZE, width // CROP_SIZE
        tiles = (
            pixels.reshape(3, h, CROP_SIZE, w, CROP_SIZE).permute(1, 3, 0, 2, 4).reshape(h * w, 3, CROP_SIZE, CROP_SIZE)
        )
        crops = torch.zeros(num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        crops[0] = global_view[0]
        crops[1 : 1 + h * w] = tiles
        return crops, (height, width)

    def preprocess(
        self,
        images: Any,
        num_crops: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """HD-transform one image or a list of images (PIL images, paths or numpy arrays), each turned upright
        by its EXIF orientation first.

        Returns a BatchFeature with `pixel_values` float32 [n, num_crops + 1, 3, 336, 336] (global view,
        crops in raster order, zero padding), `image_sizes` long [n, 2] ([H, W] of each padded HD image) and
        `num_img_tokens` (list of int). `return_tensors` "np" gives numpy arrays, anything else torch tensors.
        """
        num_crops = _check_num_crops(self.num_crops if num_crops is None else num_crops)
        if not isinstance(images, (list, tuple)):
            images = [images]
        crops, sizes = [], []
        for image in images:
            image_crops, size = self._crops(model_image(image), num_crops)
            crops.append(image_crops)
            sizes.append(size)
        if crops:
            pixel_values = torch.stack(crops)
        else:
            pixel_values = torch.zeros(0, num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        image_sizes = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
        tokens = [_tokens_for_hd_size(h, w, self.num_img_tokens) for h, w in sizes]
        data = {"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": tokens}
        if return_tensors == "np":
            data = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        return BatchFeature(data=data)

    @classmethod
    def get_image_processor_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict]:
        """The saved dict, with its `auto_map` naming the Hub repo it came from (see `phivision.phi3v.remote_code`)."""
        config, kwargs = super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)
        config["auto_map"] = with_repo(config.get("auto_map"), IMAGE_PROCESSOR_AUTO_MAP,
                                       code_repo(pretrained_model_name_or_path))
        return config, kwargs

    def to_dict(self) -> dict[str, Any]:
        """The Hub's preprocessor_config.json form (read by the original remote code as well), its `auto_map`
        naming the Hub repo of that code."""
        output = super().to_dict()
        output["auto_map"] = with_repo(self.auto_map, IMAGE_PROCESSOR_AUTO_MAP, DEFAULT_REPO)
        output["processor_class"] = "Phi3VProcessor"
        return output
