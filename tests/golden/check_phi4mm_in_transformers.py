"""By hand, in the torchvision venv (see make_phi4mm_golden.py): transformers' own classes read the tiny Phi-4-MM
checkpoint, and the model gives the same logits on transformers' processor's inputs as on ours.

    python -m phivision.tiny /tmp/tiny4 --family phi4mm                                          # main venv
    PYTHONPATH=.:tests/golden /work/tv-venv/bin/python tests/golden/check_phi4mm_in_transformers.py /tmp/tiny4
"""

import re
import sys

import torch
from make_phi4mm_golden import IMAGES, PROMPTS, golden_image
from transformers import AutoModelForCausalLM, AutoProcessor

from phivision.phi4mm.processing import Phi4MMProcessor


def main(tiny_dir: str) -> None:
    theirs = AutoProcessor.from_pretrained(tiny_dir)
    ours = Phi4MMProcessor.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    print(type(theirs).__name__, type(theirs.image_processor).__name__, type(model).__name__)
    worst = 0.0
    for prompt, indices in PROMPTS:
        images = [golden_image(*IMAGES[i]) for i in indices]
        their_inputs = theirs(text=re.sub(r"<\|image_\d+\|>", theirs.image_token, prompt), images=images or None,
                              return_tensors="pt")
        our_inputs = ours(prompt, images)
        for name, value in our_inputs.items():
            assert torch.equal(value, their_inputs[name]), name
        with torch.no_grad():
            difference = (model(**their_inputs).logits - model(**our_inputs).logits).abs().max().item()
        worst = max(worst, difference)
        tokens = our_inputs["input_ids"].shape[1]
        print(f"{len(indices)} image(s), {tokens} tokens: max |logit difference| {difference}")
    print(f"all inputs equal; worst logit difference {worst}")


if __name__ == "__main__":
    main(sys.argv[1])
