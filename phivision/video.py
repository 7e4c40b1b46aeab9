"""Reading video frames (PyAV): a fixed number of frames, evenly spaced over the frames actually decoded.

The frame sampling of the UCF-101 recipe (convert_ucf101.py) and of videos sent to `python -m phivision.web`:
frame k of a clip with n decoded frames is frame `floor((2k + 1) * n / (2 * num_frames))`, the frame under the
centre of the k-th of num_frames equal slices of the clip (the count in the container header is not trusted).

    images, decoded, header_count, warnings = read_frames(Path("clip.mp4"), 8)

PyAV (`pip install av`) is imported only when a video is decoded.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

VIDEO_EXTENSIONS = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".ogv", ".ts", ".mts", ".m2ts", ".vob"}
MAX_BUFFERED_BYTES = 256 * 2**20  # decoded frames kept per clip; longer clips are decoded twice instead


def evenly_spaced_indices(num_decoded: int, num_frames: int) -> list[int]:
    """Exactly num_frames indices in [0, num_decoded): the frame under the centre of each of
    num_frames equal slices, floor((2k + 1) * n / (2 * num_frames)). Integer arithmetic, so the
    same on every machine; strictly increasing when n >= num_frames, evenly repeated otherwise."""
    return [(2 * k + 1) * num_decoded // (2 * num_frames) for k in range(num_frames)]


def decode(path: Path, on_frame) -> tuple[int, int, list[str]]:
    """Decodes the first video stream, calling on_frame(index, frame) for every frame in display order.
    Returns (frames decoded, frame count in the container header (0 = unknown), warnings).
    Undecodable packets are skipped (and counted) rather than ending the clip."""
    warnings, bad_packets, n = [], 0, 0
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    import av  # optional: only videos need it (pip install av)

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        header = stream.frames or 0
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    bad_packets += 1
                    continue
                for frame in frames:
                    on_frame(n, frame)
                    n += 1
        except av.error.FFmpegError as e:
            warnings.append(f"read error after {n} frames, rest of the file ignored ({e})")
    if bad_packets:
        warnings.append(f"{bad_packets} undecodable packet(s) skipped")
    if n == 0:
        raise ValueError("no decodable video frames" + (f" ({bad_packets} bad packets)" if bad_packets else ""))
    return n, header, warnings


def frame_image(frame) -> Image.Image:
    """RGB image of a frame, turned upright when the file says it is rotated (phone videos)."""
    image = frame.to_image()
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    rotation = round(frame.rotation) % 360  # counter-clockwise degrees, as the display matrix says
    return image.transpose(turn[rotation]) if rotation in turn else image


def read_frames(path: Path, num_frames: int) -> tuple[list[Image.Image], int, int, list[str]]:
    """num_frames evenly spaced frames of a video -> (images, frames decoded, header count, warnings).

    One pass keeps the decoded frames (as YUV) while they fit MAX_BUFFERED_BYTES; a longer video is
    counted in that pass and decoded a second time to pick the frames."""
    buffered: list | None = []
    size = 0

    def keep(index, frame):
        nonlocal buffered, size
        if buffered is not None:
            buffered.append(frame)
            size += sum(plane.buffer_size for plane in frame.planes)
            if size > MAX_BUFFERED_BYTES:
                buffered = None

    n, header, warnings = decode(path, keep)
    indices = evenly_spaced_indices(n, num_frames)
    if buffered is not None:
        picked = {i: frame_image(buffered[i]) for i in sorted(set(indices))}
    else:
        picked = {}
        wanted = set(indices)

        def pick(index, frame):
            if index in wanted:
                picked[index] = frame_image(frame)

        n_again, _, _ = decode(path, pick)
        if n_again != n or len(picked) != len(wanted):
            raise ValueError(f"decoding is not repeatable ({n} then {n_again} frames)")
    return [picked[i] for i in indices], n, header, warnings
