"""The KServe server's models (serving/kserve_server.py): one kserve.Model per task
(classifier, depth, generator), as thin as our TorchServe handlers, over pixtok's inference core
(pixtok/inference/), and their loading from the model store.

Each model answers our REST routes as TorchServe's handler does (a generator's streamed request
as events, one per sampler step) and the v2 protocol with typed tensors (serving/kserve_v2.py);
both go through the model's batcher (serving/kserve_batching.py). A model is loaded from its
archive, unpacked into the run folder's tmp/kserve-models/. The kserve.Model subclasses are made
by make_model_classes, so importing this module needs no kserve (kserve reads sys.argv when it
is imported).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
from fastapi import Request

from pixtok.archive import read_archive_json
from pixtok.inference.handler_base import v2_generate_body
from pixtok.inference.validate import RequestError
from pixtok.tasks import served_tasks
from serving.kserve_batching import Batcher, first_error
from serving.kserve_v2 import V2Error, bad, clip, image_files, input_array, only_input, tensor

log = logging.getLogger("pixtok.kserve")

# task -> (batch size, max batch delay in ms): TorchServe's, from the task registry
BATCHING = {name: (t.serving.batching["batchSize"], t.serving.batching["maxBatchDelay"])
            for name, t in served_tasks().items()}


def kserve_model_base():
    from kserve import Model

    return Model


class PixtokModel:
    """What the three task models share: REST answers, v2 parsing, batching, metadata."""

    task = ""
    device = "cpu"
    inputs: list[dict] = []
    outputs: list[dict] = []

    def setup(self, core, batch_size: int, delay_ms: float):
        self.core = core
        self.backend = getattr(getattr(core, "backend", None), "name", "torch")
        self.batcher = Batcher(self.run, batch_size, delay_ms / 1000, self.name)
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return self.inputs

    def get_output_types(self) -> list[dict]:
        return self.outputs

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # REST: one request, one item; the answer as TorchServe's handler gives it
    async def rest(self, body: bytes, content_type: str | None) -> tuple[dict, int]:
        item = await self.in_thread(self.core.preprocess, body, content_type)
        return await self.answer(item)

    async def answer(self, item) -> tuple[dict, int]:
        [result], batch_size = await self.batcher.submit([item])
        error = first_error([result])
        if error:
            raise error
        return self.rest_answer(result), batch_size

    async def stream(self, item: dict, request: Request):
        """A request that asked for a stream -> its events as they come: ("step", {"step",
        "total"}, batch size) per sampler step, then ("done", answer or RequestError, batch
        size). When the client has gone the generation stops at its next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def on_step(step: int, total: int):          # on the model's thread
            if gone.is_set():
                return False
            loop.call_soon_threadsafe(events.put_nowait, (
                "step", {"step": step, "total": total}, self.batcher.running))
            return None

        async def run():
            try:
                answer, size = await self.answer({**item, "on_step": on_step})
                events.put_nowait(("done", answer, size))
            except RequestError as e:
                if e.type == "cancelled":
                    log.info("pixtok: %s: %s", self.name, e.message)
                events.put_nowait(("done", e, self.batcher.running))

        task = loop.create_task(run())
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), 1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event[0] == "done":
                    return
        finally:
            gone.set()       # the client left, or the answer is out: no more steps to anyone
            if not task.done():
                task.add_done_callback(lambda t: t.exception())    # never "never retrieved"

    # v2: one request, its inputs one batch; any bad input fails the request with its 4xx
    async def predict(self, payload, headers=None, response_headers=None):
        from kserve import InferRequest, InferResponse

        if not isinstance(payload, InferRequest):
            raise V2Error(400, f"model {self.name!r} speaks the v2 protocol: POST "
                          f"/v2/models/{self.name}/infer")
        try:
            items = await self.in_thread(self.v2_items, payload)
            results, _ = await self.batcher.submit(items)
            error = first_error(results)
            if error:
                raise error
            outputs, parameters = self.v2_outputs(items, results)
        except RequestError as e:
            raise V2Error(e.code, e.message, getattr(e, "headers", None)) from None
        except V2Error:
            raise
        except FloatingPointError as e:     # the model's fault, not the client's
            raise V2Error(500, str(e)) from None
        except Exception as e:       # a decoder failing in a way we did not foresee
            log.error("pixtok: could not answer a v2 request: %s", clip(str(e), 300))
            raise V2Error(400, f"could not read the request ({type(e).__name__})") from None
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=outputs, parameters=parameters,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


def make_model_classes() -> dict:
    """{task: its kserve.Model subclass}, made here, so importing this module needs no kserve."""
    Model = kserve_model_base()
    return {"classify": classifier_class(Model), "depth": depth_class(Model),
            "generate": generator_class(Model)}


def classifier_class(Model):
    class ClassifierModel(PixtokModel, Model):
        """`image` BYTES [N] or `pixels` UINT8 [N, H, W, C] -> `probabilities` FP32 [N, K] and
        `label` BYTES [N]; REST: an image -> {"label", "index", "score", "top_k"}."""

        task = "classify"

        def __init__(self, name: str, core, batch_size: int, delay_ms: float):
            Model.__init__(self, name)
            self.setup(core, batch_size, delay_ms)
            k = len(core.labels)
            self.inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                           {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
            self.outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}]

        def run(self, items):
            return list(self.core.probabilities(items))

        def rest_answer(self, probs):
            return self.core.postprocess(probs)

        def v2_items(self, request):
            files = image_files(only_input(request, ("image", "pixels")))
            return [self.core.preprocess(f, "application/octet-stream") for f in files]

        def v2_outputs(self, items, results):
            probs = np.stack(results).astype(np.float32)
            if not np.isfinite(probs).all():
                raise FloatingPointError("the model produced non-finite scores")
            labels = np.array([self.core.labels[i] for i in probs.argmax(axis=1)],
                              dtype=object)
            return [tensor("probabilities", "FP32", probs), tensor("label", "BYTES", labels)], None

    return ClassifierModel


def depth_class(Model):
    class DepthModel(PixtokModel, Model):
        """`image` or `pixels` as a classifier's -> `depth` FP32 [N, H, W] in metres at the
        images' size (one size per request); REST: an image -> {"width", ..., "depth_png"}."""

        task = "depth"

        def __init__(self, name: str, core, batch_size: int, delay_ms: float):
            Model.__init__(self, name)
            self.setup(core, batch_size, delay_ms)
            self.inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                           {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
            self.outputs = [{"name": "depth", "datatype": "FP32", "shape": [-1, -1, -1]}]

        def run(self, items):
            return self.core.depth_maps(items)

        def rest_answer(self, depth_m):
            return self.core.postprocess(depth_m)

        def v2_items(self, request):
            files = image_files(only_input(request, ("image", "pixels")))
            items = [self.core.preprocess(f, "application/octet-stream") for f in files]
            sizes = sorted({size for _, size in items})
            if len(sizes) > 1:
                raise RequestError(400, "bad_input", "the images of one request must have one "
                                   f"size (depth is [N, H, W]); got {sizes}")
            return items

        def v2_outputs(self, items, results):
            depth = np.stack(results).astype(np.float32)
            if not np.isfinite(depth).all():
                raise FloatingPointError("the model produced non-finite depths")
            return [tensor("depth", "FP32", depth)], {"unit": "m"}

    return DepthModel


def generator_class(Model):
    class GeneratorModel(PixtokModel, Model):
        """`label` BYTES/INT64, `seed`, `steps`, `num_images` INT64, `sampler` BYTES, `guidance`
        FP32 (or the Hugging Face names) -> `images` BYTES [num_images], base64 PNGs; REST: the
        JSON body of docs/architecture.md -> {"images", "label", "seed", ...}."""

        task = "generate"

        def __init__(self, name: str, core, batch_size: int, delay_ms: float):
            Model.__init__(self, name)
            self.setup(core, batch_size, delay_ms)
            one = [1]
            self.inputs = [{"name": "label", "datatype": "BYTES", "shape": one},
                           {"name": "seed", "datatype": "INT64", "shape": one},
                           {"name": "steps", "datatype": "INT64", "shape": one},
                           {"name": "num_images", "datatype": "INT64", "shape": one},
                           {"name": "sampler", "datatype": "BYTES", "shape": one},
                           {"name": "guidance", "datatype": "FP32", "shape": one}]
            self.outputs = [{"name": "images", "datatype": "BYTES", "shape": [-1]}]

        def run(self, items):
            # a streamed REST request carries its step callback (PixtokModel.stream)
            return self.core.predict(items, progress=lambda j, step, total:
                                     items[j]["on_step"](step, total))

        def rest_answer(self, answer):
            return answer

        def v2_items(self, request):
            inputs = []
            for item in request.inputs:
                data = input_array(item, object if item.datatype == "BYTES" else None).ravel()
                if data.size != 1:
                    raise bad(item.name, f"expected one value, got {data.size}")
                value = data[0]
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                inputs.append({"name": item.name, "datatype": item.datatype,
                               "data": value if item.datatype == "BYTES" else [value]})
            return [self.core.preprocess(v2_generate_body(inputs), "application/json")]

        def v2_outputs(self, items, results):
            answer = results[0]
            images = np.array(answer["images"], dtype=object)
            params = {k: answer[k] for k in ("label", "seed", "steps", "sampler", "guidance")}
            return [tensor("images", "BYTES", images)], params

    return GeneratorModel


# --- loading the model store ----------------------------------------------------------------------
def archives(store: Path) -> dict[str, tuple[Path, str]]:
    """{model name: (archive, task)} for the .mar archives in the store (named by manifest)."""
    found = {}
    for mar in sorted(Path(store).glob("*.mar")):
        manifest = read_archive_json(mar, "MAR-INF/MANIFEST.json") or {}
        name = manifest.get("model", {}).get("modelName", mar.stem)
        task = (read_archive_json(mar, "config.json") or {}).get("task", "classify")
        found[name] = (mar, task)
    return found


def unpack(mar: Path, into: Path) -> Path:
    """An archive's files (config.json, weights) unpacked into a fresh folder."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with zipfile.ZipFile(mar) as z:
        for member in z.namelist():
            if member.startswith(("config.json", "index_to_name.json")) or \
                    member.endswith((".safetensors", ".onnx")):
                z.extract(member, into)     # zipfile drops absolute paths and ".." parts
    return into


def load_models(store: Path, run_dir: Path, only: list[str] | None, batch_size: int | None,
                delay_ms: float | None, queue_size: int | None = None) -> list:
    from pixtok.inference.core import load_core
    from pixtok.inference.runtime import describe_backend, pick_device

    classes = make_model_classes()
    device = pick_device(0)
    models = []
    for name, (mar, task) in archives(store).items():
        if only and name not in only:
            continue
        folder = unpack(mar, run_dir / "tmp" / "kserve-models" / name)
        size, delay = BATCHING.get(task, BATCHING["classify"])
        core = load_core(task, folder, device)
        models.append(classes[task](name, core, batch_size or size,
                                    delay if delay_ms is None else delay_ms))
        models[-1].batcher.max_waiting = queue_size
        models[-1].device = device.type
        log.info("pixtok: %s (%s) ready on %s (%s)", name, task, device,
                 describe_backend(getattr(core, "backend", None)))
    return models
