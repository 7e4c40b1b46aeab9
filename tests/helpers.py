"""Small helpers shared by several test files (pytest puts this folder on sys.path)."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, built by `build` once per test run: under pytest-xdist the first worker to ask builds it
    (under a file lock) and the others use that copy. Tests must not write into it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / "built-once" / name, root / "built-once" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            build(folder)
            done.touch()
    return folder


def image_runs(ids: list[int]) -> list[tuple[int, int]]:
    """(value, length) of each run of image ids (< 0)."""
    runs = []
    for i in ids:
        if i < 0 and runs and runs[-1][0] == i:
            runs[-1] = (i, runs[-1][1] + 1)
        elif i < 0:
            runs.append((i, 1))
    return runs


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def identity(row):
    """Rows that are already (conversation, images)."""
    return row


def sample(question: str, answer: str, *images: Image.Image):
    """A single-turn (conversation, images) whose images all belong to the one turn."""
    turn = {"user": question, "assistant": answer}
    if images:
        turn["images"] = list(images)
    return [turn], list(images)


# ----- what readers without our package (transformers 4.4x, vLLM) read in a folder we write

HUB_REPO = "microsoft/Phi-3.5-vision-instruct"
# Keys of the Hub's tokenizer_config.json (microsoft/Phi-3.5-vision-instruct).
HUB_TOKENIZER_KEYS = {
    "add_bos_token", "add_eos_token", "added_tokens_decoder", "additional_special_tokens", "auto_map", "bos_token",
    "chat_template", "clean_up_tokenization_spaces", "eos_token", "legacy", "model_max_length", "pad_token",
    "padding_side", "processor_class", "sp_model_kwargs", "tokenizer_class", "unk_token", "use_default_system_prompt",
}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def tokenizer_like_transformers_4(directory):
    """The tokenizer transformers 4.4x's AutoTokenizer builds from a folder (LlamaTokenizerFast), as a
    `tokenizers.Tokenizer`, and the tokenizer_config.json it read; fails where 4.4x would.

    The rules of `PreTrainedTokenizerBase._from_pretrained` and `LlamaTokenizerFast.__init__` in 4.4x: the
    class comes from `tokenizer_class`; `added_tokens_decoder` maps "id" to `AddedToken(**fields)`; special
    tokens are strings (or AddedToken dicts), `additional_special_tokens` a list of them, `extra_special_tokens`
    a dict (4.49 calls `.keys()` on it); the chat template is read from tokenizer_config.json only (not from
    chat_template.jinja); the post-processor is rebuilt from `add_bos_token` / `add_eos_token`.
    """
    import json
    from pathlib import Path

    from tokenizers import AddedToken, Tokenizer, processors

    directory = Path(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in ("LlamaTokenizer", "LlamaTokenizerFast")
    assert isinstance(config.get("extra_special_tokens", {}), dict)
    decoder = {int(index): AddedToken(**fields) for index, fields in config["added_tokens_decoder"].items()}
    for key in SPECIAL_TOKEN_KEYS:
        assert config.get(key) is None or isinstance(config[key], (str, dict)), key
    assert all(isinstance(token, str) for token in config.get("additional_special_tokens", []))
    assert config["padding_side"] in ("left", "right") and isinstance(config["model_max_length"], int)
    assert isinstance(config["chat_template"], str)

    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for index, token in decoder.items():
        assert backend.token_to_id(token.content) == index, token
    bos, eos = config["bos_token"], config["eos_token"]
    single = ([f"{bos}:0"] if config["add_bos_token"] else []) + ["$A:0"] + ([f"{eos}:0"] if config["add_eos_token"] else [])
    used = ([bos] if config["add_bos_token"] else []) + ([eos] if config["add_eos_token"] else [])
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), special_tokens=[(token, backend.token_to_id(token)) for token in used])
    return backend, config


def check_loads_elsewhere(directory, repo: str = HUB_REPO, model: bool = True) -> None:
    """The folder's configs name the Hub repo of the original code in every auto_map entry (what vLLM and
    transformers 4.x resolve with trust_remote_code), and tokenizer_config.json has the Hub's keys."""
    import json
    from pathlib import Path

    directory = Path(directory)
    files = {"preprocessor_config.json": {"AutoImageProcessor", "AutoProcessor"},
             "processor_config.json": {"AutoProcessor"}, "tokenizer_config.json": {"AutoProcessor"}}
    if model:
        files["config.json"] = {"AutoConfig", "AutoModelForCausalLM"}
    for name, keys in files.items():
        auto_map = json.loads((directory / name).read_text())["auto_map"]
        assert set(auto_map) == keys, name
        assert all(value.startswith(f"{repo}--") and value.removeprefix(f"{repo}--").count(".") == 1
                   for value in auto_map.values()), (name, auto_map)
    assert HUB_TOKENIZER_KEYS <= set(json.loads((directory / "tokenizer_config.json").read_text()))
    tokenizer_like_transformers_4(directory)


def modes_under(folder, umask: int) -> dict[str, str]:
    """Every file and folder below `folder` whose mode is not what `open` / `mkdir` give under `umask`, with its
    mode (empty when all are as the umask says)."""
    import os
    import stat
    from pathlib import Path

    wrong = {}
    for path in [Path(folder), *Path(folder).rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode != expected:
            wrong[str(path.relative_to(folder))] = oct(mode)
    return wrong


def read_only_folder():
    """A context manager giving a new folder that the test cannot write in (deleted after): 0555, and the effective
    user switched to nobody meanwhile when the tests run as root, whom no mode stops."""
    import contextlib
    import os
    import shutil
    import tempfile
    from pathlib import Path

    @contextlib.contextmanager
    def folder():
        path = Path(tempfile.mkdtemp(prefix="read-only-"))  # in /tmp: others may pass through it
        path.chmod(0o555)
        root = os.geteuid() == 0
        try:
            if root:
                os.seteuid(65534)
            yield path
        finally:
            if root:
                os.seteuid(0)
            path.chmod(0o755)
            shutil.rmtree(path)

    return folder()


# Headless Chromium on a closed network: without the background-networking flags its connections are refused.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


def chromium(user_data_dir: Path):
    """Headless Chromium driven by selenium, with a new profile in `user_data_dir` (the system's chromium and
    chromedriver: apt-get install -y chromium chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
