"""Convert UCF-101, or any videos laid out as {train,val,test}/{Class}/*.avi|mp4|mkv..., to the
multi-image jsonl format that finetune_hf_trainer_ucf101.py reads.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101                  # Hub: sayakpaul/ucf101-subset
    python convert_ucf101.py --out_dir out --archive UCF101_subset.tar.gz          # a downloaded archive
    python convert_ucf101.py --out_dir out --src_dir my_videos --source my_videos  # your own videos

Output (`python -m phivision.data validate OUT_DIR` checks it):

    out_dir/images/{split}/{Class}/{video_stem}.{k}.jpg     k = 0 .. num_frames-1
    out_dir/ucf101_{split}.jsonl                            one clip per line, ids {split}-{i:010d}

Frames: exactly --num_frames per clip, evenly spaced over the frames actually decoded (the count in
the container header is not trusted): frame k of a clip with n decoded frames is frame
`floor((2k + 1) * n / (2 * num_frames))`, the frame under the centre of the k-th of num_frames equal
slices of the clip. With n >= num_frames the indices are distinct; shorter clips repeat frames evenly.
Everything is deterministic (sorted order, fixed JPEG quality): re-runs give the same ids and files.
The output is built in a temporary sibling folder and swapped into place only when complete.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import av

from phivision.video import VIDEO_EXTENSIONS, read_frames

HUB_REPO, HUB_FILE = "sayakpaul/ucf101-subset", "UCF101_subset.tar.gz"
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95
PROMPT = "Classify the video into one of the following classes: {}."
TEMP_TAG = f"{socket.gethostname()}-{os.getpid()}"


class ConversionError(Exception):
    """A problem with the inputs or the output folder, reported without a traceback."""


def convert_clip(job: tuple[str, str, int]) -> dict:
    """Worker: decode one clip and write {prefix}.{k}.jpg. An unreadable video is reported in the
    result (not raised); a failure to write the JPEGs (disk full...) raises and stops the run."""
    source, prefix, num_frames = job
    try:
        images, n, header, warnings = read_frames(Path(source), num_frames)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable video"
        reason = e.strerror if isinstance(e, av.error.FFmpegError) and e.strerror else str(e)
        return {"error": f"{type(e).__name__}: {reason}".strip()}
    for k, image in enumerate(images):
        image.save(f"{prefix}.{k}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return {"decoded": n, "header": header, "warnings": warnings}


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and cleans up


# ----------------------------------------------------------------------------- finding the inputs

def fetch_default_archive() -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - offline, no connection, not found...
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(
            f"Could not get {HUB_FILE} from the Hub dataset {HUB_REPO} ({type(e).__name__}: {reason}).\n"
            f"Use a local copy instead:\n"
            f"  --archive PATH    the {HUB_FILE} archive, downloaded elsewhere\n"
            f"  --src_dir PATH    an extracted tree {{train,val,test}}/{{Class}}/*.avi (or any videos so laid out)"
        ) from None


def extract_archive(archive: Path, dest: Path) -> None:
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and odd links
            else:  # Python < 3.10.12
                for member in tar.getmembers():
                    if member.name.startswith("/") or ".." in Path(member.name).parts:
                        raise ConversionError(f"{archive}: unsafe path in archive: {member.name}")
                tar.extractall(dest)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)  # zipfile drops absolute paths and '..'
    else:
        raise ConversionError(f"{archive}: not a tar or zip archive")


def find_split_root(top: Path) -> Path:
    """The folder under `top` (itself or up to 3 levels down) that holds train/, val/ or test/."""
    level = [top]
    for _ in range(4):
        for folder in level:
            if any((folder / split).is_dir() for split in SPLITS):
                return folder
        level = sorted(sub for folder in level for sub in folder.iterdir()
                       if sub.is_dir() and not sub.name.startswith((".", "__MACOSX")))
    raise ConversionError(f"No train/, val/ or test/ folder found in {top} (expected {{split}}/{{Class}}/video files)")


def scan(root: Path) -> tuple[dict[str, dict[str, list[tuple[Path, str]]]], list[str]]:
    """{split: {class: [(video, output stem), ...]}} in sorted order, and notes on ignored files."""
    plan, notes = {}, []
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        plan[split] = {}
        for class_dir in sorted((root / split).iterdir()):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir():
                notes.append(f"ignored {split}/{class_dir.name}: not inside a class folder")
                continue
            videos, ignored = [], 0
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in VIDEO_EXTENSIONS:
                    videos.append(f)
                elif not f.name.startswith("."):
                    ignored += 1
            if ignored:
                notes.append(f"ignored {ignored} non-video entr{'y' if ignored == 1 else 'ies'} in {split}/{class_dir.name}")
            stems = [v.stem for v in videos]
            # two videos with one stem (a.avi, a.mp4) would write the same frames: name those by the full name
            plan[split][class_dir.name] = [(v, v.name.replace(".", "_") if stems.count(v.stem) > 1 else v.stem)
                                           for v in videos]
    return plan, notes


# ----------------------------------------------------------------------------- the output folder

def _is_previous_output(out_dir: Path) -> bool:
    allowed = {"images", ".DS_Store"} | {f"ucf101_{split}.jsonl" for split in SPLITS}
    return all(entry.name in allowed for entry in out_dir.iterdir())


def check_out_dir(out_dir: Path, src: Path | None) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"--out_dir {out_dir} is a file")
    if out_dir.is_dir() and not _is_previous_output(out_dir):
        raise ConversionError(f"--out_dir {out_dir} holds files this script did not write; it would be replaced "
                              f"as a whole. Choose a new or empty folder (or a previous output of this script).")
    if src is not None and (src.resolve() == out_dir.resolve() or out_dir.resolve() in src.resolve().parents):
        raise ConversionError(f"--src_dir {src} is inside --out_dir {out_dir}")
    # The output is built beside --out_dir: its nearest existing parent must take new folders. (The rule of
    # phivision.files.cannot_write_in, with this script's message.)
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ConversionError(f"--out_dir {out_dir}: cannot write there (no permission to write in {parent})")


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Temporary folders of runs on this machine that were killed (kill -9, power loss)."""
    host = socket.gethostname()
    for path in out_dir.parent.glob(f".{out_dir.name}.*-{host}-*"):
        try:
            pid = int(path.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def swap_into_place(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{TEMP_TAG}-{time.time_ns()}"
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- main

def run_jobs(jobs: list[tuple[str, str, int]], num_workers: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    results: list[dict | None] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc="Converting clips", unit="clip", disable=not progress) as bar:
        if num_workers <= 1:
            for i, job in enumerate(jobs):
                results[i] = convert_clip(job)
                bar.update()
            return results
        pool = ProcessPoolExecutor(max_workers=num_workers, initializer=_ignore_sigint)
        try:
            pending = {pool.submit(convert_clip, job): i for i, job in enumerate(jobs)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    results[pending.pop(future)] = future.result()
                    bar.update()
        finally:  # on an error or Ctrl-C: drop the queued clips, let the running ones finish
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def summarize(plan, classes, records_per_split, skipped, short, mismatched, warnings, notes, num_frames, out_dir,
              seconds) -> str:
    splits = list(plan)
    total = sum(len(r) for r in records_per_split.values())
    lines = [f"Converted {total} clips into {total * num_frames} frames ({num_frames} per clip) in {out_dir} "
             f"({seconds:.1f} s)."]
    width = max(len(c) for c in classes + ["frames"])
    counts = {(s, c): 0 for s in splits for c in classes}
    for split, records in records_per_split.items():
        for record in records:
            counts[split, record["conversations"][0]["assistant"]] += 1
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for c in classes:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{counts[s, c]:>6}" for s in splits))
    lines.append(f"{'clips':<{width}}  " + "  ".join(f"{len(records_per_split[s]):>6}" for s in splits))
    lines.append(f"{'frames':<{width}}  " + "  ".join(f"{len(records_per_split[s]) * num_frames:>6}" for s in splits))
    missing = [s for s in SPLITS if s not in plan]
    if missing:
        lines.append(f"No {', '.join(missing)} folder in the input: no jsonl for {'it' if len(missing) == 1 else 'them'}.")
    lines += [f"Note: {n}" for n in notes]
    lines.append(f"Skipped {len(skipped)} unreadable video(s)" + (":" if skipped else "."))
    lines += [f"  {name}: {error}" for name, error in skipped]
    if short:
        lines.append(f"{len(short)} clip(s) had fewer than {num_frames} frames; their frames are repeated evenly:")
        lines += [f"  {name}: {n} frame(s)" for name, n in short]
    if mismatched:
        lines.append(f"{len(mismatched)} clip(s) had a missing or wrong frame count in the container header "
                     f"(the decoded count was used), e.g. " + ", ".join(f"{name} ({h} vs {n})" for name, h, n in mismatched[:3]))
    if warnings:
        lines.append(f"{len(warnings)} clip(s) decoded with problems (kept):")
        lines += [f"  {name}: {w}" for name, w in warnings]
    return "\n".join(lines)


def convert(args: argparse.Namespace) -> int:
    start = time.time()
    out_dir = Path(args.out_dir).absolute()
    src = Path(args.src_dir) if args.src_dir else None
    check_out_dir(out_dir, src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    scratch = staging = None
    try:
        if src is None:
            archive = Path(args.archive) if args.archive else fetch_default_archive()
            if not archive.is_file():
                raise ConversionError(f"--archive {archive}: no such file")
            scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.src-{TEMP_TAG}-", dir=out_dir.parent))
            print(f"Extracting {archive} ...", flush=True)
            extract_archive(archive, scratch)
            src = scratch
        elif not src.is_dir():
            raise ConversionError(f"--src_dir {src}: no such folder")
        root = find_split_root(src)
        plan, notes = scan(root)
        classes = sorted({c for split in plan.values() for c, videos in split.items() if videos})
        if not classes:
            raise ConversionError(f"No video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) in {root}/{{split}}/{{Class}}/")
        prompt = PROMPT.format(", ".join(classes))

        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{TEMP_TAG}-", dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700; it becomes --out_dir, a folder like any other
        jobs, clips = [], []  # clips[i] = (split, class, relative name, stem) for jobs[i]
        for split, by_class in plan.items():
            for cls, videos in by_class.items():
                (staging / "images" / split / cls).mkdir(parents=True, exist_ok=True)
                for video, stem in videos:
                    jobs.append((str(video), str(staging / "images" / split / cls / stem), args.num_frames))
                    clips.append((split, cls, f"{split}/{cls}/{video.name}", stem))
        results = run_jobs(jobs, args.num_workers, progress=not args.no_tqdm)

        records_per_split = {split: [] for split in plan}
        skipped, short, mismatched, warnings = [], [], [], []
        next_id = 0
        for (split, cls, name, stem), result in zip(clips, results):
            if "error" in result:
                skipped.append((name, result["error"]))
                continue
            if result["decoded"] < args.num_frames:
                short.append((name, result["decoded"]))
            if result["header"] != result["decoded"]:
                mismatched.append((name, result["header"], result["decoded"]))
            warnings += [(name, w) for w in result["warnings"]]
            images = [f"{split}/{cls}/{stem}.{k}.jpg" for k in range(args.num_frames)]
            records_per_split[split].append({
                "id": f"{split}-{next_id:010d}",
                "source": args.source,
                "conversations": [{"images": images, "user": prompt, "assistant": cls}],
            })
            next_id += 1
        for folder in sorted((staging / "images").glob("*/*")):  # classes whose videos were all unreadable
            if not any(folder.iterdir()):
                folder.rmdir()
        for split, records in records_per_split.items():
            with open(staging / f"ucf101_{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)

        summary = summarize(plan, classes, records_per_split, skipped, short, mismatched, warnings, notes,
                            args.num_frames, out_dir, time.time() - start)
        if skipped and args.strict:
            print(summary.replace("Converted", "Would have converted", 1))
            raise ConversionError(f"--strict: {len(skipped)} unreadable video(s): "
                                  + ", ".join(name for name, _ in skipped) + f". Nothing was written to {out_dir}.")
        if next_id == 0:
            raise ConversionError(f"No readable video in {root}. Nothing was written to {out_dir}.")
        swap_into_place(staging, out_dir)
        staging = None
        print(summary)
        return 0
    finally:  # also on Ctrl-C: nothing half-written is left behind, a previous output stays as it was
        for path in (staging, scratch):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Input: --src_dir or --archive; with neither, {HUB_FILE} of the Hub dataset {HUB_REPO}.")
    parser.add_argument("--out_dir", required=True,
                        help="Output folder (created; a previous output of this script there is replaced).")
    parser.add_argument("--archive", help=f"A local {HUB_FILE} (or any .tar[.gz]/.zip holding train/val/test "
                                          "class folders, possibly under one top folder).")
    parser.add_argument("--src_dir", help="An extracted tree {train,val,test}/{Class}/*.avi (any video format "
                                          "PyAV decodes: mp4, mkv, mov, ...). Missing splits are skipped.")
    parser.add_argument("--num_frames", type=int, default=8, help="Frames per clip, evenly spaced (default 8).")
    parser.add_argument("--source", default="ucf101", help='Value of the "source" field of every record '
                                                           "(default ucf101; name your own dataset).")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="Processes decoding clips in parallel (default min(8, CPUs); 0 or 1: no pool).")
    parser.add_argument("--strict", action="store_true",
                        help="Fail (exit 1, nothing written) when any video is unreadable instead of skipping it.")
    parser.add_argument("--no-tqdm", "--no_tqdm", dest="no_tqdm", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error("--num_frames must be at least 1")
    if args.src_dir and args.archive:
        parser.error("give --src_dir or --archive, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    try:
        return convert(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted: nothing was written (a previous output is unchanged).", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
