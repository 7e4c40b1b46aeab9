import json

import numpy as np
import pytest
from helpers import image_runs
import torch
from PIL import Image
from transformers import AutoTokenizer

from phivision.phi3v.processing import Phi3VProcessor
from phivision.processor_parts import IGNORE_INDEX
from phivision.tiny import CHAT_TEMPLATE, build_tiny_tokenizer

PROMPT = "<|user|>\n{}<|end|>\n<|assistant|>\n"


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----- the real tokenizer and the golden outputs of the original processor -----


@pytest.mark.parametrize("case", ["single_nc4", "two_images_nc4", "text_only"])
def test_golden_input_ids(hub_processor, golden, reference_dir, case):
    spec = golden["cases"][case]
    images = [Image.open(reference_dir / "golden" / f"{name}.png") for name in spec["images"]]
    out = hub_processor(spec["prompt"], images or None, num_crops=spec["num_crops"])
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"][0].tolist() == spec["input_ids"]
    assert out["attention_mask"].tolist() == [[1] * len(spec["input_ids"])]
    if images:
        assert out["image_sizes"].tolist() == spec["image_sizes"]
        assert out["pixel_values"].shape == (len(images), spec["num_crops"] + 1, 3, 336, 336)
        assert hub_processor.encode_prompt(spec["prompt"], spec["num_img_tokens"]) == spec["input_ids"]
    else:
        assert "pixel_values" not in out


def test_hub_tokenizer_matches_golden(hub_processor, golden):
    tokenizer = hub_processor.tokenizer
    for text, spec in golden["tokenizer_checks"].items():
        ids = tokenizer(text)["input_ids"]
        assert ids == spec["ids"], text
        assert tokenizer.convert_ids_to_tokens(ids) == spec["tokens"]
        assert tokenizer.decode(ids) == spec["decoded"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == spec["decoded_skip_special"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 32000, 32000)
    assert hub_processor.image_processor.num_crops == 4


def test_hub_conversation_matches_reference_recipe(hub_processor):
    # The recipe: prompt through the processor, then "{answer}<|end|>\n<|endoftext|>" without special tokens.
    tokenizer = hub_processor.tokenizer
    ids, labels = hub_processor.encode_conversation(
        [{"user": "What is shown?", "assistant": "A red square.", "images": ["a"]}], [757]
    )
    prompt = hub_processor.encode_prompt(PROMPT.format("<|image_1|>\nWhat is shown?"), [757])
    answer = tokenizer("A red square.<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert answer[-4:] == [32007, 29871, 13, 32000]


# ----- prompts and tags (tiny tokenizer) -----


def test_each_piece_is_tokenised_with_bos(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    text = PROMPT.format("<|image_1|>\nFirst.<|end|>\n<|assistant|>\nOk.<|end|>\n<|user|>\n<|image_2|>\nSecond?")
    ids = tiny_processor.encode_prompt(text, [5, 7])
    pieces = ["<|user|>\n", "\nFirst.<|end|>\n<|assistant|>\nOk.<|end|>\n<|user|>\n", "\nSecond?<|end|>\n<|assistant|>\n"]
    expected = tokenizer(pieces[0])["input_ids"] + [-1] * 5 + tokenizer(pieces[1])["input_ids"]
    expected += [-2] * 7 + tokenizer(pieces[2])["input_ids"]
    assert ids == expected
    assert ids.count(tokenizer.bos_token_id) == 3
    out = tiny_processor(text, [_image(50, 40), _image(40, 50)])
    assert image_runs(out["input_ids"][0].tolist()) == [(-1, 757), (-2, 757)]


def test_empty_piece_still_gets_bos(tiny_processor):
    ids = tiny_processor.encode_prompt("<|image_1|><|image_2|>", [2, 3])
    bos = tiny_processor.tokenizer.bos_token_id
    assert ids == [bos, -1, -1, bos, -2, -2, -2, bos]


@pytest.mark.parametrize(
    "text, num_images, message",
    [
        ("<|image_2|> x", 1, "<|image_2|>"),
        ("<|image_0|> x", 1, "<|image_0|>"),
        ("<|image_1|> <|image_3|>", 2, "<|image_1|>, <|image_3|>"),
        ("<|image_2|> <|image_1|>", 2, "in this order"),
        ("<|image_1|> <|image_1|>", 2, "appears more than once"),
        ("<|image_1|> x", 2, "1 image tag(s)"),
        ("<|image_1|> <|image_2|>", 1, "2 image tag(s)"),
        ("no tag", 1, "0 image tag(s)"),
        ("<|image_1|>", 0, "no image tags"),
    ],
)
def test_bad_tags_raise(tiny_processor, text, num_images, message):
    with pytest.raises(ValueError, match="prompt") as error:
        tiny_processor.encode_prompt(text, [3] * num_images)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="prompt 1"):
        tiny_processor(["<|image_1|>ok", text], [[_image(20, 20)], [_image(20, 20)] * num_images])


# ----- batches -----


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_padding(tiny_processor, padding_side):
    a, b, c = _image(640, 480, 1), _image(300, 500, 2), _image(2000, 100, 3)
    texts = [
        PROMPT.format("<|image_1|>\nWhat is shown?"),
        PROMPT.format("Hello, no image here."),
        PROMPT.format("<|image_1|>\n<|image_2|>\nCompare the two images."),
    ]
    images = [[a], None, [b, c]]
    out = tiny_processor(texts, images, padding_side=padding_side)
    singles = [tiny_processor(text, imgs) for text, imgs in zip(texts, images)]
    pad = tiny_processor.tokenizer.pad_token_id
    width = max(s["input_ids"].shape[1] for s in singles)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, width)
    for row, single in enumerate(singles):
        ids = single["input_ids"][0]
        n = len(ids)
        kept = slice(width - n, width) if padding_side == "left" else slice(0, n)
        padded = slice(0, width - n) if padding_side == "left" else slice(n, width)
        assert torch.equal(out["input_ids"][row, kept], ids)
        assert out["attention_mask"][row, kept].eq(1).all() and out["attention_mask"][row, padded].eq(0).all()
        assert out["input_ids"][row, padded].eq(pad).all()
    # pixels of all images of all prompts, in prompt order
    expected = torch.cat([s["pixel_values"] for s in singles if "pixel_values" in s])
    assert torch.equal(out["pixel_values"], expected)
    assert out["image_sizes"].tolist() == [[672, 672], [672, 672], [336, 1344]]
    # each prompt numbers its images from 1
    assert [r[0] for r in image_runs(out["input_ids"][2].tolist())] == [-1, -2]


def test_batch_text_only_and_input_forms(tiny_processor):
    out = tiny_processor(["a b c", "a"], padding_side="right")
    assert "pixel_values" not in out and out["attention_mask"].tolist()[1][-1] == 0
    image = _image(30, 30)
    flat = tiny_processor("<|image_1|><|image_2|>", [image, image])
    nested = tiny_processor(["<|image_1|><|image_2|>"], [[image, image]])
    single = tiny_processor(["<|image_1|>", "x"], [image, []])
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert single["pixel_values"].shape[0] == 1
    as_lists = tiny_processor(["<|image_1|>", "x"], [image, []], return_tensors=None)
    assert isinstance(as_lists["input_ids"], list) and as_lists["input_ids"][1][0] == tiny_processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="2 entries"):
        tiny_processor(["<|image_1|>", "<|image_1|>"], [image])
    with pytest.raises(ValueError, match="padding_side"):
        tiny_processor("x", padding_side="middle")


def test_num_crops_argument(tiny_processor):
    out = tiny_processor("<|image_1|>", [_image(1024, 768)], num_crops=16)
    assert out["pixel_values"].shape[1] == 17 and out["input_ids"].lt(0).sum() == 1921


# ----- training examples -----


def test_encode_conversation_single_turn(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    turns = [{"user": "What is it?", "assistant": "A red square.", "images": ["img.png"]}]
    ids, labels = tiny_processor.encode_conversation(turns, [757])
    prompt = tiny_processor.encode_prompt(PROMPT.format("<|image_1|>\nWhat is it?"), [757])
    answer = tokenizer("A red square.<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert len(ids) == len(labels) and ids.count(-1) == 757


def test_encode_conversation_multi_turn(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    turns = [
        {"user": "Describe these.", "assistant": "Two cats.", "images": ["a", "b"]},
        {"user": "And now?", "assistant": "Nothing new."},
        {"user": "Look at <|image_3|> please.", "assistant": "A dog.", "images": ["c"]},
    ]
    ids, labels = tiny_processor.encode_conversation(turns, [4, 5, 6])
    prompts = [
        tiny_processor.encode_prompt(PROMPT.format("<|image_1|>\n<|image_2|>\nDescribe these."), [4, 5]),
        tokenizer(PROMPT.format("And now?"))["input_ids"][1:],  # follow-up turns: no BOS, as at inference
        [-3 if i == -1 else i for i in tiny_processor.encode_prompt(PROMPT.format("Look at <|image_1|> please."), [6])][1:],
    ]
    assert ids[0] == tokenizer.bos_token_id
    answers = [
        tokenizer("Two cats.<|end|>\n", add_special_tokens=False)["input_ids"],
        tokenizer("Nothing new.<|end|>\n", add_special_tokens=False)["input_ids"],
        tokenizer("A dog.<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"],
    ]
    assert ids == [i for p, a in zip(prompts, answers) for i in p + a]
    assert labels == [i for p, a in zip(prompts, answers) for i in [IGNORE_INDEX] * len(p) + a]
    assert image_runs(ids) == [(-1, 4), (-2, 5), (-3, 6)]
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i < 0)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids.count(end_of_text) == 1 and ids[-1] == end_of_text


def test_encode_conversation_errors(tiny_processor):
    with pytest.raises(ValueError, match="turn 1"):  # later turns number images across the conversation
        tiny_processor.encode_conversation(
            [
                {"user": "<|image_1|> x", "assistant": "a", "images": ["a"]},
                {"user": "<|image_1|> y", "assistant": "b", "images": ["b"]},
            ],
            [3, 3],
        )
    with pytest.raises(ValueError, match="turn 0"):  # a tag without an image
        tiny_processor.encode_conversation([{"user": "<|image_1|> x", "assistant": "a"}], [])
    with pytest.raises(ValueError, match="2 image\\(s\\) in all but 1"):
        tiny_processor.encode_conversation([{"user": "x", "assistant": "a", "images": ["a", "b"]}], [3])
    with pytest.raises(ValueError, match="'user' and 'assistant'"):
        tiny_processor.encode_conversation([{"user": "x"}], [])


# ----- tiny tokenizer and saving -----


def test_tiny_tokenizer(tmp_path):
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) < 512
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "<|endoftext|>", "<|endoftext|>")
    for token in ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>", "<|placeholder6|>"]:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    text = "The quick brown fox, 42 dollars!  Two  spaces ~`{}|"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # same rules as the real tokenizer: "▁" before a leading "\n", "<|assistant|>" swallows the newline after it
    chat = tokenizer(PROMPT.format("Hello"))["input_ids"]
    assert tokenizer.convert_ids_to_tokens(chat)[:4] == ["<s>", "<|user|>", "▁", "<0x0A>"]
    assert chat[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True) == PROMPT.format("Hello")
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids and loaded(PROMPT.format("Hello"))["input_ids"] == chat
    assert loaded.chat_template == CHAT_TEMPLATE and loaded.pad_token_id == tokenizer.pad_token_id


def test_tiny_chat_template_is_the_real_one(reference_dir):
    config = json.loads((reference_dir / "phi35v_hub_files" / "tokenizer_config.json").read_text())
    assert CHAT_TEMPLATE == config["chat_template"]
    real = {t["content"]: t["rstrip"] for t in config["added_tokens_decoder"].values()}
    tiny = build_tiny_tokenizer().added_tokens_decoder.values()
    assert all(token.rstrip == real[token.content] for token in tiny)


def test_processor_save_load_round_trip(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"} <= names
    assert json.loads((tmp_path / "processor_config.json").read_text()) == {
        "auto_map": {"AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor"},
        "processor_class": "Phi3VProcessor",
    }
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["num_crops"] == 4

    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    text = PROMPT.format("<|image_1|>\nWhat is shown?")
    image = _image(500, 300)
    expected, got = tiny_processor(text, [image]), loaded(text, [image])
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.chat_template == tiny_processor.chat_template
    assert loaded.image_processor.to_dict() == tiny_processor.image_processor.to_dict()
    assert loaded.batch_decode(got["input_ids"].clamp(min=0)) == tiny_processor.batch_decode(expected["input_ids"].clamp(min=0))
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=16).image_processor.num_crops == 16


def test_hub_processor_save_load(hub_processor, reference_dir, tmp_path):
    hub_processor.save_pretrained(tmp_path)
    # The Hub's files as they are, but for auto_map entries that name the repo of the code they point at.
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        hub = json.loads((reference_dir / "phi35v_hub_files" / name).read_text())
        hub["auto_map"] = {key: f"microsoft/Phi-3.5-vision-instruct--{value}" for key, value in hub["auto_map"].items()}
        assert json.loads((tmp_path / name).read_text()) == hub, name
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    text = PROMPT.format("<|image_1|>\nWhat is shown in this image?")
    assert loaded.encode_prompt(text, [757]) == hub_processor.encode_prompt(text, [757])


@pytest.mark.parametrize("which", ["tiny_processor", "hub_processor"])
def test_saved_tokenizer_reads_like_transformers_4(which, request, tmp_path):
    """tokenizer_config.json in the Hub's form: transformers 4.4x builds the same tokenizer and chat template."""
    import jinja2
    from helpers import HUB_TOKENIZER_KEYS, tokenizer_like_transformers_4

    processor = request.getfixturevalue(which)
    processor.save_pretrained(tmp_path)
    backend, config = tokenizer_like_transformers_4(tmp_path)
    assert HUB_TOKENIZER_KEYS <= set(config)
    assert not {"backend", "is_local", "local_files_only", "extra_special_tokens"} & set(config)  # transformers 5's
    assert config["auto_map"] == {"AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor"}
    tokenizer = processor.tokenizer
    for text in ["The quick brown fox, 42 dollars!", PROMPT.format("<|image_1|>\nWhat is shown?") + "A cat.<|end|>"]:
        assert backend.encode(text).ids == tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    rendered = jinja2.Environment().from_string(config["chat_template"]).render(messages=messages, add_generation_prompt=False)
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False)
    # and our own loading reads the same files to the same tokenizer
    loaded = Phi3VProcessor.from_pretrained(tmp_path).tokenizer
    assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert loaded.added_tokens_decoder == tokenizer.added_tokens_decoder
    assert loaded.chat_template == tokenizer.chat_template


def test_what_serving_runtimes_call(tiny_processor):
    """vLLM's Phi-3-V support calls these on the processor it loads (the original one's names)."""
    assert tiny_processor.img_tokens[:2] == ["<|image_1|>", "<|image_2|>"]  # what prompts tag images with
    image = _image(500, 300)
    count = tiny_processor.calc_num_image_tokens_from_image_size(width=500, height=300)
    assert count == tiny_processor.image_processor.num_image_tokens(500, 300) == 757  # num_crops 4
    assert tiny_processor(PROMPT.format("<|image_1|>"), [image])["input_ids"].lt(0).sum() == count
