"""The Gradio front end of `pixtok serve`: a browser page over the REST API; it holds no model.

Every action is one REST call through serving.client.Client, which finds the server and its key
in the run folder and renews the key when TorchServe rolls it over. Generate streams its request
("stream": true): each sampler step moves a gr.Progress bar, Stop cancels the run (the page is
free at once; the run closes its stream at the next step), "Random seed" draws the seed, and
class buttons and examples under the form fill it in. The page serves the store it is given: a
tab, and a gradio_client API name, only for each task the server serves (Generate /generate,
Classify /classify, Depth /depth), read from the run folder's config.properties and the archives
it names, with a model picker where a task has several models (each endpoint's last input,
`model`). Each model's line (classes, input size, data) and examples come from its archive's
config.json. Uploaded files are forwarded
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
import json
import os
import secrets
import sys
import threading
from dataclasses import dataclass, field
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
from serving.client import Client, ServerError, default_run_dir
from serving.page_settings import (
    CONCURRENCY,
    MODEL_ENV,
    UI_PORT_ENV,
    UI_USER,
    archive_labels,
    examples_dir,
    model_names,
    needs_login,
    request_timeout,
    served_archives,
    served_models,
    ui_login,
    ui_port,
)

TASKS = ("generate", "classify", "depth")      # the page's tabs, in this order
COLOUR_MAP = "viridis_r"       # near is bright, far is dark
IMAGE_HEIGHT = 320
RANDOM_SEEDS = 2**31      # "Random seed" draws from 0..2^31-1: short enough to read and retype
# small images (28x28 Fashion-MNIST, 48x64 depth maps) are shown scaled up, with sharp pixels
CSS = """
#classify-input img, #depth-input img, #depth-output img {
  width: 100% !important; height: 100% !important; object-fit: contain; }
#generate-gallery img, #classify-input img, #depth-input img, #depth-output img {
  image-rendering: pixelated; }
"""


@dataclass
class ServedModel:
    """A served model as the page shows it, from its archive's config.json."""
    name: str
    task: str                           # classify, depth or generate
    labels: list[str] = field(default_factory=list)
    image_size: list[int] | None = None     # [H, W] of its input (classifiers, depth models)
    channels: int | None = None
    dataset: str | None = None          # what it was trained on (config "data": "dataset")


def served_model(name: str, task: str, mar: Path | None) -> ServedModel:
    config = (read_archive_json(mar, "config.json") or {}) if mar else {}
    source = config.get("input") if isinstance(config.get("input"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    size = source.get("image_size")
    return ServedModel(name, task, archive_labels(mar) if mar else [],
                       list(size) if isinstance(size, list) and len(size) == 2 else None,
                       source.get("channels"), data.get("dataset") or data.get("name"))


def page_models(run_dir: Path, preferred: dict | None = None) -> dict[str, list[ServedModel]]:
    """{task: [ServedModel]} for the page's tabs, in TASKS order: what the server of `run_dir`
    serves, as its config.properties lists it (tasks from each archive's config.json), the model
    `preferred` names ({task: name}: a flag or $PIXTOK_CLASSIFIER ...) first. A run folder that
    lists no model (a page pointed at a server by --inference-url alone) gets model_names()."""
    archives = served_archives(run_dir)
    served = served_models(run_dir)
    if not served:
        return {task: [served_model(name, task, archives.get(name))]
                for task, name in model_names(preferred).items()}
    wanted = {k: v for k, v in (preferred or {}).items() if v}
    for task, env in MODEL_ENV.items():
        wanted.setdefault(task, os.environ.get(env))
    found = {}
    for task in TASKS:
        names = served.get(task, [])
        names = sorted(names, key=lambda n: n != wanted.get(task))   # the preferred one first
        if names:
            found[task] = [served_model(n, task, archives[n]) for n in names]
    return found


def describe(model: ServedModel) -> str:
    """One line about a model for its tab: classes, input size and channels, training data."""
    parts = [f"`{model.name}`"]
    if model.labels:
        shown = ", ".join(model.labels[:12]) + (", …" if len(model.labels) > 12 else "")
        parts.append(f"{len(model.labels)} classes: {html.escape(shown)}")
    if model.image_size:
        channels = {1: "grey", 3: "RGB"}.get(model.channels, f"{model.channels} channels")
        parts.append(f"input {model.image_size[0]}×{model.image_size[1]} {channels} "
                     "(other sizes are resized)")
    if model.dataset:
        parts.append(f"trained on {html.escape(str(model.dataset))}")
    return " · ".join(parts)


# --- examples --------------------------------------------------------------------------------
def read_examples(folder: Path) -> dict[str, list[Path]]:
    """{"classify": [...], "depth": [...]}: the example files `pixtok serve` wrote into `folder`
    (training/data/examples.py); the page itself never reads data sets."""
    return {"classify": sorted(folder.glob("fashion-test-*.png")),
            "depth": sorted(folder.glob("scene-*.png"))}


# which example images suit a model trained on which data set: {(task, dataset): examples key}
EXAMPLE_SETS = {("classify", "fashion-mnist"): ("classify", "Fashion-MNIST test images"),
                ("depth", "scenes"): ("depth", "Rendered scenes (training/data/scenes.py)")}


def model_examples(model: ServedModel, examples: dict[str, list[Path]]) -> tuple[list, str]:
    """(example images, their caption) for a model: the run folder's Fashion-MNIST test images
    for a classifier trained on Fashion-MNIST, its rendered scenes for a depth model trained on
    them; none for other models (a user's data is not in the run folder)."""
    key, caption = EXAMPLE_SETS.get((model.task, model.dataset), (None, ""))
    return (examples.get(key, []) if key else []), caption


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
    """The page's actions: each one REST call, its answer turned into what a component shows.
    models: {task: [ServedModel]}, the first of each task its default."""

    def __init__(self, client: Client, models: dict[str, list[ServedModel]]):
        self.client, self.models = client, models
        self.table = colour_table()

    def model(self, task: str, name=None) -> ServedModel:
        """The served model of `task` called `name` (None: the task's first); gr.Error if the
        page does not serve it."""
        import gradio as gr

        served = self.models.get(task, [])
        for model in served:
            if name in (None, "", model.name):
                return model
        raise gr.Error(html.escape(f"{name!r} is not a {task} model of this server; it serves "
                                   f"{', '.join(m.name for m in served) or 'none'}"),
                       title="pixtok", print_exception=False)

    def generate(self, label, seed, sampler, steps, guidance, count, random_seed=False,
                 model=None, progress=None, stop: threading.Event | None = None):
        """class, seed, sampler, steps, guidance, count, random seed?, generator -> ([(image,
        caption), ...], the seed used). The server streams its sampler steps and each one moves
        `progress` (a gr.Progress). When `stop` is set (the page's Stop) it closes the stream
        at the next step and leaves the page as it was (gr.skip)."""
        import gradio as gr

        generator = self.model("generate", model)
        if label is None or str(label).strip() == "":
            raise gr.Error("Choose a class to generate.", print_exception=False)
        label = str(label)
        if label not in generator.labels and label.strip().isdigit():
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
            label, model=generator.name, seed=seed, steps=steps, sampler=sampler,
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

    def classify(self, upload, model=None):
        """an uploaded image, the classifier -> {label: score} of the top k classes"""
        name = self.model("classify", model).name
        try:
            answer = self.client.classify(upload_bytes(upload), model=name)
        except UserError as e:
            raise readable_error(e) from None
        return {t["label"]: t["score"] for t in answer["top_k"]}

    def depth(self, upload, model=None):
        """an uploaded image, the depth model -> (coloured depth map, legend with the range in
        metres)"""
        name = self.model("depth", model).name
        try:
            answer = self.client.depth(upload_bytes(upload), model=name)
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

    def generate(label, seed, sampler, steps, guidance, count, random_seed, model=None,
                 request=None, progress=tracker):
        session = getattr(request, "session_hash", None) or ""
        stops[session] = stop_event = threading.Event()
        try:
            return actions.generate(label, seed, sampler, steps, guidance, count, random_seed,
                                    model, progress, stop_event)
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
MAX_CLASS_BUTTONS = 24       # a generator with more classes shows its first ones as buttons


def model_picker(task: str, models: list[ServedModel]):
    """The tab's model: a dropdown, shown where the server has several models of the task (an
    input of the tab's event either way, so gradio_client may name the model)."""
    import gradio as gr

    return gr.Dropdown([m.name for m in models], value=models[0].name, label="Model",
                       visible=len(models) > 1, elem_id=f"{task}-model")


def model_panels(picker, models: list[ServedModel], fill, extra_outputs=(), extra=None):
    """One column per model, only the picked one visible: fill(model, index) lays out its
    content. extra(model) gives the values of extra_outputs when the pick changes."""
    import gradio as gr

    panels = []
    for i, model in enumerate(models):
        with gr.Column(visible=i == 0, elem_classes="pixtok-model-panel") as panel:
            fill(model, i)
        panels.append(panel)

    def picked(name):
        model = next((m for m in models if m.name == name), models[0])
        shown = [gr.Column(visible=m is model) for m in models]
        return [*shown, *(extra(model) if extra else [])]

    picker.change(picked, picker, [*panels, *extra_outputs], api_visibility="private")


def class_buttons(model: ServedModel, index: int, label, form):
    """The generator's classes as buttons that fill in the Class field, then the example
    requests (one per sampler) that fill in the whole form."""
    import gradio as gr

    suffix = "" if index == 0 else f"-{index}"
    gr.Markdown(describe(model))
    if not model.labels:
        return
    with gr.Row(elem_id=f"generate-classes{suffix}"):
        for name in model.labels[:MAX_CLASS_BUTTONS]:
            button = gr.Button(name, size="sm", min_width=60, elem_classes="pixtok-class")
            # in the browser, no server call: a Generate clicked right after reads the class
            button.click(None, None, label, js=f"() => {json.dumps(name)}",
                         api_visibility="private")
    gr.Examples(generate_examples(model.labels), form, elem_id=f"generate-examples{suffix}",
                label="Examples: click one to fill in the form, then Generate")


def generate_tab(actions: PageActions, models: list[ServedModel]):
    import gradio as gr

    first = models[0]
    with gr.Row():
        with gr.Column(scale=1):
            picker = model_picker("generate", models)
            label = gr.Dropdown(
                first.labels, value=first.labels[0] if first.labels else None, label="Class",
                allow_custom_value=len(models) > 1 or not first.labels, elem_id="generate-class",
                info=None if first.labels else "the generator's classes are unknown here: "
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
                generate = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                stop = gr.Button("Stop", variant="stop", elem_id="generate-stop")
        gallery = gr.Gallery(label="Samples", columns=4, format="png", scale=2,
                             height=IMAGE_HEIGHT + 120, object_fit="contain",
                             buttons=["download", "download_all", "fullscreen"],
                             elem_id="generate-gallery")
    form = [label, seed, sampler, steps, guidance, count]
    model_panels(picker, models, lambda m, i: class_buttons(m, i, label, form), [label],
                 lambda m: [gr.Dropdown(m.labels, value=m.labels[0] if m.labels else None)])
    generate_fn, stop_fn = generate_events(actions)
    running = generate.click(generate_fn, [*form, random_seed, picker], [gallery, seed],
                             api_name="generate", concurrency_limit=CONCURRENCY["generate"])
    # Stop: `cancels` frees the page at once (the run's answer is dropped), and the Event makes
    # the run close its stream at the next step; what the server does then is in
    # docs/serving.md (both stop sampling; TorchServe through the gate)
    stop.click(stop_fn, None, None, cancels=[running], api_visibility="private",
               concurrency_limit=None)


def image_panel(model: ServedModel, image, examples: dict[str, list[Path]]):
    """A model's line (classes, input size, data) and the example images that suit it."""
    import gradio as gr

    gr.Markdown(describe(model))
    files, caption = model_examples(model, examples)
    if files:
        gr.Examples([[str(p)] for p in files], [image], label=caption)


def classify_tab(actions: PageActions, models: list[ServedModel], examples):
    import gradio as gr

    picker = model_picker("classify", models)
    with gr.Row():
        image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                         height=IMAGE_HEIGHT, elem_id="classify-input")
        scores = gr.Label(label="Classes", num_top_classes=5, elem_id="classify-output")
    classify = gr.Button("Classify", variant="primary", elem_id="classify-btn")
    model_panels(picker, models, lambda m, i: image_panel(m, image, examples))
    # preprocess=False: the file goes to the server as uploaded, not re-encoded by Gradio
    classify.click(actions.classify, [image, picker], scores, api_name="classify",
                   preprocess=False, concurrency_limit=CONCURRENCY["classify"])


def depth_tab(actions: PageActions, models: list[ServedModel], examples):
    import gradio as gr

    picker = model_picker("depth", models)
    with gr.Row():
        scene = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                         height=IMAGE_HEIGHT, elem_id="depth-input")
        with gr.Column():
            depth_map = gr.Image(label="Depth", format="png", height=IMAGE_HEIGHT,
                                 buttons=["download", "fullscreen"], elem_id="depth-output")
            legend = gr.HTML(label="Depth range", elem_id="depth-legend")
    estimate = gr.Button("Estimate depth", variant="primary", elem_id="depth-btn")
    model_panels(picker, models, lambda m, i: image_panel(m, scene, examples))
    estimate.click(actions.depth, [scene, picker], [depth_map, legend], api_name="depth",
                   preprocess=False, concurrency_limit=CONCURRENCY["depth"])


TAB_TITLES = {"generate": "Generate", "classify": "Classify", "depth": "Depth"}
TASK_NOUNS = {"generate": "generator", "classify": "classifier", "depth": "depth"}


def build_app(actions: PageActions, examples: dict[str, list[Path]]):
    """The gr.Blocks page: a tab per task the server serves, each event queued with its own
    concurrency limit."""
    import gradio as gr

    models = actions.models
    served = " · ".join(f"{TASK_NOUNS[task]} " + ", ".join(f"`{m.name}`" for m in models[task])
                        for task in TASKS if models.get(task))
    builders = {"generate": lambda ms: generate_tab(actions, ms),
                "classify": lambda ms: classify_tab(actions, ms, examples),
                "depth": lambda ms: depth_tab(actions, ms, examples)}
    with gr.Blocks(title="pixtok", analytics_enabled=False,
                   delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(f"## pixtok — pixel transformers\nServer `{actions.client.base_url}` · "
                    + (served or "no model this page can show"))
        for task in TASKS:
            if models.get(task):
                with gr.Tab(TAB_TITLES[task]):
                    builders[task](models[task])
    return app.queue(max_size=64)


def make_app(run_dir=None, models: dict | None = None, inference_url: str | None = None):
    """(app, examples folder): the page for the server of `run_dir`, with a tab for each task
    it serves. models ({task: name}) picks each task's first model."""
    run_dir = Path(run_dir or default_run_dir()).expanduser()
    client = Client(inference_url, run_dir, timeout=request_timeout())
    served = page_models(run_dir, models)
    print(f"pixtok ui: server {client.base_url}, models "
          f"{ {task: [m.name for m in ms] for task, ms in served.items()} }", flush=True)
    folder = examples_dir(run_dir)
    examples = read_examples(folder)
    return build_app(PageActions(client, served), examples), folder


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
