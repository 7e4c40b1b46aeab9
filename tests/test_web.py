"""phivision.web: the chat page's pieces without a browser (flags, host/auth refusal, uploads, examples, streaming),
then the page itself in headless Chromium: answers equal to `python -m phivision.generate`, a second turn, the
LoRA's two sides, a bad upload, an evaluation example."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from PIL import Image
from test_generate import adapter  # noqa: F401 - the fixture: a LoRA adapter of the tiny model that changes answers
from helpers import chromium
from videos import write_clip, write_garbage

from phivision import web
from phivision.chat import conversation_prompt
from phivision.generation import generate_answers, load_pretrained, stream_answer, web_command
from phivision.training.report import save_eval_examples

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape?"
SECOND = "And the background?"
MAX_NEW_TOKENS = 16  # short answers: the browser test generates 8 of them
INSTALL_BROWSER = "apt-get install -y chromium chromium-driver && pip install selenium"


def args(*argv: str):
    return web.build_parser().parse_args(["--model", "m", *argv])


# ----------------------------------------------------------------------------- flags, host and login

def test_every_flag_has_help():
    for action in web.build_parser()._actions:
        assert action.help, action.dest


@pytest.mark.parametrize("host,local", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                                        ("0.0.0.0", False), ("192.168.1.5", False), ("::", False),
                                        ("example.org", False)])
def test_local_hosts(host, local):
    assert web.is_local_host(host) is local


def test_a_non_local_host_asks_for_a_login(tmp_path):
    with pytest.raises(ValueError, match=r"^--host 0.0.0.0 lets other machines reach the page: give --auth"):
        web.check_args(args("--host", "0.0.0.0"))
    assert web.check_args(args("--host", "0.0.0.0", "--auth", "ann:s3:cret")) == [("ann", "s3:cret")]
    users = tmp_path / "users.txt"
    users.write_text("# who may chat\nann:one\n\nbob:two\n")
    assert web.check_args(args("--host", "0.0.0.0", "--auth_file", str(users))) == [("ann", "one"), ("bob", "two")]
    assert web.check_args(args()) == []  # 127.0.0.1: no login asked
    users.write_text("ann\n")
    with pytest.raises(ValueError, match=f"^--auth_file {users} line 1: expected USER:PASSWORD"):
        web.check_args(args("--auth_file", str(users)))
    users.write_text("# nobody\n")
    with pytest.raises(ValueError, match="no USER:PASSWORD line"):
        web.check_args(args("--host", "0.0.0.0", "--auth_file", str(users)))
    with pytest.raises(ValueError, match="^--auth: expected USER:PASSWORD"):
        web.check_args(args("--auth", ":x"))
    with pytest.raises(ValueError, match="cannot read it"):
        web.check_args(args("--auth_file", str(tmp_path / "missing.txt")))
    for flag, value in (("--max_files", "0"), ("--num_frames", "0"), ("--max_file_mb", "0"), ("--num_crops", "65")):
        with pytest.raises(ValueError, match=f"^{flag} must be"):
            web.check_args(args(flag, value))


def test_refusals_come_before_the_model_loads_in_one_line(tiny, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr("phivision.generation.load_pretrained", no_loading)
    assert web.main(["--model", str(tiny), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --host 0.0.0.0 lets other machines reach the page")
    assert web.main(["--model", str(tiny), "--adapter", "no/such/adapter"]) == 2
    assert capsys.readouterr().err == "error: --adapter no/such/adapter: no such folder\n"


@pytest.fixture
def main_in_this_process(monkeypatch, tmp_path):
    """What `web.main` sets in its process (environment variables, a SIGTERM handler), undone after the test."""
    for variable in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.setenv(variable, "")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    monkeypatch.setattr("signal.signal", lambda *a: None)


def test_without_gradio_the_command_says_how_to_install_it(tiny, monkeypatch, capsys, main_in_this_process):
    def no_loading(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr("phivision.generation.load_pretrained", no_loading)
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert web.main(["--model", str(tiny)]) == 1
    assert capsys.readouterr().err == "error: the web page needs Gradio: pip install gradio\n"
    assert not Path(os.environ["GRADIO_TEMP_DIR"]).exists()  # its temporary folder is gone with it


def test_web_command():
    assert web_command("out dir", None, is_adapter=False) == "python -m phivision.web --model 'out dir'"
    assert web_command("out", "base", is_adapter=True, num_crops=4) == (
        "python -m phivision.web --model base --adapter out --num_crops 4")
    with pytest.raises(ValueError, match="base_model"):
        web_command("out", None, is_adapter=True)


def test_the_page_loads_the_model_as_generate_does(tiny, adapter, monkeypatch, capsys,  # noqa: F811
                                                   main_in_this_process):
    """Through generate's loader, with the precision and device flags (which pick bf16/fp16/fp32 per device there)."""
    calls = []

    def loader(*a, **k):
        calls.append((a, k))
        raise ValueError("stop here")

    monkeypatch.setattr("phivision.generation.load_pretrained", loader)
    assert web.main(["--model", str(tiny), "--adapter", str(adapter), "--dtype", "fp16", "--device", "cuda:1",
                     "--attn_implementation", "eager"]) == 1
    assert calls == [((str(tiny), str(adapter)), {"dtype": "fp16", "device": "cuda:1",
                                                  "attn_implementation": "eager"})]
    assert capsys.readouterr().err == "error: stop here\n"
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert not Path(os.environ["GRADIO_TEMP_DIR"]).exists()


# ----------------------------------------------------------------------------- uploads

@pytest.fixture
def uploads(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    return web.UploadLimits(folder, max_files=3, max_file_mb=0.05, num_frames=4)


def test_uploads_are_read_by_the_project_readers(uploads):
    Image.new("RGB", (40, 30), "red").save(uploads.folder / "red.png")
    write_clip(uploads.folder / "sub" / "clip.mp4", 10, "libx264")
    images = web.read_uploads([str(uploads.folder / "red.png"), str(uploads.folder / "sub" / "clip.mp4")], uploads)
    assert [image.size for image in images] == [(40, 30)] + [(64, 48)] * 4  # 4 frames of the video


@pytest.mark.parametrize("make,message", [
    (lambda f: (f / "notes.png").write_text("not an image"),
     r"^upload notes.png: cannot be read as an image \(UnidentifiedImageError: cannot identify image file "
     r"'notes.png'\)$"),
    (lambda f: write_garbage(f / "broken.mp4", size=2000), r"^broken.mp4: cannot be read as a video \("),
    (lambda f: Image.effect_noise((200, 200), 100).convert("RGB").save(f / "big.png"),
     r"^big.png: 0.1 MB, above the 0.05 MB limit \(--max_file_mb\)$"),
])
def test_bad_uploads_are_one_line_naming_the_file(uploads, make, message):
    make(uploads.folder)
    (path,) = [p for p in uploads.folder.iterdir()]
    with pytest.raises(web.UploadError, match=message):
        web.read_uploads([str(path)], uploads)


def test_upload_limits_and_paths(uploads, tmp_path):
    Image.new("RGB", (8, 8)).save(uploads.folder / "a.png")
    with pytest.raises(web.UploadError, match=r"^4 files uploaded: at most 3 per question \(--max_files\)$"):
        web.read_uploads([str(uploads.folder / "a.png")] * 4, uploads)
    # Only what was uploaded into the server's folder is read: not a path elsewhere, nor one that climbs out.
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    for path in (tmp_path / "secret.png", uploads.folder / ".." / "secret.png", Path("/etc/passwd")):
        with pytest.raises(web.UploadError, match="not a file uploaded to this page"):
            web.read_uploads([str(path)], uploads)
    (uploads.folder / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(web.UploadError, match="^link.png: not a file uploaded to this page"):
        web.read_uploads([str(uploads.folder / "link.png")], uploads)


def test_settings_from_the_page_are_checked():
    assert web.Settings(64, "greedy", 0.7, 2).options() == {"max_new_tokens": 64, "num_crops": 2, "num_beams": 1,
                                                            "do_sample": False}
    assert web.Settings(8, "sample", 0.5, 1).options()["temperature"] == 0.5
    for bad, message in ((web.Settings(0, "greedy", 1, 1), "max new tokens"),
                         (web.Settings(8, "beam", 1, 1), "decoding"),
                         (web.Settings(8, "sample", 0, 1), "temperature"),
                         (web.Settings(8, "greedy", 1, 1000), "num_crops"),
                         (web.Settings("8", "greedy", 1, 1), "max new tokens")):
        with pytest.raises(ValueError, match=message):
            bad.options()


# ----------------------------------------------------------------------------- the run's examples

def red_row(index):
    return [{"user": QUESTION, "assistant": "red"}], [Image.new("RGB", (60, 40), (200, 20, 20))]


def write_run_examples(folder: Path) -> dict:
    """eval_after.json as a run writes it (rows 0 and 1; row 1 text-only) and the images the run saves."""
    after = {"metric": "exact_match", "score": 0.0, "num_examples": 2, "examples": [
        {"row": 0, "id": "a", "question": QUESTION, "answers": ["red"], "prediction": "blue", "score": 0.0},
        {"row": 1, "id": "b", "question": "Say the word blue.", "answers": ["blue"], "prediction": "blue",
         "score": 1.0}]}
    (folder / "eval_after.json").write_text(json.dumps(after))
    rows = [0, 1]
    save_eval_examples(rows, lambda r: red_row(r) if r == 0 else ([{"user": "Say the word blue."}], []), after, folder)
    return after


def test_a_runs_examples_with_their_saved_images(tmp_path):
    write_run_examples(tmp_path)
    examples, note = web.load_examples(tmp_path)
    assert note.startswith("2 evaluation example(s)")
    assert [(e.row, e.question, e.answers, e.prediction) for e in examples] == [
        (0, QUESTION, ["red"], "blue"), (1, "Say the word blue.", ["blue"], "blue")]
    assert [p.name for p in examples[0].images] == ["0.0.png"] and examples[1].images == []
    with Image.open(examples[0].images[0]) as saved:  # lossless: the pixels the model was evaluated on
        assert saved.tobytes() == red_row(0)[1][0].tobytes()
    # An index that names a file outside its folder is not followed.
    index = tmp_path / "eval_examples" / "index.json"
    index.write_text(json.dumps({"0": ["../eval_after.json"], "1": []}))
    assert [e.row for e in web.load_examples(tmp_path)[0]] == [1]
    shutil.rmtree(tmp_path / "eval_examples")
    examples, note = web.load_examples(tmp_path)
    assert examples == [] and "no eval_examples/" in note
    assert web.load_examples(tmp_path / "elsewhere")[0] == []


# ----------------------------------------------------------------------------- streaming

@pytest.fixture(scope="module")
def loaded(tiny):
    return load_pretrained(str(tiny))


def test_a_streamed_answer_ends_with_generates_answer_and_stops_when_asked(loaded):
    model, processor = loaded
    image = red_row(0)[1][0]
    prompt = conversation_prompt([{"user": QUESTION}], 1, processor)
    options = dict(num_crops=1, max_new_tokens=12, do_sample=False, num_beams=1)
    expected = generate_answers(model, processor, [prompt], [[image]], **options)[0]
    assert list(stream_answer(model, processor, prompt, [image], **options))[-1] == expected

    # A stop asked for before generation starts: one token, then the end.
    stop = threading.Event()
    stop.set()
    stopped = list(stream_answer(model, processor, prompt, [image], stop=stop, **{**options, "max_new_tokens": 40}))
    tokens = processor.tokenizer(stopped[-1], add_special_tokens=False)["input_ids"]
    assert len(tokens) <= 2
    # A reader that stops reading stops the generation (the thread ends; a next answer runs).
    stream = stream_answer(model, processor, prompt, [image], **options)
    next(stream, None)
    stream.close()
    assert list(stream_answer(model, processor, prompt, [image], **options))[-1] == expected


def test_the_adapter_is_switched_off_on_the_same_model(tiny, adapter):  # noqa: F811
    model, processor = load_pretrained(str(tiny), str(adapter))
    chat = web.ChatModel(model, processor, has_adapter=True)
    turns = [{"user": QUESTION, "images": red_row(0)[1]}]
    settings = web.Settings(10, "greedy", 0.7, 1)
    tuned = list(chat.answer(turns, settings))[-1]
    base = list(chat.answer(turns, settings, adapter=False))[-1]
    alone, alone_processor = load_pretrained(str(tiny))
    assert base == list(web.ChatModel(alone, alone_processor, False).answer(turns, settings))[-1]
    assert tuned != base and list(chat.answer(turns, settings))[-1] == tuned  # the adapter is back on
    # A reader that stops reading the base's answer, without closing it (a browser gone): the adapter is switched
    # off for that generation only, in its own thread, and back on when it ends.
    abandoned = chat.answer(turns, settings, adapter=False)
    next(abandoned)
    assert list(chat.answer(turns, settings))[-1] == tuned
    del abandoned


def test_any_family_answers_on_the_page_as_generate_does(tiny_phi4mm):
    """Phi-4-multimodal: its own chat layout (from its processor), the same answer as `generate`'s."""
    from phivision.generate import answer_prompt

    model, processor = load_pretrained(str(tiny_phi4mm))
    chat = web.ChatModel(model, processor, has_adapter=False)
    image = red_row(0)[1][0]
    expected = answer_prompt(model, processor, QUESTION, [image], stream=False, num_crops=chat.default_num_crops,
                             max_new_tokens=8)
    turns = [{"user": QUESTION, "images": [image]}]
    assert list(chat.answer(turns, web.Settings(8, "greedy", 0.7, chat.default_num_crops)))[-1] == expected


# ----------------------------------------------------------------------------- the page in a browser

def browser_or_skip():
    """Headless Chromium and its profile folder; without a browser the test skips, except in CI (CI=true): it fails."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"no {', '.join(missing)} for the browser test: {INSTALL_BROWSER}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    user_data = Path(tempfile.mkdtemp(prefix="phivision-chromium-"))
    return chromium(user_data), user_data


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no chromium, chromedriver for the browser test: apt-get install"):
        browser_or_skip()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium chromium-driver"):
        browser_or_skip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_cli(*argv: str) -> str:
    """What `python -m phivision.generate` prints (run in this process: the same code as the command)."""
    from phivision.generate import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*argv, "--max_new_tokens", str(MAX_NEW_TOKENS)]) == 0
    return out.getvalue().strip()


def test_chat_in_a_browser(tiny, adapter, tmp_path):  # noqa: F811
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.monotonic()
    run = tmp_path / "run"  # a LoRA run's output: the adapter, its evaluation and the example images
    shutil.copytree(adapter, run)
    write_run_examples(run)
    image = tmp_path / "red.png"
    red_row(0)[1][0].save(image)
    (tmp_path / "notes.png").write_text("a text file, not an image")
    port = free_port()
    cwd = tmp_path / "cwd"  # the server writes nothing outside its temporary folder: not here, nor $TMPDIR, nor $HOME
    (cwd / "tmp").mkdir(parents=True)
    (cwd / "home").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TMPDIR": str(cwd / "tmp"),
           "PYTHONUNBUFFERED": "1", "HOME": str(cwd / "home")}
    env.pop("MPLCONFIGDIR", None)
    driver, user_data = browser_or_skip()
    server = subprocess.Popen([sys.executable, "-m", "phivision.web", "--model", str(tiny), "--adapter", str(run),
                               "--port", str(port), "--max_new_tokens", str(MAX_NEW_TOKENS)],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # While the server starts: the answers `python -m phivision.generate` gives, with the adapter and without.
        tuned = generate_cli("--model", str(tiny), "--adapter", str(run), "--image", str(image), "--prompt", QUESTION)
        # The page's num_crops is the one the adapter's run saved (2), for both sides.
        base = generate_cli("--model", str(tiny), "--image", str(image), "--prompt", QUESTION, "--num_crops", "2")
        assert tuned != base
        # The second turn's answer, with the first exchange as its history (the fine-tuned side).
        model, processor = load_pretrained(str(tiny), str(run))
        turns = [{"user": QUESTION, "images": [Image.open(image)], "assistant": tuned},
                 {"user": SECOND, "images": []}]
        second = generate_answers(model, processor, [conversation_prompt(turns, 1, processor)], [turns[0]["images"]],
                                  num_crops=2, max_new_tokens=MAX_NEW_TOKENS)[0]
        # A message the page replaces between finding it and reading it (Clear, a new answer): read again.
        wait = WebDriverWait(driver, 40, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
        url = f"http://127.0.0.1:{port}/"
        log, serving = [], threading.Event()

        def read_log():  # all of it (a full pipe would block the server); it says its address once it serves
            for line in server.stdout:
                log.append(line)
                if url.rstrip("/") in line:
                    serving.set()

        threading.Thread(target=read_log, daemon=True).start()
        while not serving.wait(0.2):
            assert server.poll() is None, "the server stopped:\n" + "".join(log)
        print(f"serving after {time.monotonic() - start:.1f} s")
        driver.get(url)

        def css(selector):
            return driver.find_element(By.CSS_SELECTOR, selector)

        def answers(side):
            return [m.get_attribute("textContent")
                    for m in driver.find_elements(By.CSS_SELECTOR, f"#chat-{side} [data-testid=bot] .message-content")]

        def uploaded():  # the names in the upload box (shown split over lines)
            return "".join(css("#uploads").get_attribute("textContent").split())

        def ask(question, upload=None, count=1):
            """Sends a question; waits until each side shows `count` answers and the page is idle."""
            if upload is not None:
                css("#uploads input[type=file]").send_keys(str(upload))
                wait.until(lambda d: Path(upload).name in uploaded())
            box = css("#question textarea")
            box.clear()
            box.send_keys(question)
            css("#send").click()
            wait.until(lambda d: all(len(answers(s)) == count for s in web.SIDES) and css("#status").text == "")

        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
        ask(QUESTION, image)
        assert answers("tuned") == [tuned] and answers("base") == [base]  # side by side, as generate answers them

        # A second turn: each side answers with its own history.
        ask(SECOND, count=2)
        assert answers("tuned") == [tuned, second] and answers("base")[0] == base

        # A text file uploaded as an image: a message on the page, nothing sent; then the next question is answered.
        css("#clear").click()
        wait.until(lambda d: answers("tuned") == [])
        css("#uploads input[type=file]").send_keys(str(tmp_path / "notes.png"))
        wait.until(lambda d: "notes.png" in uploaded())
        css("#question textarea").send_keys(QUESTION)
        css("#send").click()
        wait.until(lambda d: "cannot be read as an image" in css("#status").text)
        assert css("#status").text == ("Not sent: upload notes.png: cannot be read as an image "
                                       "(UnidentifiedImageError: cannot identify image file 'notes.png')")
        assert answers("tuned") == []
        css("#clear").click()
        wait.until(lambda d: "notes.png" not in uploaded())
        ask(QUESTION, image)
        assert answers("tuned") == [tuned]

        # The run's first evaluation example, one click away: asked with its saved image, the expected answer shown.
        driver.find_elements(By.CSS_SELECTOR, "#examples tbody tr")[0].click()
        wait.until(lambda d: "Expected answer: red" in css("#status").text)
        assert answers("tuned") == [tuned] and answers("base") == [base]  # its image is the same red picture
        assert "The run's answer at its evaluation: blue" in css("#status").text

        # Stop: a long answer asked for (1024 new tokens) ends early, and says so.
        tokens = css("#max-new-tokens input[type=number]")
        tokens.clear()
        tokens.send_keys("1024", Keys.TAB)
        box = css("#question textarea")
        box.send_keys(SECOND)
        css("#send").click()
        wait.until(lambda d: css("#status").text == "Answering...")
        css("#stop").click()
        wait.until(lambda d: css("#status").text == "Stopped.")
        assert len(answers("tuned")) == 2 and len(answers("tuned")[1]) < 512

        # A video: its 8 frames, sampled as the UCF-101 recipe samples them, are the question's images.
        tokens.clear()
        tokens.send_keys(str(MAX_NEW_TOKENS), Keys.TAB)
        css("#clear").click()
        wait.until(lambda d: answers("tuned") == [])
        ask(QUESTION, write_clip(tmp_path / "clip.mp4", 12, "libx264"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery img")) == 8
        assert css("#chat-tuned [data-testid=user]").get_attribute("textContent").startswith("[8 image(s)] ")

        # Everything the page loaded came from the server: nothing from the internet.
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(name.startswith(url) for name in loaded), loaded
    finally:
        driver.quit()
        shutil.rmtree(user_data, ignore_errors=True)
        server.terminate()
        server.wait(timeout=30)
    assert sorted(str(path.relative_to(cwd)) for path in cwd.rglob("*")) == ["home", "tmp"]
    print(f"browser test: {time.monotonic() - start:.1f} s")
