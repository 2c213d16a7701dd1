"""The Gradio page's layout (serving/gradio_app.py): a tab per task the server serves, each with
its model picker, its form and its events.

Each tab's event is a gradio_client API (/generate, /classify, /depth) whose last input is the
model, and is queued with its own concurrency limit. A tab with several models shows the picked
one's line and examples; the Generate tab's class buttons and example requests fill in its form.
Small images are shown scaled up with sharp pixels (CSS).
"""
from __future__ import annotations

import json
from pathlib import Path

from pixtok.inference.validate import (
    GENERATE_DEFAULTS,
    MAX_IMAGES,
    MAX_STEPS,
    SAMPLERS,
)
from serving.page_actions import PageActions, generate_events
from serving.page_models import (
    TASKS,
    ServedModel,
    describe,
    generate_examples,
    model_examples,
)
from serving.page_settings import CONCURRENCY

IMAGE_HEIGHT = 320
# small images (28x28 Fashion-MNIST, 48x64 depth maps) are shown scaled up, with sharp pixels
CSS = """
#classify-input img, #depth-input img, #depth-output img {
  width: 100% !important; height: 100% !important; object-fit: contain; }
#generate-gallery img, #classify-input img, #depth-input img, #depth-output img {
  image-rendering: pixelated; }
"""
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
