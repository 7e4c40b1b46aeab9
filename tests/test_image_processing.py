import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from phivision.images import to_rgb
from phivision.phi3v.image_processing import Phi3VImageProcessor, hd_image_size, num_image_tokens


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "num_crops, width, height, tokens",
    [
        (1, 640, 480, 313),
        (1, 100, 1000, 313),
        (1, 3000, 20, 313),
        (4, 500, 500, 757),
        (4, 336, 336, 757),
        (16, 336, 336, 2509),
        (16, 1024, 768, 1921),
        (16, 768, 1024, 1933),
        (16, 1920, 1080, 2353),
    ],
)
def test_token_counts(num_crops, width, height, tokens):
    assert num_image_tokens(width, height, num_crops) == tokens
    processor = Phi3VImageProcessor(num_crops=num_crops)
    assert processor.num_image_tokens(width, height) == tokens
    out = processor(_image(width, height), return_tensors="pt")
    assert out["num_img_tokens"] == [tokens]
    assert tuple(out["image_sizes"][0].tolist()) == processor.hd_image_size(width, height)


def test_golden_token_table(golden):
    rows = golden["num_img_tokens_table"]
    assert len(rows) == 39
    processor = Phi3VImageProcessor()
    mismatches = []
    for row in rows:
        width, height, num_crops = row["width"], row["height"], row["num_crops"]
        out = processor(Image.new("RGB", (width, height), (40, 80, 120)), num_crops=num_crops)
        got = (
            out["num_img_tokens"][0],
            num_image_tokens(width, height, num_crops),
            out["image_sizes"][0].tolist(),
            list(hd_image_size(width, height, num_crops)),
            list(out["pixel_values"].shape),
        )
        expected = (row["num_img_tokens"], row["num_img_tokens"], row["image_size_hw"], row["image_size_hw"])
        if got != expected + (row["pixel_values_shape"],):
            mismatches.append((row, got))
    assert mismatches == []


def test_golden_pixel_values(reference_dir):
    golden_dir = reference_dir / "golden"
    expected = torch.from_numpy(np.load(golden_dir / "single_nc4_pixel_values.npz")["pixel_values"])
    out = Phi3VImageProcessor(num_crops=4)(Image.open(golden_dir / "img_640x480.png"))
    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == expected.shape == (1, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[672, 672]]
    # The crops come from PIL resize + normalisation: bit-exact. The global view goes through torch's bicubic
    # interpolation, bit-exact here too, but a different CPU kernel could move the last bits.
    assert torch.equal(pixel_values[:, 1:], expected[:, 1:])
    assert (pixel_values[:, 0] - expected[:, 0]).abs().max().item() <= 1e-5


def test_crop_layout_and_zero_padding():
    processor = Phi3VImageProcessor(num_crops=16)
    out = processor(_image(640, 480))  # -> 1008 x 1344: 3 x 4 crops + global, 4 zero slots
    assert out["image_sizes"].tolist() == [[1008, 1344]]
    pixel_values = out["pixel_values"][0]
    assert pixel_values.shape == (17, 3, 336, 336)
    assert all(pixel_values[i].abs().sum() > 0 for i in range(13))
    assert torch.count_nonzero(pixel_values[13:]) == 0


def test_raster_order_and_white_padding():
    # A 672 x 336 landscape image at num_crops 2 tiles into two crops left to right with no padding;
    # a 336 x 200 image pads its height with white, centred.
    left, right = Image.new("RGB", (336, 336), (255, 0, 0)), Image.new("RGB", (336, 336), (0, 0, 255))
    image = Image.new("RGB", (672, 336))
    image.paste(left, (0, 0))
    image.paste(right, (336, 0))
    processor = Phi3VImageProcessor(num_crops=2)
    crops = processor(image)["pixel_values"][0]
    single = processor([left, right], num_crops=1)["pixel_values"]
    torch.testing.assert_close(crops[1], single[0, 1])
    torch.testing.assert_close(crops[2], single[1, 1])

    padded = Phi3VImageProcessor(num_crops=1)(Image.new("RGB", (336, 200), (0, 0, 0)))["pixel_values"][0, 1]
    white = (1 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    torch.testing.assert_close(padded[:, 0, 0], white)  # top band: floor(136 / 2) = 68 rows
    torch.testing.assert_close(padded[:, 67, 10], white)
    assert padded[0, 68, 10] < 0 and padded[0, 267, 10] < 0  # the image
    torch.testing.assert_close(padded[:, 268, 10], white)  # bottom band: 68 rows


def test_portrait_is_transposed():
    processor = Phi3VImageProcessor(num_crops=16)
    out = processor([_image(300, 500), _image(500, 300)])
    assert out["image_sizes"].tolist() == [[1680, 1008], [1008, 1680]]
    assert out["num_img_tokens"] == [2377, 2353]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "I", "F", "1"])
def test_modes_convert_to_rgb(mode):
    base = _image(64, 48)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255)
    elif mode == "I":
        image = base.convert("L").convert("I")
    else:
        image = base.convert(mode)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    if mode in ("I;16", "I", "F"):  # wide greyscale scaled to 8 bits, not clipped to white
        assert np.abs(np.asarray(rgb)[..., 0].astype(int) - np.asarray(base.convert("L"))).max() <= 1
    out = Phi3VImageProcessor(num_crops=4)(image)
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)


def test_transparency_is_composited_on_white():
    rgb = _image(64, 48)
    opaque = rgb.convert("RGBA")
    processor = Phi3VImageProcessor(num_crops=4)
    assert torch.equal(processor(opaque)["pixel_values"], processor(rgb)["pixel_values"])
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((3, 3)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (8, 8), (0, 0))).getpixel((3, 3)) == (255, 255, 255)


def test_numpy_and_path_inputs(tmp_path):
    image = _image(100, 80)
    image.save(tmp_path / "x.png")
    processor = Phi3VImageProcessor(num_crops=4)
    expected = processor(image)["pixel_values"]
    assert torch.equal(processor(np.asarray(image))["pixel_values"], expected)
    assert torch.equal(processor(str(tmp_path / "x.png"))["pixel_values"], expected)
    assert isinstance(processor(image, return_tensors="np")["pixel_values"], np.ndarray)
    with pytest.raises(TypeError, match="PIL image"):
        processor(torch.zeros(3, 10, 10))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4"])
def test_num_crops_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=4)(_image(10, 10), num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        num_image_tokens(10, 10, bad)


def test_save_load_round_trip(tmp_path):
    processor = Phi3VImageProcessor(num_crops=16)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved == {
        "auto_map": {  # where the original code is, for readers without this package (vLLM, transformers 4.x)
            "AutoImageProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor",
        },
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "num_crops": 16,
        "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor",
    }
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=4).num_crops == 4


def test_loads_hub_config(reference_dir):
    hub_dir = reference_dir / "phi35v_hub_files"
    processor = Phi3VImageProcessor.from_pretrained(hub_dir)
    assert processor.num_crops == 4 and processor.num_img_tokens == 144
    hub = json.loads((hub_dir / "preprocessor_config.json").read_text())
    saved = processor.to_dict()
    # The same entries, naming the Hub repo of the code: a folder we write holds no code.
    assert saved.pop("auto_map") == {key: f"microsoft/Phi-3.5-vision-instruct--{value}"
                                     for key, value in hub.pop("auto_map").items()}
    assert saved == hub


def test_fast_enough():
    processor = Phi3VImageProcessor(num_crops=16)
    image = _image(1920, 1080)
    processor(image)
    start = time.perf_counter()
    out = processor(image)
    assert time.perf_counter() - start < 1.0
    assert out["num_img_tokens"] == [2353]


def test_original_token_count_name_matches_the_golden_table(golden):
    """`calc_num_image_tokens_from_image_size`, as vLLM calls it on the original image processor."""
    for row in golden["num_img_tokens_table"]:
        processor = Phi3VImageProcessor(num_crops=row["num_crops"])
        assert processor.calc_num_image_tokens_from_image_size(width=row["width"], height=row["height"]) == \
            row["num_img_tokens"], row
