"""phi3v.images: sizes from headers, decoding with errors that name the file."""

import pytest
from helpers import random_image
from PIL import Image

from phi3v.images import image_size, open_image


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
