"""Phi-4-multimodal's image processor and processor against transformers' own (goldens from
tests/golden/make_phi4mm_golden.py, made in a venv with torchvision), plus what ours adds."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phi3v.phi4mm import image_processing as image_module
from phi3v.phi4mm.image_processing import Phi4MMImageProcessor

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_phi4mm_golden", GOLDEN_DIR / "make_phi4mm_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


@pytest.fixture(scope="module")
def image_golden() -> dict:
    return json.loads((GOLDEN_DIR / "phi4mm" / "image_processor.json").read_text())


@pytest.fixture(scope="module")
def golden_images() -> list:
    return [make_golden.golden_image(*spec) for spec in make_golden.IMAGES]


def _same_uint8_resize_path(golden: dict) -> bool:
    """Whether this CPU resizes uint8 images the way the goldens' CPU did (native uint8 kernel or float)."""
    native = ("AVX2", "AVX512")
    return (golden["cpu_capability"] in native) == image_module._native_uint8_bilinear()


@pytest.mark.parametrize("case_index", range(len(make_golden.CROP_LIMITS)))
def test_image_outputs_equal_transformers(image_golden, golden_images, case_index):
    case = image_golden["cases"][case_index]
    ours = Phi4MMImageProcessor().preprocess(golden_images, num_crops=case["dynamic_hd"])
    mine = make_golden.summarize(ours)
    assert image_golden["images"] == [make_golden.image_name(s) for s in make_golden.IMAGES]
    for key in ("pixel_shape", "image_sizes", "num_img_tokens", "mask_shape"):
        assert mine[key] == case[key], key
    np.testing.assert_array_equal(
        make_golden.unpack_mask(mine["mask"], mine["mask_shape"]), make_golden.unpack_mask(case["mask"], case["mask_shape"])
    )
    assert ours["image_attention_mask"].dtype == torch.float32 and ours["image_sizes"].dtype == torch.long
    if _same_uint8_resize_path(image_golden):
        # One uint8 level is 2/255 after normalisation: a sum within 1e-3 means every pixel level agrees.
        np.testing.assert_allclose(mine["crop_sums"], case["crop_sums"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(mine["samples"], case["samples"], rtol=0, atol=1e-5)
    else:  # the other uint8 path rounds some pixels one level apart
        np.testing.assert_allclose(mine["samples"], case["samples"], rtol=0, atol=2 / 255 + 1e-5)


def test_extreme_aspect_ratio_refused_where_transformers_refuses(image_golden):
    image = make_golden.golden_image(*make_golden.EXTREME)
    for row in image_golden["extreme"]:
        if row["raises"]:
            with pytest.raises(ValueError, match="too extreme an aspect ratio"):
                Phi4MMImageProcessor().preprocess(image, num_crops=row["dynamic_hd"])
        else:
            Phi4MMImageProcessor().preprocess(image, num_crops=row["dynamic_hd"])
    assert any(row["raises"] for row in image_golden["extreme"])


def test_num_image_tokens_from_size_equals_preprocess():
    processor = Phi4MMImageProcessor()
    sizes = [(1, 1), (13, 900), (447, 449), (448, 448), (449, 448), (896, 448), (897, 1), (1000, 10), (640, 480),
             (1920, 1080), (3000, 2000), (4500, 3100), (8000, 50), (50, 8000), (2, 30), (700, 300)]
    for limit in (1, 2, 4, 9, 16, 36):
        for width, height in sizes:
            try:
                counted = processor.num_image_tokens(width, height, num_crops=limit)
            except ValueError:
                with pytest.raises(ValueError):
                    processor.preprocess(np.zeros((height, width, 3), np.uint8), num_crops=limit)
                continue
            layout = processor.crop_layout(width, height, limit)
            # Only the layout matters to the count: a blank image of that size is enough.
            done = processor.preprocess(np.zeros((height, width, 3), np.uint8), num_crops=limit)
            assert done["num_img_tokens"] == [counted], (width, height, limit)
            assert done["image_sizes"].tolist() == [[layout.height, layout.width]]
            # The count is what transformers derives from the attention mask (merged patches + row separators).
            mask = done["image_attention_mask"][0, 1:]
            merged = mask[:, 0::2, 0::2].reshape(layout.rows, layout.cols, 16, 16).transpose(1, 2)
            merged = merged.reshape(layout.rows * 16, layout.cols * 16)
            assert counted == 256 + 1 + int(merged.sum()) + int(merged[:, 0].sum()) + 16


def test_num_crops_defaults_to_dynamic_hd_and_is_checked():
    processor = Phi4MMImageProcessor(dynamic_hd=4)
    assert processor.num_image_tokens(3000, 2000) == processor.num_image_tokens(3000, 2000, num_crops=4)
    assert processor.num_image_tokens(3000, 2000) != processor.num_image_tokens(3000, 2000, num_crops=36)
    with pytest.raises(ValueError, match="num_crops must be an integer >= 1"):
        processor.num_image_tokens(10, 10, num_crops=0)


def test_no_images_gives_empty_batch():
    out = Phi4MMImageProcessor().preprocess([])
    assert out["image_pixel_values"].shape == (0, 1, 3, 448, 448)
    assert out["image_attention_mask"].shape == (0, 1, 32, 32)
    assert out["image_sizes"].shape == (0, 2) and out["num_img_tokens"] == []


def test_resize_matches_float_path_where_uint8_kernel_is_not_used(monkeypatch):
    """Without a native uint8 kernel torchvision resizes in float32 and rounds; so must we."""
    image = torch.from_numpy(np.asarray(make_golden.golden_image(300, 200, "RGB"))).permute(2, 0, 1).contiguous()
    monkeypatch.setattr(image_module, "_native_uint8_bilinear", lambda: False)
    resized = image_module._resize(image, 150, 333, "bilinear", antialias=True)
    expected = torch.nn.functional.interpolate(image[None].float(), size=[150, 333], mode="bilinear",
                                               align_corners=False, antialias=True).round()[0].to(torch.uint8)
    assert resized.dtype == torch.uint8
    assert torch.equal(resized, expected)


def test_config_round_trip_in_transformers_layout(tmp_path, image_golden):
    processor = Phi4MMImageProcessor(dynamic_hd=16)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    expected = dict(image_golden["config"], dynamic_hd=16)
    assert {k: saved[k] for k in expected} == expected  # every key transformers' class writes, at its values
    loaded = Phi4MMImageProcessor.from_pretrained(tmp_path)
    assert loaded.dynamic_hd == 16 and loaded.size == {"height": 448, "width": 448}
    assert Phi4MMImageProcessor.from_pretrained(tmp_path, dynamic_hd=4).dynamic_hd == 4
