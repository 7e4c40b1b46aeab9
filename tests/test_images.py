"""phivision.images: sizes from headers, decoding with errors that name the file."""

import pytest
from helpers import random_image
from PIL import Image

from phivision.images import image_size, open_image


def test_size_from_the_header_and_full_check(tmp_path):
    random_image(640, 480).save(tmp_path / "a.jpg", quality=90)
    assert image_size(tmp_path / "a.jpg") == (640, 480)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "cut.jpg") == (640, 480)  # the header is intact
    with pytest.raises(ValueError, match="cannot be read as an image"):
        image_size(tmp_path / "cut.jpg", full_check=True)
    with pytest.raises(ValueError, match="not found"):
        image_size(tmp_path / "missing.jpg")


def test_open_image_names_the_flag_and_the_file(tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png").size == (8, 8)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"--image .*notes.txt: cannot be read as an image"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"--input .*gone.png: no such file"):
        open_image(tmp_path / "gone.png", "--input")


def sideways_photo(path):
    """A phone photo stored landscape (80x40) with EXIF orientation 6: shown portrait (40x80)."""
    image = random_image(80, 40, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return image


def test_exif_orientation_is_applied_everywhere_images_are_read(tmp_path, tiny_processor):
    from PIL import ImageOps

    from phivision.images import upright, upright_size

    sideways_photo(tmp_path / "phone.jpg")
    with Image.open(tmp_path / "phone.jpg") as stored:
        assert stored.size == (80, 40) and upright_size(stored) == (40, 80)
        shown = ImageOps.exif_transpose(stored)
    assert shown.size == (40, 80)
    assert image_size(tmp_path / "phone.jpg") == (40, 80)  # validate, generate --input token counts
    assert open_image(tmp_path / "phone.jpg").size == (40, 80)  # generate --image
    # The processor (training, evaluation, generation) turns a lazily opened file upright too.
    processed = tiny_processor.image_processor.preprocess(Image.open(tmp_path / "phone.jpg"), num_crops=4)
    expected = tiny_processor.image_processor.preprocess(shown, num_crops=4)
    assert processed["image_sizes"].tolist() == expected["image_sizes"].tolist()
    assert (processed["pixel_values"] == expected["pixel_values"]).all()
    assert processed["num_img_tokens"] == [tiny_processor.image_processor.num_image_tokens(*upright_size(
        Image.open(tmp_path / "phone.jpg")), 4)]
    plain = random_image(30, 20)
    assert upright(plain) is plain
