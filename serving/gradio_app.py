"""The Gradio front end of `pixtok serve`: a browser page over the REST API; it holds no model.

Every action is one REST call through serving.client.Client, which finds the server and its key
in the run folder and renews the key when TorchServe rolls it over. Generate streams its request
("stream": true): each sampler step moves a gr.Progress bar, Stop cancels the run (the page is
free at once; the run closes its stream at the next step), "Random seed" draws the seed, and
examples under the form fill it in. Tabs and gradio_client API
names: Generate (/generate), Classify (/classify), Depth (/depth). Uploaded files are forwarded
to the server as they are (the event skips Gradio's own image decoding), so a file that is not an
image gets the server's own message. Example inputs live in the run folder (ui/examples/): real
Fashion-MNIST test images (when the Debian data set is installed) and scenes rendered by
training/data/scenes.py. The launcher writes them before it starts the app (it has torch loaded
already); the app writes any that are missing itself.

A page that listens beyond loopback (--host other than 127.0.0.1, ::1, localhost) asks for a
login: user `pixtok`, password $PIXTOK_UI_PASSWORD or the run folder's ui_password file (mode
0600), which `pixtok serve` writes with a fresh password at each start. --login asks for it on
loopback too.

    python -m serving.gradio_app [--host 127.0.0.1] [--port 7860] [--run-dir DIR] [--login]
                                 [--classifier N] [--depth-model N] [--generator N]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import ipaddress
import json
import os
import secrets
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from pixtok.archive import read_archive_json
from pixtok.errors import UserError
from pixtok.inference.validate import (
    GENERATE_DEFAULTS,
    MAX_BODY_BYTES,
    MAX_IMAGES,
    MAX_STEPS,
    SAMPLERS,
)
from serving.client import DEFAULT_MODELS, Client, ServerError, default_run_dir, read_properties

MODEL_ENV = {"classify": "PIXTOK_CLASSIFIER", "depth": "PIXTOK_DEPTH_MODEL",
             "generate": "PIXTOK_GENERATOR"}
UI_PORT_ENV, DEFAULT_UI_PORT = "PIXTOK_UI_PORT", 7860
UI_USER, UI_PASSWORD_ENV, UI_PASSWORD_FILE = "pixtok", "PIXTOK_UI_PASSWORD", "ui_password"
COLOUR_MAP = "viridis_r"       # near is bright, far is dark
CONCURRENCY = {"generate": 2, "classify": 8, "depth": 4}   # TorchServe batches the rest
IMAGE_HEIGHT = 320
RANDOM_SEEDS = 2**31      # "Random seed" draws from 0..2^31-1: short enough to read and retype
# small images (28x28 Fashion-MNIST, 48x64 depth maps) are shown scaled up, with sharp pixels
CSS = """
#classify-input img, #depth-input img, #depth-output img {
  width: 100% !important; height: 100% !important; object-fit: contain; }
#generate-gallery img, #classify-input img, #depth-input img, #depth-output img {
  image-rendering: pixelated; }
"""


def ui_port() -> int:
    value = os.environ.get(UI_PORT_ENV, str(DEFAULT_UI_PORT))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UserError(f"{UI_PORT_ENV}={value!r}: expected a port number 1..65535")
    return int(value)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False     # a host name: it may resolve to any interface


def needs_login(host: str, forced: bool = False) -> bool:
    """The page asks for a login unless it listens on loopback only (or forced)."""
    return forced or not is_loopback(host)


def new_ui_password(run_dir: Path, given: str = "") -> tuple[str, bool]:
    """(password, generated) for a page that asks for a login: `given` ($PIXTOK_UI_PASSWORD),
    else a new random one written to the run folder's ui_password (mode 0600) for this start."""
    path = Path(run_dir) / UI_PASSWORD_FILE
    path.unlink(missing_ok=True)          # never leave an older start's password behind
    if given:
        return given, False
    password = secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password, True


def ui_login(run_dir: Path) -> tuple[str, str]:
    """(user, password) the page asks for: $PIXTOK_UI_PASSWORD, else the run folder's file."""
    password = os.environ.get(UI_PASSWORD_ENV, "")
    path = Path(run_dir) / UI_PASSWORD_FILE
    if not password and path.is_file():
        password = path.read_text().strip()
    if not password:
        raise UserError(f"the page listens beyond loopback and needs a password: set "
                        f"{UI_PASSWORD_ENV}, or start it with `pixtok serve`, which writes {path}")
    return UI_USER, password


def request_timeout() -> float:
    """Seconds to wait for an answer: longer than the slowest model's TorchServe timeout."""
    from serving.launcher import BATCHING

    return 30.0 + max(120, *(b.get("responseTimeout", 120) for b in BATCHING.values()))


def model_names(overrides: dict | None = None) -> dict:
    """{task: model name}: an override, else $PIXTOK_CLASSIFIER / _DEPTH_MODEL / _GENERATOR,
    else the default names of docs/architecture.md."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    return {task: overrides.get(task) or os.environ.get(env) or DEFAULT_MODELS[task]
            for task, env in MODEL_ENV.items()}


# --- what the server serves (read from the run folder, never from the model itself) ---------
def served_archives(run_dir: Path) -> dict[str, Path]:
    """{model name: .mar path} from the config.properties `pixtok serve` wrote; {} without one."""
    config = Path(run_dir) / "config.properties"
    if not config.is_file():
        return {}
    props = read_properties(config)
    try:
        models = json.loads(props.get("models", "{}").replace("\\\\", "\\"))
    except json.JSONDecodeError:
        return {}
    store = Path(props.get("model_store", "").replace("\\\\", "\\"))
    return {name: store / next(iter(versions.values()))["marName"]
            for name, versions in models.items() if versions}


def archive_task(mar: Path) -> str | None:
    return (read_archive_json(mar, "config.json") or {}).get("task")


def served_models(run_dir: Path) -> dict[str, list[str]]:
    """{task: [model names]} of the server of `run_dir`, from its archives' config.json."""
    by_task: dict[str, list[str]] = {}
    for name, mar in sorted(served_archives(run_dir).items()):
        by_task.setdefault(archive_task(mar) or "classify", []).append(name)
    return by_task


def archive_labels(mar: Path) -> list[str]:
    """Class names from an archive's config.json "labels" or its index_to_name.json; [] if none."""
    labels = (read_archive_json(mar, "config.json") or {}).get("labels")
    if isinstance(labels, list) and labels:
        return [str(label) for label in labels]
    index = read_archive_json(mar, "index_to_name.json") or {}
    try:
        return [str(index[k]) for k in sorted(index, key=int)]
    except (ValueError, TypeError):
        return []


# --- examples --------------------------------------------------------------------------------
def examples_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "ui" / "examples"


def read_examples(folder: Path) -> dict[str, list[Path]]:
    """{"classify": [...], "depth": [...]}: the example files `pixtok serve` wrote into `folder`
    (training/data/examples.py); the page itself never reads data sets."""
    return {"classify": sorted(folder.glob("fashion-test-*.png")),
            "depth": sorted(folder.glob("scene-*.png"))}


def generate_examples(labels: list[str]) -> list[list]:
    """Rows of the Generate tab's examples: [class, seed, sampler, steps, guidance, images],
    one per sampler, over the first classes."""
    rows = [(0, 0, "dpm", 20, 4.0, 4), (1, 7, "ddim", 50, 4.0, 2), (2, 42, "euler", 50, 2.0, 1),
            (3, 3, "ddpm", 250, 1.5, 1)]
    return [[labels[i % len(labels)], seed, sampler, steps, guidance, n]
            for i, seed, sampler, steps, guidance, n in rows]


# --- depth colouring -------------------------------------------------------------------------
def colour_table(name: str = COLOUR_MAP) -> np.ndarray:
    """A 256-entry uint8 RGB table (256, 3) of a matplotlib colour map (no pyplot, no GUI)."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def decode_depth(answer: dict) -> np.ndarray:
    """A depth answer's 16-bit PNG in millimetres -> float32 metres (H, W); 0 = no depth."""
    img = Image.open(io.BytesIO(base64.b64decode(answer["depth_png"])))
    return np.asarray(img, dtype=np.float32) / 1000.0


def colourise(depth_m: np.ndarray, lo: float, hi: float, table: np.ndarray) -> np.ndarray:
    """Depth (H, W) in metres -> RGB uint8 (H, W, 3): lo..hi spread over the table, 0 grey."""
    t = np.clip((depth_m - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgb = table[np.round(t * 255).astype(np.int64)]                    # (H, W, 3)
    rgb[depth_m <= 0] = 128
    return rgb


def legend_html(lo: float, hi: float, table: np.ndarray) -> str:
    """A colour bar from lo (near) to hi (far), in metres."""
    stops = ", ".join(f"rgb{tuple(int(c) for c in table[i])} {100 * i / 255:.0f}%"
                      for i in range(0, 256, 51))
    return (f'<div class="pixtok-legend" data-min-m="{lo:.3f}" data-max-m="{hi:.3f}">'
            f'<div style="height:14px;border-radius:3px;background:linear-gradient(to right, '
            f'{stops})"></div><div style="display:flex;justify-content:space-between">'
            f"<span>{lo:.2f} m (near)</span><span>depth in metres</span>"
            f"<span>{hi:.2f} m (far)</span></div></div>")


# --- the three actions -----------------------------------------------------------------------
def readable_error(err: UserError):
    """A client error as gr.Error with the server's JSON message, escaped: gr.Error shows HTML."""
    import gradio as gr

    if isinstance(err, ServerError):
        kind = err.payload.get("type") or "error"
        message = err.payload.get("message") or str(err)
        return gr.Error(html.escape(str(message)), title=f"{err.status} {kind}",
                        print_exception=False)
    return gr.Error(html.escape(str(err)), title="pixtok", print_exception=False)


def upload_bytes(upload) -> bytes:
    """The bytes of an upload: Gradio's file payload, a dict with the path of its cached copy."""
    import gradio as gr

    path = upload.get("path") if isinstance(upload, dict) else None
    if not path:
        raise gr.Error("Upload an image first.", print_exception=False)
    return Path(path).read_bytes()


class PageActions:
    """The page's actions: each one REST call, its answer turned into what a component shows."""

    def __init__(self, client: Client, models: dict, labels: list[str]):
        self.client, self.models, self.labels = client, models, labels
        self.table = colour_table()

    def generate(self, label, seed, sampler, steps, guidance, count, random_seed=False,
                 progress=None, stop: threading.Event | None = None):
        """class, seed, sampler, steps, guidance, count, random seed? -> ([(image, caption),
        ...], the seed used). The server streams its sampler steps and each one moves
        `progress` (a gr.Progress). When `stop` is set (the page's Stop) it closes the stream
        at the next step and leaves the page as it was (gr.skip)."""
        import gradio as gr

        if label is None or str(label).strip() == "":
            raise gr.Error("Choose a class to generate.", print_exception=False)
        label = str(label)
        if label not in self.labels and label.strip().isdigit():
            label = int(label)
        if random_seed:
            seed = secrets.randbelow(RANDOM_SEEDS)
        seed = int(seed if seed is not None else GENERATE_DEFAULTS["seed"])
        steps = int(round(steps))
        # not `progress or ...`: a gr.Progress has a length, 0 until it tracks an iterable
        report = progress if progress is not None else (lambda *a, **k: None)
        report((0, steps), desc=f"seed {seed}: waiting for the server", unit="steps")
        answer = None
        stream = self.client.generate_stream(
            label, model=self.models["generate"], seed=seed, steps=steps, sampler=sampler,
            guidance=float(guidance), num_images=int(round(count)))
        try:
            with contextlib.closing(stream):      # closing it closes the connection
                for item in stream:
                    if stop is not None and stop.is_set():
                        return gr.skip(), gr.skip()
                    if "step" in item:
                        report((item["step"], item["total"]), unit="steps",
                               desc=f"seed {seed}: step {item['step']} of {item['total']}")
                    else:
                        answer = item
        except UserError as e:
            raise readable_error(e) from None
        images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in answer["images"]]
        return ([(img, f"{answer['label']} · seed {answer['seed']} · #{i}")
                 for i, img in enumerate(images)], answer["seed"])

    def classify(self, upload):
        """an uploaded image -> {label: score} of the top k classes"""
        try:
            answer = self.client.classify(upload_bytes(upload), model=self.models["classify"])
        except UserError as e:
            raise readable_error(e) from None
        return {t["label"]: t["score"] for t in answer["top_k"]}

    def depth(self, upload):
        """an uploaded image -> (coloured depth map, legend with the range in metres)"""
        try:
            answer = self.client.depth(upload_bytes(upload), model=self.models["depth"])
        except UserError as e:
            raise readable_error(e) from None
        lo, hi = float(answer["min"]), float(answer["max"])
        rgb = colourise(decode_depth(answer), lo, hi, self.table)
        return Image.fromarray(rgb), legend_html(lo, hi, self.table)


def generate_events(actions: PageActions):
    """(generate, stop): the Generate tab's two event functions. Each run gets a gr.Progress
    and an Event that the same browser session's Stop sets."""
    import gradio as gr

    tracker = gr.Progress()      # Gradio hands each run its own, by this default
    # {browser session: the Event of its running generation}. Keyed by gr.Request, not a
    # gr.State: a State makes Gradio hold a heartbeat connection open for every page
    stops: dict[str, threading.Event] = {}

    def generate(label, seed, sampler, steps, guidance, count, random_seed, request=None,
                 progress=tracker):
        session = getattr(request, "session_hash", None) or ""
        stops[session] = stop_event = threading.Event()
        try:
            return actions.generate(label, seed, sampler, steps, guidance, count, random_seed,
                                    progress, stop_event)
        finally:
            if stops.get(session) is stop_event:
                del stops[session]

    def stop(request=None):
        event = stops.get(getattr(request, "session_hash", None) or "")
        if event is not None:
            event.set()

    # Gradio hands a gr.Request to a parameter annotated with it; this module's annotations are
    # strings (from __future__) that cannot name gr, so the class is set here
    generate.__annotations__["request"] = stop.__annotations__["request"] = gr.Request
    return generate, stop


# --- the page --------------------------------------------------------------------------------
# One function over 60 lines on purpose: a gr.Blocks layout is read top to bottom as the page
# shows it (tabs, their inputs and outputs, then the events that join them).
def build_app(actions: PageActions, examples: dict[str, list[Path]]):
    """The gr.Blocks page: three tabs, each event queued with its own concurrency limit."""
    import gradio as gr

    models, labels = actions.models, actions.labels
    with gr.Blocks(title="pixtok", analytics_enabled=False,
                   delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(f"## pixtok — pixel transformers\nServer `{actions.client.base_url}` · "
                    f"generator `{models['generate']}` · classifier `{models['classify']}` · "
                    f"depth `{models['depth']}`")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    label = gr.Dropdown(
                        labels, value=labels[0] if labels else None, label="Class",
                        allow_custom_value=not labels,
                        info=None if labels else "the generator's classes are unknown here: "
                                                 "type a class name or index")
                    with gr.Row():
                        seed = gr.Number(GENERATE_DEFAULTS["seed"], label="Seed", precision=0,
                                         minimum=0, elem_id="generate-seed", scale=3)
                        random_seed = gr.Checkbox(False, label="Random seed", scale=1,
                                                  elem_id="generate-random-seed",
                                                  info="a new seed each time; shown above")
                    sampler = gr.Radio(list(SAMPLERS), value=GENERATE_DEFAULTS["sampler"],
                                       label="Sampler", elem_id="generate-sampler")
                    steps = gr.Slider(1, MAX_STEPS, GENERATE_DEFAULTS["steps"], step=1,
                                      label="Steps", elem_id="generate-steps")
                    guidance = gr.Slider(0.0, 20.0, GENERATE_DEFAULTS["guidance"], step=0.25,
                                         label="Guidance")
                    count = gr.Slider(1, MAX_IMAGES, GENERATE_DEFAULTS["num_images"], step=1,
                                      label="Images", elem_id="generate-count")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary",
                                             elem_id="generate-btn")
                        stop = gr.Button("Stop", variant="stop", elem_id="generate-stop")
                gallery = gr.Gallery(label="Samples", columns=4, format="png", scale=2,
                                     height=IMAGE_HEIGHT + 120, object_fit="contain",
                                     buttons=["download", "download_all", "fullscreen"],
                                     elem_id="generate-gallery")
            form = [label, seed, sampler, steps, guidance, count]
            if labels:
                gr.Examples(generate_examples(labels), form, elem_id="generate-examples",
                            label="Examples: click one to fill in the form, then Generate")

            generate_fn, stop_fn = generate_events(actions)
            running = generate.click(generate_fn, [*form, random_seed], [gallery, seed],
                                     api_name="generate",
                                     concurrency_limit=CONCURRENCY["generate"])
            # Stop: `cancels` frees the page at once (the run's answer is dropped), and the
            # Event makes the run close its stream at the next step; what the server does then
            # is in docs/serving.md (both stop sampling; TorchServe through the gate)
            stop.click(stop_fn, None, None, cancels=[running], api_visibility="private",
                       concurrency_limit=None)
        with gr.Tab("Classify"):
            with gr.Row():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                 height=IMAGE_HEIGHT, elem_id="classify-input")
                scores = gr.Label(label="Classes", num_top_classes=5, elem_id="classify-output")
            classify = gr.Button("Classify", variant="primary", elem_id="classify-btn")
            if examples.get("classify"):
                gr.Examples([[str(p)] for p in examples["classify"]], [image],
                            label="Fashion-MNIST test images")
            # preprocess=False: the file goes to the server as uploaded, not re-encoded by Gradio
            classify.click(actions.classify, image, scores, api_name="classify",
                           preprocess=False, concurrency_limit=CONCURRENCY["classify"])
        with gr.Tab("Depth"):
            with gr.Row():
                scene = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                 height=IMAGE_HEIGHT, elem_id="depth-input")
                with gr.Column():
                    depth_map = gr.Image(label="Depth", format="png", height=IMAGE_HEIGHT,
                                         buttons=["download", "fullscreen"],
                                         elem_id="depth-output")
                    legend = gr.HTML(label="Depth range", elem_id="depth-legend")
            estimate = gr.Button("Estimate depth", variant="primary", elem_id="depth-btn")
            if examples.get("depth"):
                gr.Examples([[str(p)] for p in examples["depth"]], [scene],
                            label="Rendered scenes (training/data/scenes.py)")
            estimate.click(actions.depth, scene, [depth_map, legend], api_name="depth",
                           preprocess=False, concurrency_limit=CONCURRENCY["depth"])
    return app.queue(max_size=64)


def make_app(run_dir=None, models: dict | None = None, inference_url: str | None = None):
    """(app, examples folder): the page for the server of `run_dir`."""
    run_dir = Path(run_dir or default_run_dir()).expanduser()
    client = Client(inference_url, run_dir, timeout=request_timeout())
    models = model_names(models)
    mar = served_archives(run_dir).get(models["generate"])
    labels = archive_labels(mar) if mar else []
    print(f"pixtok ui: server {client.base_url}, models {models}, "
          f"{len(labels)} generator classes", flush=True)
    folder = examples_dir(run_dir)
    examples = read_examples(folder)
    return build_app(PageActions(client, models, labels), examples), folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.gradio_app",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help=f"default ${UI_PORT_ENV} or 7860")
    parser.add_argument("--run-dir", default=None, help="the server's run folder")
    parser.add_argument("--inference-url", default=None, help="default: from the run folder")
    parser.add_argument("--classifier", default=None, help=f"default ${MODEL_ENV['classify']}")
    parser.add_argument("--depth-model", default=None, help=f"default ${MODEL_ENV['depth']}")
    parser.add_argument("--generator", default=None, help=f"default ${MODEL_ENV['generate']}")
    parser.add_argument("--login", action="store_true",
                        help="ask for a login on loopback too (always asked beyond it)")
    args = parser.parse_args(argv)
    # no usage statistics, version checks or hub calls from this process (before gradio loads)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        port = args.port or ui_port()
        run_dir = Path(args.run_dir or default_run_dir()).expanduser()
        auth = ui_login(run_dir) if needs_login(args.host, args.login) else None
        app, examples = make_app(args.run_dir, {"classify": args.classifier,
                                                    "depth": args.depth_model,
                                                    "generate": args.generator},
                                     args.inference_url)
    except UserError as e:
        print(f"pixtok ui: {e}", file=sys.stderr)
        return 2
    print(f"pixtok ui: serving http://{args.host}:{port}/"
          + (f" (login: user {UI_USER})" if auth else ""), flush=True)
    # Gradio's login is a form over plain HTTP: beyond a trusted network, put TLS in front
    app.launch(server_name=args.host, server_port=port, share=False, show_error=False,
               auth=auth, auth_message="pixtok: log in as user 'pixtok'" if auth else None,
               ssr_mode=False, mcp_server=False, pwa=False, footer_links=["api", "settings"],
               allowed_paths=[str(examples)], max_file_size=MAX_BODY_BYTES, quiet=True,
               css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
