"""What the Gradio page's buttons do (serving/gradio_app.py): each action is one REST call
through serving.client.Client, its answer turned into what a component shows.

Generate streams its request ("stream": true): each sampler step moves a gr.Progress bar, and
Stop (the same browser session's) makes the run close its stream at the next step. Classify and
Depth forward the uploaded file as it is, so a file that is not an image gets the server's own
message; a depth answer is coloured (near bright, far dark) with a legend in metres. A refusal
of the server shows as gr.Error with its JSON message.
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import secrets
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from pixtok.errors import UserError
from pixtok.inference.validate import GENERATE_DEFAULTS
from serving.client import Client, ServerError
from serving.page_models import ServedModel

COLOUR_MAP = "viridis_r"       # near is bright, far is dark
RANDOM_SEEDS = 2**31      # "Random seed" draws from 0..2^31-1: short enough to read and retype


# --- depth colouring ------------------------------------------------------------------------------
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


# --- the three actions ----------------------------------------------------------------------------
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
