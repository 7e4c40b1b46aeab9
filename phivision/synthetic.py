"""A generated visual task for the demo and the tests: "What colour is the shape?".

    python -m phivision.synthetic OUT_DIR [--num_train 300 --num_eval 500 --images_per_row 1 --text_only_every 0]
    python -m phivision.synthetic OUT_DIR --preference [--num_train 300 --num_eval 500 --text_only_every 0]

Writes a `DatasetDict.save_to_disk` directory in the_cauldron's schema (`images`: list of PIL
images, `texts`: list of {user, assistant, source}), so any the_cauldron recipe reads it through
`--dataset_name_or_path`. The eval rows come first, as the recipes hold out the first rows.
With two images per row the question is about the second image, which needs both (NLVR2-like).

With --preference: preference pairs in the flat local layout (RLAIF-V's columns) that
finetune_hf_trainer_dpo.py reads with --data_dir: train.jsonl and test.jsonl of
{"id", "image"?, "question", "chosen", "rejected"} and the images in images/; the right colour is
chosen, another colour rejected.
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220)}


def shape_image(colour: str, rng: random.Random) -> Image.Image:
    """A coloured rectangle or ellipse on a light background, of a random size and aspect ratio."""
    width, height = rng.randint(48, 160), rng.randint(48, 160)
    image = Image.new("RGB", (width, height), (235, 235, 235))
    x0, y0 = rng.randint(0, width // 3), rng.randint(0, height // 3)
    box = (x0, y0, x0 + rng.randint(width // 3, width * 2 // 3), y0 + rng.randint(height // 3, height * 2 // 3))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def shapes_rows(num_rows: int, images_per_row: int = 1, seed: int = 0, text_only_every: int = 0) -> list[dict]:
    """Rows in the_cauldron schema; the answer is the colour of the last image's shape.

    With `text_only_every` k > 0, every k-th row has no image ("Say the word blue.").
    """
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        if text_only_every and index % text_only_every == text_only_every - 1:
            colour = rng.choice(sorted(COLOURS))
            rows.append({"images": [], "texts": [{"user": f"Say the word {colour}.", "assistant": colour, "source": "shapes"}]})
            continue
        colours = [rng.choice(sorted(COLOURS)) for _ in range(images_per_row)]
        question = "What colour is the shape?" if images_per_row == 1 else "What colour is the shape in the second image?"
        rows.append({
            "images": [shape_image(c, rng) for c in colours],
            "texts": [{"user": question + " Answer red, green or blue.", "assistant": colours[-1], "source": "shapes"}],
        })
    return rows


def make_shapes_preferences(out_dir: str | Path, num_train: int = 300, num_eval: int = 500, seed: int = 0,
                            text_only_every: int = 0) -> Path:
    """Writes the shapes rows as preference pairs (see the module docstring): test.jsonl holds the first num_eval."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)  # the wrong colours: apart from the rows' own draws
    records = []
    for index, row in enumerate(shapes_rows(num_eval + num_train, 1, seed, text_only_every)):
        text = row["texts"][0]
        record = {"id": f"shapes-{index}", "question": text["user"], "chosen": text["assistant"],
                  "rejected": rng.choice([c for c in sorted(COLOURS) if c != text["assistant"]])}
        if row["images"]:
            name = f"{index}.png"
            row["images"][0].save(out_dir / "images" / name)
            record["image"] = name
        records.append(record)
    for name, part in (("test.jsonl", records[:num_eval]), ("train.jsonl", records[num_eval:])):
        (out_dir / name).write_text("".join(json.dumps(record) + "\n" for record in part))
    return out_dir


def make_shapes_dataset(out_dir: str | Path, num_train: int = 300, num_eval: int = 500, images_per_row: int = 1,
                        seed: int = 0, text_only_every: int = 0) -> Path:
    """Saves num_eval + num_train rows (eval first) as a DatasetDict with one "train" split."""
    import datasets

    rows = shapes_rows(num_eval + num_train, images_per_row, seed, text_only_every)
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })
    table = {"images": [r["images"] for r in rows], "texts": [r["texts"] for r in rows]}
    dataset = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(out_dir))
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="Directory to write the dataset to.")
    parser.add_argument("--num_train", type=int, default=300, help="Training rows (after the eval rows).")
    parser.add_argument("--num_eval", type=int, default=500, help="Held-out rows, first in the split.")
    parser.add_argument("--images_per_row", type=int, default=1, help="Images per row (2 for an NLVR2-like task).")
    parser.add_argument("--text_only_every", type=int, default=0, help="Make every k-th row text-only (0: none).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument("--preference", action="store_true",
                        help="Write preference pairs (right colour chosen, another rejected) in the flat local layout.")
    args = parser.parse_args(argv)
    if args.preference:
        path = make_shapes_preferences(args.out_dir, args.num_train, args.num_eval, args.seed, args.text_only_every)
        print(f"Wrote {args.num_eval} eval (test.jsonl) + {args.num_train} train (train.jsonl) pairs to {path}")
        return
    import datasets

    datasets.disable_progress_bars()  # saving takes a blink; the line below says what was written
    path = make_shapes_dataset(args.out_dir, args.num_train, args.num_eval, args.images_per_row, args.seed,
                               args.text_only_every)
    print(f"Wrote {args.num_eval} eval + {args.num_train} train rows to {path}")


if __name__ == "__main__":
    main()
