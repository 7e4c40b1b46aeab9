"""Tiny synthetic video clips for the converter tests, written with PyAV (no ffmpeg binary needed).

Frame i of a clip is a flat grey of level `level(i)`, so the frames a converter picked can be read
back from the brightness of its JPEGs (`frame_index`).
"""

import random
import struct
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT = 64, 48
CONTAINERS = {"mpeg4": "avi", "libx264": "mp4", "mjpeg": "avi"}


def level(index: int) -> int:
    return 16 + 8 * index  # frames 0..29 stay apart after lossy coding


def frame_index(pixel_mean: float) -> int:
    return round((pixel_mean - 16) / 8)


def write_clip(path: Path, num_frames: int, codec: str = "mpeg4", rate: int = 25, rotation: int | None = None,
               marker: bool = False) -> Path:
    """A num_frames clip of flat grey frames (level(i)); `marker` paints a white top-left corner;
    `rotation` stores a display rotation (counter-clockwise degrees) in the container."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            pixels = np.full((HEIGHT, WIDTH, 3), level(i), np.uint8)
            if marker:
                pixels[: HEIGHT // 3, : WIDTH // 3] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def set_avi_frame_count(path: Path, count: int) -> None:
    """Overwrites the stream length (strh dwLength) of an AVI, the count PyAV reports as stream.frames."""
    data = bytearray(path.read_bytes())
    strh = data.find(b"strh")
    data[strh + 8 + 32: strh + 8 + 36] = struct.pack("<I", count)
    path.write_bytes(bytes(data))


def write_garbage(path: Path, size: int = 4096, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path
