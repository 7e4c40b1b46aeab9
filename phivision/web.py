"""Chat with a model in a browser: a Gradio page served from this machine.

    pip install gradio
    python -m phivision.web --model OUT_DIR                    # a fine-tuned (or merged, or Hub) model
    python -m phivision.web --model BASE --adapter OUT_DIR     # a LoRA run: fine-tuned and base side by side
    python -m phivision.web --model OUT_DIR --host 0.0.0.0 --auth_file users.txt   # reachable from other machines

The page: images or a video to upload (a video's frames are sampled as the UCF-101 recipe samples them,
`phivision.video`), a multi-turn chat whose answers stream in, the generation settings (max new tokens,
greedy or sampling with a temperature, num_crops), stop and clear. The model loads as `python -m
phivision.generate` loads it, and a question is put to it in the same prompt: a greedy answer here is the
answer generate prints. With `--adapter`, each question is answered twice by one loaded model: with the
adapter (fine-tuned) and with it disabled (the base). The run's own evaluation examples (eval_after.json,
with the images the run saved in eval_examples/) are one click away, the expected answer beside the model's.

Safe by default: the page binds 127.0.0.1; another --host needs --auth or --auth_file; no public share link is
ever made; uploads are limited in size and count and decoded by the project's readers (phivision.images,
phivision.video); the server writes only in its own temporary folder, removed when it stops.
"""

# No `from __future__ import annotations`: Gradio reads the handlers' `gr.Request` annotations at run time.
import argparse
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL = "pip install gradio"
LOCAL_HOSTS = {"localhost"}
DECODING = ("greedy", "sample")
MAX_CROPS = 64  # the num_crops slider's top (Phi-4-multimodal's released models use 36)


class UploadError(ValueError):
    """An upload the page cannot use; its message (one line) is shown on the page."""


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    from .generation import add_hardware_flags, add_model_flags

    parser = argparse.ArgumentParser(
        prog="python -m phivision.web",
        description="Chat with a Phi-3.5-vision or Phi-4-multimodal model about images or a video, in a browser "
                    "(a Gradio page; pip install gradio).",
    )
    add_model_flags(parser, "LoRA/QLoRA adapter folder to apply on --model; the page then shows the fine-tuned "
                            "and the base model's answers side by side.")
    parser.add_argument("--examples", default=None, metavar="RUN_DIR",
                        help="The training run whose evaluation examples the page offers (its eval_after.json and "
                             "eval_examples/; default: --adapter, else --model).")
    net = parser.add_argument_group("serving")
    net.add_argument("--host", default="127.0.0.1",
                     help="Address to bind (default 127.0.0.1: this machine only). Any other needs --auth or "
                          "--auth_file.")
    net.add_argument("--port", type=int, default=7860, help="Port to serve on (default 7860).")
    net.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                     help="Ask for this user name and password (required with a non-local --host).")
    net.add_argument("--auth_file", default=None, metavar="FILE",
                     help="Ask for a user name and password from FILE, one USER:PASSWORD per line (keeps the "
                          "password out of the process list).")
    up = parser.add_argument_group("uploads")
    up.add_argument("--max_files", type=int, default=8, help="Most files one question may upload (default 8).")
    up.add_argument("--max_file_mb", type=float, default=20.0, help="Largest upload, in MB (default 20).")
    up.add_argument("--num_frames", type=int, default=8,
                    help="Frames sampled from an uploaded video, evenly spaced (default 8, the UCF-101 recipe's).")
    gen = parser.add_argument_group("generation (the page's initial settings)")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="Longest answer, in tokens (default 64).")
    gen.add_argument("--num_crops", type=int, default=None,
                     help="Max crops per image (default: the processor's; use the value you trained with).")
    add_hardware_flags(parser)
    return parser


def is_local_host(host: str) -> bool:
    """Whether binding `host` keeps the page on this machine (a loopback address or "localhost")."""
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (user, password) pairs of --auth and --auth_file. Raises ValueError (one line naming the flag)."""
    entries = []
    if args.auth is not None:
        entries.append(("--auth", args.auth))
    if args.auth_file is not None:
        try:
            lines = Path(args.auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"--auth_file {args.auth_file}: cannot read it ({e.strerror or e})") from None
        entries += [(f"--auth_file {args.auth_file} line {n}", line.strip())
                    for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
        if not entries or entries[-1][0] == "--auth":
            raise ValueError(f"--auth_file {args.auth_file}: no USER:PASSWORD line in it")
    pairs = []
    for where, entry in entries:
        user, colon, password = entry.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"{where}: expected USER:PASSWORD with both parts non-empty")
        pairs.append((user, password))
    return pairs


def check_args(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Everything about the flags that can be wrong, checked before anything loads: a ValueError (one line naming
    the flag) for the first problem. Returns the login pairs (empty: no login)."""
    for flag in ("max_files", "num_frames", "max_new_tokens", "num_crops", "port"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if args.num_crops is not None and args.num_crops > MAX_CROPS:
        raise ValueError(f"--num_crops must be at most {MAX_CROPS}, got {args.num_crops}")
    if args.max_file_mb <= 0:
        raise ValueError(f"--max_file_mb must be above 0, got {args.max_file_mb}")
    auth = read_auth(args)
    if not auth and not is_local_host(args.host):
        raise ValueError(f"--host {args.host} lets other machines reach the page: give --auth USER:PASSWORD or "
                         f"--auth_file FILE too (or serve on 127.0.0.1)")
    from .data.hub import missing_local_folder

    for flag in ("model", "adapter", "examples"):
        value = getattr(args, flag)
        if value is not None and (missing_local_folder(value) or (flag != "model" and not Path(value).is_dir())):
            raise ValueError(f"--{flag} {value}: no such folder")
    return auth


# ----------------------------------------------------------------------------- uploads

def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` (links resolved) lies inside `folder`."""
    return Path(folder).resolve() in Path(path).resolve().parents


@dataclass
class UploadLimits:
    """What one question may upload."""

    folder: Path  # where the server keeps uploads: nothing outside it is read
    max_files: int = 8
    max_file_mb: float = 20.0
    num_frames: int = 8


def read_uploads(paths: Sequence[str], limits: UploadLimits) -> list[Any]:
    """The images of a question's uploads, in order: an image file is one image, a video `num_frames` frames.

    Raises UploadError, one line naming the file (by its name only), for a file outside the upload folder, too
    many files, a file too large, or one that is neither an image nor a video the readers can decode.
    """
    from .images import open_image
    from .video import VIDEO_EXTENSIONS, read_frames

    if len(paths) > limits.max_files:
        raise UploadError(f"{len(paths)} files uploaded: at most {limits.max_files} per question (--max_files)")
    images = []
    for path in paths:
        name = Path(path).name
        if not is_inside(path, limits.folder) or not Path(path).is_file():
            raise UploadError(f"{name}: not a file uploaded to this page")
        megabytes = Path(path).stat().st_size / 2**20
        if megabytes > limits.max_file_mb:
            raise UploadError(f"{name}: {megabytes:.1f} MB, above the {limits.max_file_mb:g} MB limit (--max_file_mb)")
        if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
            try:
                frames = read_frames(Path(path), limits.num_frames)[0]
            except ImportError:
                raise UploadError(f"{name}: reading videos needs PyAV on the server (pip install av)") from None
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable video"
                raise UploadError(f"{name}: cannot be read as a video ({type(e).__name__}: {e})".replace(
                    str(path), name)) from None
            images += frames
        else:
            try:
                images.append(open_image(path, "upload"))
            except ValueError as e:  # the reader's message, naming the file by its name and not the server's path
                raise UploadError(str(e).replace(str(path), name)) from None
    return images


# ----------------------------------------------------------------------------- the run's examples

@dataclass
class Example:
    """One example of a run's evaluation after training, with the images the run saved for it."""

    row: int
    question: str
    answers: list[str]
    prediction: str  # what the model answered at the end of the run
    images: list[Path] = field(default_factory=list)


def load_examples(run_dir: str | Path | None) -> tuple[list[Example], str]:
    """The examples of `run_dir`'s eval_after.json whose images the run saved (eval_examples/index.json), and a
    line that says what was found (shown on the page)."""
    from .training.report import EVAL_EXAMPLES, EVAL_EXAMPLES_INDEX

    if run_dir is None or not (Path(run_dir) / "eval_after.json").is_file():
        return [], "No evaluation examples: the model folder has no eval_after.json (see --examples)."
    folder = Path(run_dir) / EVAL_EXAMPLES
    try:
        summary = json.loads((Path(run_dir) / "eval_after.json").read_text(encoding="utf-8"))
        index = json.loads((folder / EVAL_EXAMPLES_INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], (f"No evaluation examples: {run_dir} has eval_after.json but no {EVAL_EXAMPLES}/ (a run from "
                    f"before runs saved their examples' images).")
    except (OSError, ValueError) as e:
        return [], f"No evaluation examples: cannot read them ({type(e).__name__}: {e})."
    examples = []
    for example in summary.get("examples", []):
        names = index.get(str(example.get("row")))
        if names is None:
            continue
        # The index names files in its own folder; anything else (a path) is not read.
        paths = [folder / name for name in names if Path(name).name == name and (folder / name).is_file()]
        if len(paths) == len(names):
            examples.append(Example(int(example["row"]), str(example["question"]),
                                    [str(a) for a in example.get("answers", [])], str(example.get("prediction", "")),
                                    paths))
    return examples, f"{len(examples)} evaluation example(s) of {run_dir} (eval_after.json): click one to ask it."


# ----------------------------------------------------------------------------- the model behind the page

@dataclass
class Settings:
    """The page's generation settings, as the page sends them (checked: a client may send anything)."""

    max_new_tokens: int = 64
    decoding: str = "greedy"
    temperature: float = 0.7
    num_crops: int = 1

    def options(self) -> dict[str, Any]:
        """`generate_answers` options; a ValueError (one line) for a value out of range."""
        if not (isinstance(self.max_new_tokens, (int, float)) and 1 <= self.max_new_tokens <= 4096):
            raise ValueError(f"max new tokens must be 1 to 4096, got {self.max_new_tokens}")
        if not (isinstance(self.num_crops, (int, float)) and 1 <= self.num_crops <= MAX_CROPS):
            raise ValueError(f"num_crops must be 1 to {MAX_CROPS}, got {self.num_crops}")
        if self.decoding not in DECODING:
            raise ValueError(f"decoding must be one of {', '.join(DECODING)}, got {self.decoding!r}")
        options: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens), "num_crops": int(self.num_crops),
                                   "num_beams": 1, "do_sample": self.decoding == "sample"}
        if self.decoding == "sample":
            if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 5):
                raise ValueError(f"temperature must be above 0 and at most 5, got {self.temperature}")
            options["temperature"] = float(self.temperature)
        return options


class ChatModel:
    """One loaded model (with its LoRA adapter, if any) answering conversations, one generation at a time."""

    def __init__(self, model, processor, has_adapter: bool) -> None:
        self.model, self.processor, self.has_adapter = model, processor, has_adapter
        self.lock = threading.Lock()  # one generation at a time: the adapter switch is the model's state

    @property
    def default_num_crops(self) -> int:
        return int(self.processor.image_processor.num_crops)

    def answer(self, turns: Sequence[dict[str, Any]], settings: Settings, *, adapter: bool = True,
               stop: threading.Event | None = None) -> Iterator[str]:
        """The last turn's answer as it grows (see `stream_answer`). `turns`: {"user", "images", "assistant"}
        (the last one without "assistant"); `adapter=False` answers with the adapter disabled (the base model)."""
        from .chat import conversation_prompt
        from .generation import stream_answer

        options = settings.options()
        images = [image for turn in turns for image in turn["images"]]
        prompt = conversation_prompt(turns, len(images), self.processor)

        @contextmanager
        def model_as_asked() -> Iterator[None]:  # held by the generation's thread, for that generation only
            with self.lock, (nullcontext() if adapter or not self.has_adapter else self.model.disable_adapter()):
                yield

        yield from stream_answer(self.model, self.processor, prompt, images, stop=stop, context=model_as_asked,
                                 **options)


# ----------------------------------------------------------------------------- the page

SIDES = ("tuned", "base")  # the fine-tuned model (or the only one) and, with --adapter, the base


def new_state() -> dict[str, Any]:
    """A session's conversation: its turns ({"user", "images"}), each side's answers, images of an example."""
    return {"turns": [], "answers": {side: [] for side in SIDES}, "example": None}


def chat_messages(state: dict[str, Any], side: str, pending: str | None = None) -> list[dict[str, str]]:
    """The chatbot value of one side: its turns as messages (`pending`: the answer being generated)."""
    messages = []
    answers = state["answers"][side] + ([] if pending is None else [pending])
    for turn, answer in zip(state["turns"], answers):
        tag = f"[{len(turn['images'])} image(s)] " if turn["images"] else ""
        messages += [{"role": "user", "content": tag + turn["user"]}, {"role": "assistant", "content": answer}]
    return messages


def build_page(chat: ChatModel, examples: list[Example], examples_note: str, limits: UploadLimits,
               title: str, initial: Settings):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    from .images import model_image

    sides = SIDES if chat.has_adapter else SIDES[:1]
    labels = {"tuned": "Fine-tuned (adapter on)" if chat.has_adapter else "Model", "base": "Base (adapter off)"}
    stops: dict[str, threading.Event] = {}  # per browser session answering now: its stop button's flag

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}")
        state = gr.State(new_state)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    boxes = {side: gr.Chatbot(label=labels[side], elem_id=f"chat-{side}", height=420,
                                              render_markdown=False, feedback_options=None, buttons=["copy"])
                             for side in sides}
                status = gr.Markdown("", elem_id="status")
                question = gr.Textbox(label="Question", placeholder="Ask about the images...", elem_id="question",
                                      lines=2)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=2):
                uploads = gr.File(label=f"Images or a video (up to {limits.max_files} files of "
                                        f"{limits.max_file_mb:g} MB; a video gives {limits.num_frames} frames)",
                                  file_count="multiple", type="filepath", elem_id="uploads")
                gallery = gr.Gallery(label="Images of this conversation", elem_id="gallery", height="auto",
                                     columns=4, object_fit="contain", allow_preview=False, interactive=False)
                with gr.Accordion("Generation settings", open=True):
                    max_new_tokens = gr.Slider(1, 1024, value=initial.max_new_tokens, step=1,
                                               label="Max new tokens", elem_id="max-new-tokens")
                    decoding = gr.Radio(list(DECODING), value=initial.decoding, label="Decoding", elem_id="decoding")
                    temperature = gr.Slider(0.05, 2.0, value=initial.temperature, step=0.05,
                                            label="Temperature (sampling)", elem_id="temperature")
                    num_crops = gr.Slider(1, MAX_CROPS, value=initial.num_crops, step=1,
                                          label="num_crops (max crops per image)", elem_id="num-crops")
        gr.Markdown(examples_note, elem_id="examples-note")
        example_list = gr.Dataset(components=["textbox", "textbox"], layout="table",
                                  samples=[[e.question, " | ".join(e.answers)] for e in examples],
                                  headers=["Question", "Expected answer"], type="index", elem_id="examples",
                                  label="Evaluation examples of the run", visible=bool(examples))

        chat_outputs = [boxes[side] for side in sides]

        def view(session_state, note, pending: dict[str, str] | None = None, *, question_value=gr.skip(),
                 uploads_value=gr.skip(), images=True):
            """The outputs of a send: each side's chat (with its answer being generated), the state, the note."""
            pending = pending or {}
            gallery = [i for turn in session_state["turns"] for i in turn["images"]] if images else gr.skip()
            return (*[chat_messages(session_state, side, pending.get(side)) for side in sides], session_state,
                    note, question_value, uploads_value, gallery)

        def respond(files, text, n_tokens, mode, temp, crops, session_state, request: gr.Request):
            """Answers the question with each side in turn, streaming into its chat."""
            text = (text or "").strip()
            if not text:
                yield view(session_state, "Type a question first.", images=False)
                return
            example, session_state["example"] = session_state["example"], None
            settings = Settings(n_tokens, mode, temp, crops)
            try:
                settings.options()
                images = [model_image(path) for path in example.images] if example else []
                images += read_uploads(files or [], limits)
            except (ValueError, OSError) as e:  # the page says why, and keeps serving
                yield view(session_state, f"**Not sent:** {e}", images=False)
                return
            session = request.session_hash
            event = stops[session] = threading.Event()
            turn = {"user": text, "images": images}
            session_state["turns"].append(turn)
            yield view(session_state, "Answering...", {side: "" for side in sides}, question_value="",
                       uploads_value=None)
            failure = None
            for side in sides:
                history = [{**t, "assistant": a} for t, a in zip(session_state["turns"], session_state["answers"][side])]
                answer = ""
                try:
                    waiting = {later: "" for later in sides[sides.index(side) + 1:]}
                    for answer in chat.answer([*history, turn], settings, adapter=side == "tuned", stop=event):
                        if stops.get(session) is not event:  # cleared meanwhile: show nothing more of it
                            return  # (closing the answer's stream ends its generation)
                        yield view(session_state, "Answering...", {**waiting, side: answer}, images=False)
                except Exception as e:  # noqa: BLE001 - the page keeps serving; the note says what failed
                    failure = f"**Generation failed:** {type(e).__name__}: {e}"
                session_state["answers"][side].append(answer)
            if stops.get(session) is not event:
                return
            del stops[session]
            notes = [failure or ("Stopped." if event.is_set() else "")]
            if example is not None:
                notes.append(f"**Expected answer:** {' | '.join(example.answers)}  \n"
                             f"**The run's answer at its evaluation:** {example.prediction}")
            yield view(session_state, "  \n".join(n for n in notes if n), images=False)

        def stop_answering(request: gr.Request):
            if (event := stops.get(request.session_hash)) is not None:
                event.set()

        def clear_all(request: gr.Request):
            if (event := stops.pop(request.session_hash, None)) is not None:
                event.set()  # the answer being generated ends, and its conversation is not shown again
            fresh = new_state()
            return (*[[] for _ in sides], fresh, "", "", None, [])

        def use_example(index: int):
            fresh = new_state()
            if not isinstance(index, int) or not 0 <= index < len(examples):
                return (*[[] for _ in sides], fresh, "No such example.", "", None, [])
            fresh["example"] = examples[index]
            return (*[[] for _ in sides], fresh, "", examples[index].question, None, [])

        inputs = [uploads, question, max_new_tokens, decoding, temperature, num_crops, state]
        outputs = [*chat_outputs, state, status, question, uploads, gallery]
        send.click(respond, inputs, outputs, concurrency_id="model", concurrency_limit=1)
        question.submit(respond, inputs, outputs, concurrency_id="model", concurrency_limit=1)
        stop.click(stop_answering, None, None, queue=False)
        cleared = [*chat_outputs, state, status, question, uploads, gallery]
        clear.click(clear_all, None, cleared, queue=False)
        for box in chat_outputs:  # a chat's own bin button clears the whole conversation, not only what it shows
            box.clear(clear_all, None, cleared, queue=False)
        example_list.click(use_example, example_list, cleared, queue=False).then(
            respond, inputs, outputs, concurrency_id="model", concurrency_limit=1)
    return page


# ----------------------------------------------------------------------------- the command line

def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        auth = check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # No usage data sent anywhere, and Gradio keeps uploads and what it serves in a folder of ours, made before
    # it is imported (it reads the variable at import).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    folder = Path(tempfile.mkdtemp(prefix="phivision-web-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    # Gradio imports matplotlib, which writes a font cache in ~/.cache unless told where: there too.
    os.environ.setdefault("MPLCONFIGDIR", str(folder / "matplotlib"))
    # A SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, so that its folder is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            import gradio  # noqa: F401
        except ImportError:
            print(f"error: the web page needs Gradio: {INSTALL}", file=sys.stderr)
            return 1
        return serve(args, auth, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve(args: argparse.Namespace, auth: list[tuple[str, str]], folder: Path) -> int:
    """Loads the model, builds the page and serves it until interrupted."""
    from .errors import SetupError
    from .generation import load_pretrained

    try:
        model, processor = load_pretrained(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                           attn_implementation=args.attn_implementation)
    except (ValueError, OSError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    chat = ChatModel(model, processor, has_adapter=args.adapter is not None)
    examples, note = load_examples(args.examples or args.adapter or args.model)
    limits = UploadLimits(folder, args.max_files, args.max_file_mb, args.num_frames)
    initial = Settings(args.max_new_tokens, "greedy", 0.7, args.num_crops or chat.default_num_crops)
    title = f"Chat with {args.model}" + (f" + {args.adapter}" if args.adapter else "")
    page = build_page(chat, examples, note, limits, title, initial)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=args.host, server_port=args.port, share=False, auth=auth or None,
                max_file_size=f"{int(args.max_file_mb * 1024)}kb", ssr_mode=False, mcp_server=False,
                enable_monitoring=False, pwa=False, footer_links=[], run_history=False, inbrowser=False,
                show_error=False, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
