"""Image processor of Phi-4-multimodal, with PIL and torch only (no torchvision).

Gives the outputs of transformers' `Phi4MultimodalImageProcessor` (which needs torchvision, and PyPI's
torchvision does not import beside our torch): an image is resized, keeping its aspect ratio, onto a grid
of at most `dynamic_hd` 448x448 crops, padded with white to the whole grid, normalised to [-1, 1] and cut
into crops. The model gets a 448x448 global view first, then the crops in raster order, then zero crops up
to the batch's largest count. `image_attention_mask` marks, per crop, the 14x14 patches that hold image
rather than padding, and the image's token count follows from it.

torchvision's resize is reproduced operation by operation (`_resize`): on x86 with AVX2/AVX512 and on ARM
it resizes uint8 pixels with torch's own uint8 kernel, elsewhere in float32 rounded back to uint8.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from ..images import model_image

CROP_SIZE = 448
PATCH_SIZE = 14
DEFAULT_DYNAMIC_HD = 36
# The global view spends 16x16 merged patches, one separator per row of 16, and one separator after it.
GLOBAL_TOKENS = 256 + 16 + 1
# transformers' class refuses resized images with a side under this many pixels.
MIN_RESIZED_SIDE = 10
# PIL's BICUBIC, the global view's resampling, as transformers' class saves it.
RESAMPLE_BICUBIC = 3
# The class name transformers' AutoImageProcessor reads in preprocessor_config.json.
NATIVE_CLASS = "Phi4MultimodalImageProcessor"


def speech_settings() -> dict[str, Any]:
    """The speech feature extractor's settings (transformers' defaults). Native checkpoints keep them in the
    same preprocessor_config.json as the image settings; speech is not ours to process, but they are saved back
    so that transformers' AutoProcessor reads the folder."""
    from transformers import Phi4MultimodalFeatureExtractor

    settings = Phi4MultimodalFeatureExtractor().to_dict()
    settings.pop("mel_filters", None)  # computed from the others; transformers does not save it either
    return settings


class Phi4MMImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments that `from_pretrained(..., dynamic_hd=16)` may override."""

    dynamic_hd: int
    patch_size: int


def _check_max_crops(value: Any, name: str = "num_crops") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be an integer >= 1 (Phi-4-MM's most 448x448 crops per image, e.g. 16 or 36), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class CropLayout:
    """Where an image of a given size goes: a grid of `cols` x `rows` crops of `crop_size`, the image resized
    to `new_width` x `new_height` at its top left, white padding of `pad_width` / `pad_height` pixels."""

    cols: int
    rows: int
    new_width: int
    new_height: int
    pad_width: int
    pad_height: int
    crop_size: int

    @property
    def height(self) -> int:
        return self.rows * self.crop_size

    @property
    def width(self) -> int:
        return self.cols * self.crop_size


@lru_cache(maxsize=None)
def _grids(max_crops: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) of every grid of at most `max_crops` crops, fewest crops first, in transformers' order (which
    decides exact ties); cached, as token counting runs over whole datasets."""
    grids = {(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if i * j <= max_crops}
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def _closest_grid(width: int, height: int, max_crops: int, crop_size: int) -> tuple[int, int]:
    """(cols, rows) among grids of at most `max_crops` crops whose aspect ratio is nearest the image's;
    on a tie the larger grid wins when the image covers more than half of it (transformers' rule)."""
    aspect_ratio = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _grids(max_crops):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * crop_size * crop_size * cols * rows:
            best = (cols, rows)
    return best


def crop_layout(width: int, height: int, max_crops: int, crop_size: int = CROP_SIZE) -> CropLayout:
    """The crop grid, resized size and padding of a `width` x `height` image (no pixels needed).

    An image that fits `max_crops` crops at its own scale keeps the grid that covers it (and is scaled up to
    fill it); a larger one gets the grid of the nearest aspect ratio. Raises ValueError for sizes the model
    cannot take (a side of 0, or an aspect ratio so extreme that a resized side is under 10 pixels).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    cols, rows = math.ceil(width / crop_size), math.ceil(height / crop_size)
    if cols * rows > max_crops:
        cols, rows = _closest_grid(width, height, max_crops, crop_size)
    target_width, target_height = crop_size * cols, crop_size * rows
    # The same float arithmetic as transformers' class, so sizes agree to the pixel.
    ratio_width, ratio_height = target_width / width, target_height / height
    if ratio_width < ratio_height:
        new_width, new_height = target_width, int(height * ratio_width)
    else:
        new_width, new_height = int(width * ratio_height), target_height
    if min(new_width, new_height) < MIN_RESIZED_SIDE:
        raise ValueError(
            f"image of {width}x{height} has too extreme an aspect ratio for Phi-4-MM: it would be resized to "
            f"{new_width}x{new_height} (a side under {MIN_RESIZED_SIDE} pixels)"
        )
    return CropLayout(cols, rows, new_width, new_height, target_width - new_width, target_height - new_height,
                      crop_size)


def _masked_patches(padding: int, patch_size: int) -> int:
    """Patches at the right (bottom) edge that the attention mask zeroes for `padding` pixels of padding."""
    return padding // patch_size if padding >= patch_size else 0


def _merged_count(total: int, masked: int, mask_size: int) -> int:
    """Merged (2x2) patches along one side that hold image: every other patch of each crop, from its first,
    among the first `total - masked` patches."""
    valid = total - masked
    return sum(1 for start in range(0, total, mask_size) for p in range(0, mask_size, 2) if start + p < valid)


def layout_tokens(layout: CropLayout, patch_size: int = PATCH_SIZE) -> int:
    """Image tokens of an image laid out as `layout`: the global view's, plus the crops' merged patches that
    hold image, plus one separator per such row of them."""
    mask_size = layout.crop_size // patch_size
    merged_rows = _merged_count(layout.rows * mask_size, _masked_patches(layout.pad_height, patch_size), mask_size)
    merged_cols = _merged_count(layout.cols * mask_size, _masked_patches(layout.pad_width, patch_size), mask_size)
    return GLOBAL_TOKENS + merged_rows * merged_cols + (merged_rows if merged_cols else 0)


def _attention_mask(layout: CropLayout, patch_size: int) -> torch.Tensor:
    """[rows * mask, cols * mask] float mask: 1 on patches of image, 0 on patches of padding."""
    mask_size = layout.crop_size // patch_size
    mask = torch.ones(layout.rows * mask_size, layout.cols * mask_size)
    masked_cols = _masked_patches(layout.pad_width, patch_size)
    masked_rows = _masked_patches(layout.pad_height, patch_size)
    if masked_cols:
        mask[:, -masked_cols:] = 0
    if masked_rows:
        mask[-masked_rows:, :] = 0
    return mask


def _native_uint8_bilinear() -> bool:
    """Whether torchvision resizes uint8 images bilinearly without converting them to float on this CPU."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _resize(image: torch.Tensor, height: int, width: int, mode: str, antialias: bool) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize of a [C, H, W] uint8 or float32 tensor (bilinear or bicubic).

    torchvision keeps uint8 for bilinear resizing on CPUs with a native uint8 kernel, and otherwise resizes in
    float32, rounds and casts back; the two differ by one level on some pixels, hence the same choice here.
    """
    channels, old_height, old_width = image.shape
    if (height, width) == (old_height, old_width):
        return image
    native = image.dtype == torch.float32 or (mode == "bilinear" and _native_uint8_bilinear())
    batch = image.reshape(1, channels, old_height, old_width)
    if batch.is_contiguous(memory_format=torch.channels_last) and batch.numel() != batch.stride()[0]:
        # torchvision's restriding, which makes interpolate keep channels_last (the uint8 kernel's choice of path).
        strides = list(batch.stride())
        strides[0] = batch.numel()
        batch = batch.as_strided(batch.shape, strides)
    resized = torch.nn.functional.interpolate(
        batch if native else batch.to(torch.float32), size=[height, width], mode=mode, align_corners=False,
        antialias=antialias,
    )
    if not native:
        if mode == "bicubic":
            resized = resized.clamp_(0, 255)
        resized = resized.round_().to(image.dtype)
    return resized.reshape(channels, height, width)


class Phi4MMImageProcessor(BaseImageProcessor):
    """Dynamic-HD image processor of Phi-4-multimodal (the outputs of transformers' own class, without torchvision).

    Args:
        dynamic_hd: most 448x448 crops per image (36 in the released model).
        size: crop size, {"height": 448, "width": 448} (square).
        patch_size: the vision encoder's patch (14); the attention mask has one entry per patch.
        image_mean, image_std: normalisation statistics ([0.5] * 3: pixels go to [-1, 1]).
        rescale_factor: 1/255 (pixels to [0, 1] before normalising).
        Other keys of transformers' preprocessor_config.json are kept and written back.
    """

    model_input_names = ["image_pixel_values", "image_sizes", "image_attention_mask"]
    valid_kwargs = Phi4MMImageProcessorKwargs

    def __init__(
        self,
        dynamic_hd: int = DEFAULT_DYNAMIC_HD,
        size: dict[str, int] | None = None,
        patch_size: int = PATCH_SIZE,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        do_convert_rgb: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        resample: int = RESAMPLE_BICUBIC,
        **kwargs,
    ) -> None:
        kwargs.pop("image_processor_type", None)  # ours to write
        # A native preprocessor_config.json holds the speech settings too: they are not this processor's.
        speech = speech_settings()
        kwargs = {key: value for key, value in kwargs.items() if key not in speech}
        super().__init__(**kwargs)
        self.dynamic_hd = _check_max_crops(dynamic_hd, "dynamic_hd")
        self.size = dict(size or {"height": CROP_SIZE, "width": CROP_SIZE})
        if self.size.get("height") != self.size.get("width") or not self.size.get("height"):
            raise ValueError(f"size must be square, {{'height': N, 'width': N}}, got {self.size}")
        self.patch_size = patch_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.rescale_factor = rescale_factor
        self.do_convert_rgb = do_convert_rgb
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self.resample = resample

    @property
    def crop_size(self) -> int:
        return self.size["height"]

    @property
    def num_crops(self) -> int:
        """The crop limit under the name the library uses for both families (Phi-3-V's `num_crops`): `dynamic_hd`."""
        return self.dynamic_hd

    @num_crops.setter
    def num_crops(self, value: int) -> None:
        self.dynamic_hd = _check_max_crops(value)

    def hd_image_size(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """(H, W) of the padded image (whole crops) for an input of `width` x `height` (no pixels needed)."""
        layout = self.crop_layout(width, height, num_crops)
        return layout.height, layout.width

    def _max_crops(self, num_crops: int | None) -> int:
        return _check_max_crops(self.dynamic_hd if num_crops is None else num_crops)

    def crop_layout(self, width: int, height: int, num_crops: int | None = None) -> CropLayout:
        """Crop grid, resized size and padding of a `width` x `height` image at crop limit `num_crops`
        (None: `dynamic_hd`)."""
        return crop_layout(width, height, self._max_crops(num_crops), self.crop_size)

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Image tokens the model spends on a `width` x `height` image (no pixels needed)."""
        return layout_tokens(self.crop_layout(width, height, num_crops), self.patch_size)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> float32, rescaled and normalised in one step as transformers does it."""
        scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
        mean = torch.tensor(self.image_mean) * scale if self.do_normalize else torch.zeros(3)
        std = torch.tensor(self.image_std) * scale if self.do_normalize else torch.full((3,), scale)
        return pixels.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))

    def _crops(self, image: Image.Image, max_crops: int) -> tuple[torch.Tensor, torch.Tensor, CropLayout]:
        """[1 + crops, 3, S, S] pixels (global view first), [1 + crops, S/p, S/p] mask and the layout of one image."""
        layout = crop_layout(image.width, image.height, max_crops, self.crop_size)
        size, mask_size = self.crop_size, self.crop_size // self.patch_size
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        pixels = _resize(pixels, layout.new_height, layout.new_width, "bilinear", antialias=True)
        pixels = torch.nn.functional.pad(pixels, [0, layout.pad_width, 0, layout.pad_height], value=255.0)
        pixels = self._normalize(pixels)
        global_view = _resize(pixels, size, size, "bicubic", antialias=False)
        tiles = (pixels.reshape(3, layout.rows, size, layout.cols, size).permute(1, 3, 0, 2, 4)
                 .reshape(-1, 3, size, size))
        crops = torch.cat([global_view[None], tiles])
        return crops, self.crop_masks(layout), layout

    def crop_masks(self, layout: CropLayout) -> torch.Tensor:
        """[1 + crops, S/p, S/p] patch attention mask of an image laid out as `layout`: the global view's (all
        image), then each crop's (0 on patches of padding)."""
        mask_size = self.crop_size // self.patch_size
        mask = _attention_mask(layout, self.patch_size)
        tile_masks = (mask.reshape(layout.rows, mask_size, layout.cols, mask_size).transpose(1, 2)
                      .reshape(-1, mask_size, mask_size))
        return torch.cat([torch.ones(1, mask_size, mask_size), tile_masks])

    def preprocess(
        self,
        images: Any,
        num_crops: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Crop one image or a list of images (PIL images, paths or numpy arrays), each turned upright by its
        EXIF orientation first.

        Args:
            images: an image or a list of images.
            num_crops: the crop limit (`dynamic_hd`); None: this processor's.
            return_tensors: "pt" (default) or None for torch tensors, "np" for numpy arrays.

        Returns:
            BatchFeature with `image_pixel_values` float32 [n, max_crops, 3, 448, 448] (global view, crops in
            raster order, zero crops up to the batch's largest count), `image_sizes` long [n, 2] ([H, W] of each
            padded image), `image_attention_mask` float32 [n, max_crops, 32, 32] (ones on padding crops, as
            transformers) and `num_img_tokens` (list of int).
        """
        max_crops = self._max_crops(num_crops)
        if not isinstance(images, (list, tuple)):
            images = [images]
        size, mask_size = self.crop_size, self.crop_size // self.patch_size
        crops, masks, sizes, tokens = [], [], [], []
        for image in images:
            image_crops, image_masks, layout = self._crops(model_image(image), max_crops)
            crops.append(image_crops)
            masks.append(image_masks)
            sizes.append([layout.height, layout.width])
            tokens.append(layout_tokens(layout, self.patch_size))
        data = {
            "image_pixel_values": pad_crops(crops, fill=0.0, empty_shape=(3, size, size)),
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
            "image_attention_mask": pad_crops(masks, fill=1.0, empty_shape=(mask_size, mask_size)),
            "num_img_tokens": tokens,
        }
        if return_tensors == "np":
            data = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        return BatchFeature(data=data)

    def to_dict(self) -> dict[str, Any]:
        """preprocessor_config.json in the form transformers' `Phi4MultimodalImageProcessor` reads."""
        output = super().to_dict()
        output["image_processor_type"] = NATIVE_CLASS
        return output


def pad_crops(per_image: list[torch.Tensor], fill: float, empty_shape: tuple[int, ...]) -> torch.Tensor:
    """Stack per-image [crops_i, ...] tensors into [n, max crops_i, ...], padding with `fill` (transformers pads
    pixels with zeros and masks with ones)."""
    if not per_image:
        return torch.zeros(0, 1, *empty_shape)
    most = max(t.shape[0] for t in per_image)
    return torch.stack([
        torch.cat([t, t.new_full((most - t.shape[0], *t.shape[1:]), fill)]) if t.shape[0] < most else t
        for t in per_image
    ])
