"""convert_ucf101.py on synthetic clips written with PyAV: several codecs and containers, a clip with a
wrong frame count in its header, one without a count (mkv), a 3-frame clip, a rotated clip, a corrupt
and an empty file. Every output file is checked, and which source frame each JPEG shows."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import convert_ucf101 as cv  # noqa: E402
from phivision import video  # noqa: E402
from videos import frame_index, set_avi_frame_count, write_clip, write_garbage  # noqa: E402

# relative path: (decoded frames, codec, extra write_clip arguments)
CLIPS = {
    "train/Alpha/a1.avi": (20, "mpeg4", {}),
    "train/Alpha/a2.mp4": (12, "libx264", {}),  # B-frames: display order differs from decode order
    "train/Beta/b1.mkv": (10, "mpeg4", {}),  # mkv: no frame count in the header (0)
    "train/Beta/b2.avi": (9, "mjpeg", {}),
    "train/Beta/short3.avi": (3, "mpeg4", {}),  # fewer than 8 frames
    "val/Alpha/v1.avi": (16, "mpeg4", {}),  # header patched to claim 100 frames
    "val/Beta/v2.mp4": (30, "libx264", {"rotation": 90, "marker": True}),
    "test/Gamma/dup.avi": (8, "mpeg4", {}),  # same stem as dup.mkv
    "test/Gamma/dup.mkv": (5, "mpeg4", {}),
}
UNREADABLE = ["train/Beta/bad.avi", "test/Beta/empty.avi"]
STEMS = {"test/Gamma/dup.avi": "dup_avi", "test/Gamma/dup.mkv": "dup_mkv"}
PROMPT = "Classify the video into one of the following classes: Alpha, Beta, Gamma."


def make_source(root: Path) -> Path:
    for rel, (frames, codec, extra) in CLIPS.items():
        write_clip(root / rel, frames, codec, **extra)
    set_avi_frame_count(root / "val/Alpha/v1.avi", 100)
    write_garbage(root / "train/Beta/bad.avi")
    (root / "test/Beta").mkdir(parents=True)
    (root / "test/Beta/empty.avi").write_bytes(b"")
    (root / "test/Beta/notes.txt").write_text("not a video")
    (root / "train/Alpha/.DS_Store").write_bytes(b"\0")
    return root


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The script as a command (a new Python process): for what only the command line shows."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "convert_ucf101.py"), *args, "--no-tqdm"],
                          capture_output=True, text=True, env=env, timeout=120)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """cv.main() in this process, its exit code and output as run_cli returns them: the tests about what the
    converter does, not about its command line, without a Python start (about 6 s of CPU for its imports) each."""
    capsys.readouterr()  # what ran before
    code = cv.main([*args, "--no-tqdm"])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["convert_ucf101.py", *args], code, out, err)


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    """Anything the converter left next to the output folder (temporary folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def stem(rel: str) -> str:
    split, cls, name = rel.split("/")
    return f"{split}/{cls}/{STEMS.get(rel, Path(name).stem)}"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("videos") / "UCF101_subset")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    result = run_cli("--src_dir", str(source), "--out_dir", str(out), "--num_workers", "2")
    assert result.returncode == 0, result.stderr
    return out, result


def test_evenly_spaced_indices():
    assert video.evenly_spaced_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert video.evenly_spaced_indices(8, 8) == list(range(8))
    assert video.evenly_spaced_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert video.evenly_spaced_indices(1, 8) == [0] * 8
    for n in range(1, 80):
        for m in range(1, 17):
            idx = video.evenly_spaced_indices(n, m)
            assert len(idx) == m and all(0 <= i < n for i in idx) and idx == sorted(idx)
            if n >= m:
                assert len(set(idx)) == m
            else:  # every frame used, each floor(m/n) or ceil(m/n) times
                uses = Counter(idx)
                assert len(uses) == n and max(uses.values()) - min(uses.values()) <= 1


def test_output_files(converted):
    out, _ = converted
    expected = {f"ucf101_{s}.jsonl" for s in ("train", "val", "test")}
    expected |= {f"images/{stem(rel)}.{k}.jpg" for rel in CLIPS for k in range(8)}
    assert set(tree(out)) == expected
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").glob("*/*")) == [
        "images/test/Gamma", "images/train/Alpha", "images/train/Beta", "images/val/Alpha", "images/val/Beta"]
    assert siblings(out) == []
    for path in (out / "images").rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == ((48, 64) if "val/Beta/v2" in path.as_posix() else (64, 48))


def test_jsonl_records(converted):
    out, _ = converted
    order = ["train/Alpha/a1.avi", "train/Alpha/a2.mp4", "train/Beta/b1.mkv", "train/Beta/b2.avi",
             "train/Beta/short3.avi", "val/Alpha/v1.avi", "val/Beta/v2.mp4", "test/Gamma/dup.avi", "test/Gamma/dup.mkv"]
    expected = {"train": [], "val": [], "test": []}
    for i, rel in enumerate(order):  # ids run over train, val, test; unreadable clips take none
        split, cls, _ = rel.split("/")
        expected[split].append({
            "id": f"{split}-{i:010d}", "source": "ucf101",
            "conversations": [{"images": [f"{stem(rel)}.{k}.jpg" for k in range(8)], "user": PROMPT,
                               "assistant": cls}]})
    for split, records in expected.items():
        text = (out / f"ucf101_{split}.jsonl").read_text(encoding="utf-8")
        assert text == "".join(json.dumps(r) + "\n" for r in records)
    # the guide's line layout, key order included
    assert text.startswith('{"id": "test-0000000007", "source": "ucf101", "conversations": [{"images": ["test/Gamma/dup_avi.0.jpg"')


def test_frames_evenly_spaced_over_decoded_frames(converted):
    out, _ = converted
    for rel, (frames, _, _) in CLIPS.items():
        shown = []
        for k in range(8):
            pixels = np.asarray(Image.open(out / "images" / f"{stem(rel)}.{k}.jpg").convert("L"), dtype=float)
            h, w = pixels.shape
            shown.append(frame_index(pixels[h // 2 - 4: h // 2 + 4, w // 2 - 4: w // 2 + 4].mean()))
        assert shown == video.evenly_spaced_indices(frames, 8), rel


def test_rotated_clip_is_upright(converted):
    out, _ = converted
    pixels = np.asarray(Image.open(out / "images/val/Beta/v2.0.jpg").convert("L"), dtype=float)
    # written with a white top-left corner and a 90 degree counter-clockwise display rotation
    assert pixels[-4:, :4].mean() > 200 and pixels[:4, :4].mean() < 100 and pixels[-4:, -4:].mean() < 100


def test_summary(converted):
    _, result = converted
    text = result.stdout
    assert "Converted 9 clips into 72 frames (8 per clip)" in text
    assert "Alpha        2       1       0" in text and "Gamma        0       0       2" in text
    assert "clips        5       2       2" in text and "frames      40      16      16" in text
    assert "Skipped 2 unreadable video(s):" in text
    assert "train/Beta/bad.avi: InvalidDataError" in text and "test/Beta/empty.avi: ValueError: empty file" in text
    assert "2 clip(s) had fewer than 8 frames" in text and "train/Beta/short3.avi: 3 frame(s)" in text
    assert "test/Gamma/dup.mkv: 5 frame(s)" in text
    assert "val/Alpha/v1.avi (100 vs 16)" in text
    assert "ignored 1 non-video entry in test/Beta" in text


def test_rerun_replaces_output_and_is_deterministic(converted, source, tmp_path):
    first, _ = converted
    out = tmp_path / "out"
    shutil.copytree(first, out)
    (out / "images/train/Alpha/stale.0.jpg").write_bytes(b"old")
    (out / "images/old_split").mkdir()
    (out / "ucf101_val.jsonl").write_text("stale\n")
    # in-process this time, and without a process pool: same files byte for byte
    assert cv.main(["--src_dir", str(source), "--out_dir", str(out), "--num_workers", "1", "--no-tqdm"]) == 0
    assert tree(out) == tree(first)
    assert not (out / "images/old_split").exists() and siblings(out) == []


def test_strict_fails_and_writes_nothing(source, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_main(capsys, "--src_dir", str(source), "--out_dir", str(out), "--strict", "--num_workers", "1")
    assert result.returncode == 1
    assert "train/Beta/bad.avi" in result.stderr and "test/Beta/empty.avi" in result.stderr
    assert not out.exists() and siblings(out) == []


def test_failure_midway_keeps_previous_output(converted, source, tmp_path, monkeypatch):
    first, _ = converted
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = tree(out)
    calls = []

    def failing(job):
        calls.append(job)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real(job)

    real = cv.convert_clip
    monkeypatch.setattr(cv, "convert_clip", failing)
    with pytest.raises(OSError, match="No space left"):
        cv.main(["--src_dir", str(source), "--out_dir", str(out), "--num_workers", "0", "--no-tqdm"])
    assert tree(out) == before and siblings(out) == []

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "convert_clip", interrupted)
    assert cv.main(["--src_dir", str(source), "--out_dir", str(tmp_path / "new"), "--num_workers", "0", "--no-tqdm"]) == 130
    assert not (tmp_path / "new").exists() and siblings(tmp_path / "new") == []


def test_refuses_a_folder_it_did_not_write(source, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_main(capsys, "--src_dir", str(source), "--out_dir", str(out))
    assert result.returncode == 1 and "did not write" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["notes.txt"]


def test_stale_temporary_folders_and_odd_inputs(source, tmp_path, capsys):
    src = tmp_path / "download" / "my_videos"  # the splits one level down from --src_dir
    shutil.copytree(source / "val/Alpha", src / "train/Alpha")
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{cv.socket.gethostname()}-{2**22 + 12345}-abc"  # a pid above Linux's pid_max
    (stale / "images").mkdir(parents=True)
    result = run_main(capsys, "--src_dir", str(tmp_path / "download"), "--out_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and siblings(out) == [] and (out / "images/train/Alpha/v1.7.jpg").is_file()
    result = run_main(capsys, "--src_dir", str(src / "train"), "--out_dir", str(tmp_path / "x"))
    assert result.returncode == 1 and "No train/, val/ or test/ folder" in result.stderr
    result = run_main(capsys, "--src_dir", str(src), "--out_dir", str(src))
    assert result.returncode == 1 and "did not write" in result.stderr


def test_archive_with_a_top_folder(converted, source, tmp_path, capsys):
    archive = tmp_path / "UCF101_subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="UCF101_subset")
    out = tmp_path / "out"
    result = run_main(capsys, "--archive", str(archive), "--out_dir", str(out), "--num_workers", "2")
    assert result.returncode == 0, result.stderr
    assert tree(out) == tree(converted[0]) and siblings(out) == []


def test_hub_unreachable_names_the_local_options(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    # An empty Hub cache, offline: what HF_HOME=<empty folder> HF_HUB_OFFLINE=1 give a new process.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_main(capsys, "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "sayakpaul/ucf101-subset" in result.stderr
    assert "--archive" in result.stderr and "--src_dir" in result.stderr
    assert not (tmp_path / "out").exists()


def test_long_clips_are_decoded_twice_with_the_same_frames(source, monkeypatch):
    once, n, header, _ = video.read_frames(source / "train/Alpha/a2.mp4", 8)
    monkeypatch.setattr(video, "MAX_BUFFERED_BYTES", 1)  # forces the counting pass + the picking pass
    twice, n2, _, _ = video.read_frames(source / "train/Alpha/a2.mp4", 8)
    assert (n, n2, header) == (12, 12, 12)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(once, twice))


def test_num_frames_and_source_flags(source, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(source / "train/Alpha", src / "train/Alpha")
    shutil.copytree(source / "val/Beta", src / "test/Beta")
    out = tmp_path / "out"
    result = run_main(capsys, "--src_dir", str(src), "--out_dir", str(out), "--num_frames", "3", "--source", "my_clips")
    assert result.returncode == 0, result.stderr
    assert "No val folder in the input" in result.stdout
    assert sorted(os.listdir(out)) == ["images", "ucf101_test.jsonl", "ucf101_train.jsonl"]
    records = [json.loads(line) for line in (out / "ucf101_test.jsonl").read_text().splitlines()]
    assert records == [{"id": "test-0000000002", "source": "my_clips", "conversations": [{
        "images": ["test/Beta/v2.0.jpg", "test/Beta/v2.1.jpg", "test/Beta/v2.2.jpg"],
        "user": "Classify the video into one of the following classes: Alpha, Beta.", "assistant": "Beta"}]}]


def test_converted_output_passes_the_validator(converted):
    from phivision.data import load_jsonl_dataset

    out, _ = converted
    assert [r["id"] for r in load_jsonl_dataset(out, "val")] == ["val-0000000005", "val-0000000006"]
    assert len(load_jsonl_dataset(out, "train")) == 5


def test_an_out_dir_in_a_folder_without_write_permission_is_one_line(source, capsys):
    from helpers import read_only_folder

    with read_only_folder() as parent:
        code = cv.main(["--src_dir", str(source), "--out_dir", str(parent / "out"), "--num_workers", "0", "--no-tqdm"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (f"error: --out_dir {parent / 'out'}: cannot write there (no permission "
                                               f"to write in {parent})")
