"""Phi-4-multimodal's image processor and processor against transformers' own (goldens from
tests/golden/make_phi4mm_golden.py, made in a venv with torchvision), plus what ours adds."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phivision.phi4mm import image_processing as image_module
from phivision.phi4mm.image_processing import Phi4MMImageProcessor

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_phi4mm_golden", GOLDEN_DIR / "make_phi4mm_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


@pytest.fixture(scope="module")
def image_golden() -> dict:
    return json.loads((GOLDEN_DIR / "phi4mm" / "image_processor.json").read_text())


@pytest.fixture(scope="module")
def golden_images() -> list:
    return [make_golden.golden_image(*spec) for spec in make_golden.IMAGES]


def _same_uint8_resize_path(golden: dict) -> bool:
    """Whether this CPU resizes uint8 images the way the goldens' CPU did (native uint8 kernel or float)."""
    native = ("AVX2", "AVX512")
    return (golden["cpu_capability"] in native) == image_module._native_uint8_bilinear()


@pytest.mark.parametrize("case_index", range(len(make_golden.CROP_LIMITS)))
def test_image_outputs_equal_transformers(image_golden, golden_images, case_index):
    case = image_golden["cases"][case_index]
    ours = Phi4MMImageProcessor().preprocess(golden_images, num_crops=case["dynamic_hd"])
    mine = make_golden.summarize(ours)
    assert image_golden["images"] == [make_golden.image_name(s) for s in make_golden.IMAGES]
    for key in ("pixel_shape", "image_sizes", "num_img_tokens", "mask_shape"):
        assert mine[key] == case[key], key
    np.testing.assert_array_equal(
        make_golden.unpack_mask(mine["mask"], mine["mask_shape"]),
        make_golden.unpack_mask(case["mask"], case["mask_shape"]),
    )
    assert ours["image_attention_mask"].dtype == torch.float32 and ours["image_sizes"].dtype == torch.long
    if _same_uint8_resize_path(image_golden):
        # One uint8 level is 2/255 after normalisation: a sum within 1e-3 means every pixel level agrees.
        np.testing.assert_allclose(mine["crop_sums"], case["crop_sums"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(mine["samples"], case["samples"], rtol=0, atol=1e-5)
    else:  # the other uint8 path rounds some pixels one level apart
        np.testing.assert_allclose(mine["samples"], case["samples"], rtol=0, atol=2 / 255 + 1e-5)


def test_extreme_aspect_ratio_refused_where_transformers_refuses(image_golden):
    image = make_golden.golden_image(*make_golden.EXTREME)
    for row in image_golden["extreme"]:
        if row["raises"]:
            with pytest.raises(ValueError, match="too extreme an aspect ratio"):
                Phi4MMImageProcessor().preprocess(image, num_crops=row["dynamic_hd"])
        else:
            Phi4MMImageProcessor().preprocess(image, num_crops=row["dynamic_hd"])
    assert any(row["raises"] for row in image_golden["extreme"])


def test_num_image_tokens_from_size_equals_preprocess():
    processor = Phi4MMImageProcessor()
    sizes = [(1, 1), (13, 900), (447, 449), (448, 448), (449, 448), (896, 448), (897, 1), (1000, 10), (640, 480),
             (1920, 1080), (3000, 2000), (4500, 3100), (8000, 50), (50, 8000), (2, 30), (700, 300)]
    for limit in (1, 2, 4, 9, 16, 36):
        for width, height in sizes:
            try:
                counted = processor.num_image_tokens(width, height, num_crops=limit)
            except ValueError:
                with pytest.raises(ValueError):
                    processor.preprocess(np.zeros((height, width, 3), np.uint8), num_crops=limit)
                continue
            layout = processor.crop_layout(width, height, limit)
            # Only the layout matters to the count: a blank image of that size is enough.
            done = processor.preprocess(np.zeros((height, width, 3), np.uint8), num_crops=limit)
            assert done["num_img_tokens"] == [counted], (width, height, limit)
            assert done["image_sizes"].tolist() == [[layout.height, layout.width]]
            # The count is what transformers derives from the attention mask (merged patches + row separators).
            mask = done["image_attention_mask"][0, 1:]
            merged = mask[:, 0::2, 0::2].reshape(layout.rows, layout.cols, 16, 16).transpose(1, 2)
            merged = merged.reshape(layout.rows * 16, layout.cols * 16)
            assert counted == 256 + 1 + int(merged.sum()) + int(merged[:, 0].sum()) + 16


def test_num_crops_is_dynamic_hd(tmp_path):
    """The library sets and reads `image_processor.num_crops` for every family (the recipe saves the limit the
    model was trained with): for Phi-4-MM that is `dynamic_hd`, and it is what gets saved."""
    processor = Phi4MMImageProcessor()
    processor.num_crops = 4
    assert processor.dynamic_hd == 4 and processor.num_crops == 4
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["dynamic_hd"] == 4 and "num_crops" not in saved
    with pytest.raises(ValueError, match="num_crops must be an integer >= 1"):
        processor.num_crops = None
    assert processor.hd_image_size(3000, 2000) == tuple(processor.preprocess(
        np.zeros((2000, 3000, 3), np.uint8))["image_sizes"][0].tolist())


def test_num_crops_defaults_to_dynamic_hd_and_is_checked():
    processor = Phi4MMImageProcessor(dynamic_hd=4)
    assert processor.num_image_tokens(3000, 2000) == processor.num_image_tokens(3000, 2000, num_crops=4)
    assert processor.num_image_tokens(3000, 2000) != processor.num_image_tokens(3000, 2000, num_crops=36)
    with pytest.raises(ValueError, match="num_crops must be an integer >= 1"):
        processor.num_image_tokens(10, 10, num_crops=0)


def test_no_images_gives_empty_batch():
    out = Phi4MMImageProcessor().preprocess([])
    assert out["image_pixel_values"].shape == (0, 1, 3, 448, 448)
    assert out["image_attention_mask"].shape == (0, 1, 32, 32)
    assert out["image_sizes"].shape == (0, 2) and out["num_img_tokens"] == []


def test_resize_matches_float_path_where_uint8_kernel_is_not_used(monkeypatch):
    """Without a native uint8 kernel torchvision resizes in float32 and rounds; so must we."""
    image = torch.from_numpy(np.array(make_golden.golden_image(300, 200, "RGB"))).permute(2, 0, 1).contiguous()
    monkeypatch.setattr(image_module, "_native_uint8_bilinear", lambda: False)
    resized = image_module._resize(image, 150, 333, "bilinear", antialias=True)
    expected = torch.nn.functional.interpolate(image[None].float(), size=[150, 333], mode="bilinear",
                                               align_corners=False, antialias=True).round()[0].to(torch.uint8)
    assert resized.dtype == torch.uint8
    assert torch.equal(resized, expected)


def test_config_round_trip_in_transformers_layout(tmp_path, image_golden):
    processor = Phi4MMImageProcessor(dynamic_hd=16)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    expected = dict(image_golden["config"], dynamic_hd=16)
    assert {k: saved[k] for k in expected} == expected  # every key transformers' class writes, at its values
    loaded = Phi4MMImageProcessor.from_pretrained(tmp_path)
    assert loaded.dynamic_hd == 16 and loaded.size == {"height": 448, "width": 448}
    assert Phi4MMImageProcessor.from_pretrained(tmp_path, dynamic_hd=4).dynamic_hd == 4


# ----- the processor -----


@pytest.fixture(scope="module")
def processor():
    from phivision.phi4mm.tiny import build_tiny_processor

    return build_tiny_processor()


@pytest.fixture(scope="module")
def processor_golden() -> dict:
    return json.loads((GOLDEN_DIR / "phi4mm" / "processor.json").read_text())


def test_prompt_ids_equal_transformers_processor(processor, processor_golden):
    """Each <|image_N|> tag becomes num_img_tokens copies of the image token, as transformers' processor expands
    its image token; text tokenised alike (the goldens ran transformers' AutoProcessor on the tiny checkpoint)."""
    assert processor.image_token == processor_golden["image_token"]
    assert processor.image_token_id == processor_golden["image_token_id"]
    for row in processor_golden["prompts"]:
        images = [make_golden.golden_image(*make_golden.IMAGES[i]) for i in row["images"]]
        ours = processor(row["prompt"], images=images)
        assert ours["input_ids"][0].tolist() == row["input_ids"], row["prompt"]
        assert sorted(ours.keys()) == row["keys"]
        counts = Phi4MMImageProcessor().preprocess(images)["num_img_tokens"] if images else []
        assert processor.encode_prompt(row["prompt"], counts) == row["input_ids"]
        sizes = [image.size for image in images]
        assert processor.num_prompt_tokens(row["prompt"], sizes) == len(row["input_ids"])


def test_chat_layout_is_the_chat_template(processor):
    tokenizer = processor.tokenizer
    user = [{"role": "user", "content": "<|image_1|>What is it?"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == processor.user_turn(
        "<|image_1|>What is it?")
    both = user + [{"role": "assistant", "content": "A dog."}]
    expected = processor.user_turn("<|image_1|>What is it?") + processor.answer_turn("A dog.") + "<|endoftext|>"
    assert tokenizer.apply_chat_template(both, tokenize=False) == expected
    assert processor.user_turn("hi") == "<|user|>hi<|end|><|assistant|>"
    assert processor.answer_turn("yes") == "yes<|end|>"


def test_encode_conversation_labels_answers_only(processor):
    tokenizer = processor.tokenizer
    turns = [{"user": "<|image_1|>What is it?", "assistant": "A dog."},
             {"user": "And <|image_2|>?", "assistant": "A cat."}]
    ids, labels = processor.encode_conversation(turns, [5, 7])
    assert len(ids) == len(labels)
    image_id = processor.image_token_id
    assert ids.count(image_id) == 12 and ids[1:6] == [image_id] * 5  # after <|user|>, image 1's 5 tokens
    answered = [i for i, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(answered) == "A dog.<|end|>A cat.<|end|><|endoftext|>"
    assert labels[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = tokenizer.decode([i for i in ids if i != image_id])
    assert text == ("<|user|>What is it?<|end|><|assistant|>A dog.<|end|>"
                    "<|user|>And ?<|end|><|assistant|>A cat.<|end|><|endoftext|>")
    assert processor.num_conversation_tokens(turns, [(10, 10), (900, 100)], num_crops=1) == len(
        processor.encode_conversation(turns, [Phi4MMImageProcessor().num_image_tokens(10, 10, 1),
                                              Phi4MMImageProcessor().num_image_tokens(900, 100, 1)])[0])
    # Untagged text gets its turn's tags first (the data contract of phivision.chat).
    untagged, _ = processor.encode_conversation([{"user": "What?", "assistant": "No."}], [3])
    assert untagged[1:4] == [image_id] * 3
    with pytest.raises(ValueError, match="turn 1: .*tag"):
        processor.encode_conversation([turns[0], {"user": "<|image_1|>?", "assistant": "x"}], [5, 7])
    with pytest.raises(ValueError, match="<|image_N|> tags"):
        processor.encode_prompt("<|endoftext10|>hi", [])


def test_stop_token_ids_are_end_and_endoftext(processor):
    vocab = processor.tokenizer.get_vocab()
    assert processor.stop_token_ids == [vocab["<|end|>"], vocab["<|endoftext|>"]]
    # <|endoftext|> is also the unk token, as in the real tokenizer: it must not be skipped.
    assert processor.tokenizer.unk_token == "<|endoftext|>"


def test_batch_of_prompts_pads_and_batch_images_pads_crops(processor):
    small, large = make_golden.golden_image(300, 200, "RGB"), make_golden.golden_image(1300, 900, "RGB")
    out = processor(["<|image_1|>a", "no image, longer text here", "<|image_1|><|image_2|>b"],
                    images=[[small], None, [large, small]], padding_side="right", num_crops=4)
    assert out["image_pixel_values"].shape[:2] == (3, 5)  # 1 + 4 crops for the large image
    assert out["attention_mask"][1].sum() < out["attention_mask"][0].numel()
    singles = [processor.image_processor.preprocess(images, num_crops=4) for images in ([small], [large, small])]
    samples = [{name: s[name] for name in ("image_pixel_values", "image_sizes", "image_attention_mask")}
               for s in singles]
    batch = processor.batch_images([samples[0], {"input_ids": [1]}, samples[1]])
    for name in ("image_pixel_values", "image_sizes", "image_attention_mask"):
        assert torch.equal(batch[name], out[name]), name
    assert batch["image_pixel_values"][0, 2:].abs().sum() == 0 and batch["image_attention_mask"][0, 2:].min() == 1
    assert processor.batch_images([{"input_ids": [1]}]) == {}


def test_save_and_load_native_layout(processor, tmp_path):
    from phivision.phi4mm.processing import Phi4MMProcessor

    processor.save_pretrained(tmp_path)
    nested = json.loads((tmp_path / "processor_config.json").read_text())
    assert nested["processor_class"] == "Phi4MultimodalProcessor"
    assert nested["image_processor"]["image_processor_type"] == "Phi4MultimodalImageProcessor"
    assert nested["audio_processor"]["feature_extractor_type"] == "Phi4MultimodalFeatureExtractor"
    merged = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert merged["dynamic_hd"] == 36 and merged["sampling_rate"] == 16000
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["image_token"] == "<|endoftext10|>" and tokenizer_config["audio_token"] == "<|endoftext11|>"
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    loaded = Phi4MMProcessor.from_pretrained(tmp_path, dynamic_hd=4)
    assert loaded.image_processor.dynamic_hd == 4
    # --num_crops is Phi-4-MM's crop limit: the same override under our flag's name, kept off the tokenizer.
    by_flag = Phi4MMProcessor.from_pretrained(tmp_path, num_crops=9)
    assert by_flag.image_processor.dynamic_hd == 9 and "num_crops" not in by_flag.tokenizer.init_kwargs
    assert Phi4MMProcessor.from_pretrained(tmp_path, num_crops=None).image_processor.dynamic_hd == 36
    prompt = "<|user|><|image_1|>hi<|end|><|assistant|>"
    image = make_golden.golden_image(900, 500, "RGB")
    assert torch.equal(loaded(prompt, [image])["input_ids"], processor(prompt, [image], num_crops=4)["input_ids"])
    # Without processor_config.json (a Hub folder from older transformers) the merged file is read, and its
    # speech settings stay out of the image processor's (transformers' own class lets them in).
    (tmp_path / "processor_config.json").unlink()
    merged["sampling_rate"] = 8000
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(merged))
    reloaded = Phi4MMProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.dynamic_hd == 36 and reloaded.audio_processor["sampling_rate"] == 8000
    assert "sampling_rate" not in reloaded.image_processor.to_dict()
    assert reloaded.to_dict()["image_processor"] == processor.to_dict()["image_processor"]


def test_hub_tokenizer_config_naming_gpt2_keeps_the_o200k_split(processor, tmp_path):
    """The Hub's tokenizer_config.json names a GPT-2 tokenizer class (and its placeholders under
    extra_special_tokens); transformers 5's AutoTokenizer then rebuilds the pre-tokenizer with GPT-2's split
    (" 12345" one piece), which is not the model's. We load tokenizer.json as it is."""
    from phivision.phi4mm.processing import Phi4MMProcessor

    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("image_token", "audio_token", "backend"):
        config.pop(key, None)
    config.update(tokenizer_class="GPT2TokenizerFast",
                  extra_special_tokens={"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"})
    config_file.write_text(json.dumps(config))
    loaded = Phi4MMProcessor.from_pretrained(tmp_path)
    split = loaded.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 12345")
    assert [piece for piece, _ in split] == ["x", "Ġ", "123", "45"]
    assert loaded.image_token_id == processor.image_token_id
    text = "<|user|><|image_1|>Total: 12345 dollars?<|end|><|assistant|>"
    assert loaded.encode_prompt(text, [3]) == processor.encode_prompt(text, [3])
