"""The generator over the REST API of the session's TorchServe, and its archive."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import pixtok
from conftest import LABELS
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from export.archive import ExportError, check_self_contained, export_archive, stage_code
from export.generator import DECODER_PREFIXES
from pixtok.inference.image_generator import load_generator
from pixtok.inference.validate import GENERATE_DEFAULTS, MAX_STEPS, SAMPLERS, parse_generate_request
from pixtok.pipeline import PixelDiTPipeline, make_scheduler
from pixtok.sampling import DEFAULT_STEPS, SAMPLING_DEFAULTS
from serving.client import Response, ServerError, is_key_refused

ROOT = Path(__file__).resolve().parents[1]


def pixels(answer: dict) -> list[np.ndarray]:
    """The answer's images decoded: 16x16 grey PNGs (the tiny VQGAN's output) as uint8 arrays."""
    out = []
    for b64 in answer["images"]:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert (img.format, img.mode, img.size) == ("PNG", "L", (16, 16))
        out.append(np.asarray(img))
    return out


def pipeline_pixels(folder: Path, index: int, n: int, seed: int, steps: int, sampler: str,
                    guidance: float) -> np.ndarray:
    """What PixelDiTPipeline (the `pixtok sample` path) draws for the same request."""
    pipe = PixelDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    images = pipe([index] * n, guidance_scale=guidance, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (images[..., 0] * 255).round().astype(np.uint8)          # (n, H, W)


def test_generator_answers_per_contract(server):
    client = server.client()
    got = client.generate("coat", model="tiny-gen", seed=3, steps=4, sampler="ddpm",
                          guidance=2.5, num_images=2)
    assert set(got) == {"images", "label", "seed", "steps", "sampler", "guidance"}
    assert {k: v for k, v in got.items() if k != "images"} == {
        "label": "coat", "seed": 3, "steps": 4, "sampler": "ddpm", "guidance": 2.5}
    images = pixels(got)
    assert len(images) == 2 and not np.array_equal(*images)
    want = pipeline_pixels(server.generator_checkpoint, 4, 2, 3, 4, "ddpm", 2.5)
    for a, b in zip(images, want):    # another process, maybe another thread count: +-1 level
        assert np.abs(a.astype(int) - b).max() <= 1
    log = (server.run_dir / "logs" / "model_log.log").read_text()
    assert "pixtok: tiny-gen ready" in log and "not self-contained" not in log
    # the launcher built the archive from the pipeline folder and gave it the generator's settings
    props = (server.run_dir / "config.properties").read_text().splitlines()
    models = json.loads(next(line for line in props if line.startswith("models="))[7:])
    (entry,) = models["tiny-gen"].values()      # one version: the checkpoint's date and commit
    assert entry == {**entry, "batchSize": 1,
                                         "responseTimeout": 600}
    assert next(iter(models["tiny-depth"].values()))["batchSize"] == 4


def test_same_seed_same_bytes_and_defaults(server):
    client = server.client()
    first = client.generate(4, model="tiny-gen", seed=11, steps=None)   # None: the default
    again = client.generate("coat", model="tiny-gen", seed=11)
    other = client.generate("4", model="tiny-gen", seed=12)
    assert first == again             # the same request by index or by name: the same bytes
    assert first["images"] != other["images"]
    assert {k: first[k] for k in ("sampler", "steps", "guidance")} == SAMPLING_DEFAULTS
    assert first["label"] == other["label"] == "coat" and len(first["images"]) == 1
    guided = client.generate("coat", model="tiny-gen", seed=11, guidance=1.0)
    assert guided["images"] != first["images"]
    # another sampler without steps: its own step count, as `pixtok sample` does
    assert client.generate(0, model="tiny-gen", sampler="ddim")["steps"] == DEFAULT_STEPS["ddim"]


def test_a_sampler_without_steps_takes_its_own_step_count():
    def steps(body, **kw):
        return parse_generate_request(body, ["a", "b"], **kw)["steps"]
    assert steps({"label": 1}) == SAMPLING_DEFAULTS["steps"]
    assert steps({"label": 1, "sampler": "ddpm"}) == DEFAULT_STEPS["ddpm"] == 250
    assert steps({"label": 1, "sampler": "ddpm", "steps": 7}) == 7
    assert steps({"label": 1, "sampler": "ddpm"}, max_steps=100) == 100
    default = SAMPLING_DEFAULTS["sampler"]
    assert steps({"label": 1, "sampler": default}) == SAMPLING_DEFAULTS["steps"]


BAD_REQUESTS = [   # (body, content type, error type, words in the message)
    (b'{"label": 10}', "application/json", "unknown_label", "out of range 0..9"),
    (b'{"label": "cat"}', "application/json", "unknown_label", "'cat'"),
    (b'{"label": 1, "steps": 0}', "application/json", "bad_field", "steps must be in 1..1000"),
    (b'{"label": 1, "steps": 1001}', "application/json", "bad_field", "1..1000"),
    (b'{"label": 1, "steps": "20"}', "application/json", "bad_field", "steps must be an integer"),
    (b'{"label": 1, "guidance": NaN}', "application/json", "bad_field", "guidance"),
    (b'{"label": 1, "num_images": 17}', "application/json", "bad_field", "num_images"),
    (b'{"label": 1, "sampler": "heun"}', "application/json", "bad_field", "sampler"),
    (b'{"label": ', "application/json", "bad_json", "not valid JSON"),
    (b"label=1", "text/plain", "bad_json", "not valid JSON"),
    (b"[1, 2]", "application/json", "bad_json", "JSON object"),
    (b"", "application/json", "empty_body", "empty"),
    (b'{"label": 1, "stream": "yes"}', "application/json", "bad_field", "stream must be true"),
    (b'{"label": 1, "stream": 1}', "application/json", "bad_field", "stream must be true"),
    (b'{"label": 1, "stream": null}', "application/json", "bad_field", "stream must be true"),
]


def test_bad_requests_get_a_4xx_json_and_a_good_one_follows(server):
    client = server.client()
    pids = [w["pid"] for w in client.describe("tiny-gen")["workers"]]
    url = f"{client.base_url}/predictions/tiny-gen"
    for body, ctype, kind, words in BAD_REQUESTS:
        r = client.request("POST", url, body, {"Content-Type": ctype})
        assert r.status == 400, (body, r.status, r.body[:200])
        payload = r.json()
        assert payload == {"code": 400, "type": kind, "message": payload["message"]}, body
        assert words in payload["message"], (body, payload)
        ok = client.request("POST", url, b'{"label": 0, "steps": 2}',
                            {"Content-Type": "application/json"})
        assert ok.status == 200 and len(ok.json()["images"]) == 1, f"good request after {body}"
    assert [w["pid"] for w in client.describe("tiny-gen")["workers"]] == pids


def post_stream(client, model: str, body: dict):
    """(status, headers (any case), [lines]) of a POST read line by line, as a streaming client
    reads it."""
    url = f"{client.base_url}/predictions/{model}"
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {client.key('inference')}"}
    for _ in range(2):        # the session's keys expire every 6 s: renew once if refused
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with client._opener.open(req, timeout=120) as r:
                return r.status, r.headers, [line for line in r if line.strip()]
        except urllib.error.HTTPError as e:
            answer = Response(e.code, dict(e.headers), e.read())
            if not is_key_refused(answer):
                return e.code, e.headers, [answer.body]
            client.refresh_key("inference", headers["Authorization"][7:])
            headers["Authorization"] = f"Bearer {client.key('inference')}"
    raise AssertionError("the key was refused twice")


def test_a_streamed_generation_sends_every_step_then_the_usual_answer(server):
    client = server.client()
    request = {"seed": 5, "steps": 6, "sampler": "ddim", "guidance": 2.0, "num_images": 2}
    status, headers, lines = post_stream(client, "tiny-gen",
                                         {"label": "coat", **request, "stream": True})
    assert status == 200, lines
    assert headers.get("Transfer-Encoding") == "chunked"      # sent as it is made
    assert headers.get("Content-Type", "").startswith("application/x-ndjson")
    *steps, last = [json.loads(line) for line in lines]
    assert steps == [{"step": i, "total": 6} for i in range(1, 7)]
    assert last == client.generate("coat", model="tiny-gen", **request)   # the same bytes
    # the client's way of reading it, and "stream": false changes nothing
    assert list(client.generate_stream("coat", model="tiny-gen", **request)) == [*steps, last]
    status, headers, lines = post_stream(client, "tiny-gen",
                                         {"label": "coat", **request, "stream": False})
    assert status == 200 and headers.get("Content-Type") == "application/json"
    assert [json.loads(line) for line in lines] == [last]


def test_a_bad_stream_request_is_refused_before_any_step(server):
    client = server.client()
    status, headers, lines = post_stream(client, "tiny-gen", {"label": 1, "stream": "yes"})
    assert status == 400 and headers.get("Content-Type") == "application/json"
    assert json.loads(b"".join(lines))["type"] == "bad_field"
    with pytest.raises(ServerError, match="unknown_label") as caught:
        next(client.generate_stream("cat", model="tiny-gen", steps=2))
    assert caught.value.status == 400


@pytest.fixture(scope="module")
def archive(tiny_generator, tmp_path_factory) -> Path:
    """`pixtok export` of the pipeline folder, unpacked."""
    store = tmp_path_factory.mktemp("gen-store")
    pixtok("export", tiny_generator, "--out", store)
    unpacked = store / "unpacked"
    zipfile.ZipFile(store / "tiny-gen.mar").extractall(unpacked)
    return unpacked


def test_the_archive_holds_the_dit_and_only_the_vqgan_decoder(archive, tiny_generator):
    names = {str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file()}
    weights = {n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))}
    assert weights == {"transformer.safetensors", "vq_decoder.safetensors"}
    decoder = load_safetensors((archive / "vq_decoder.safetensors").read_bytes())
    assert decoder and all(k.startswith(DECODER_PREFIXES) for k in decoder)
    assert not [k for k in decoder if k.startswith(("encoder.", "quant_conv."))]
    vae = load_file(tiny_generator / "vae" / "diffusion_pytorch_model.safetensors")
    assert [k for k in vae if k.startswith("encoder.")]     # the source had an encoder
    for key, tensor in decoder.items():
        assert torch.equal(tensor, vae[key]), key
    config = json.loads((archive / "config.json").read_text())
    assert config["task"] == "generate" and config["labels"][4] == "coat"
    assert config["schedule"]["num_train_timesteps"] == 1000
    assert "diffusers" in (archive / "requirements.txt").read_text().split()
    for module in ("models/dit.py", "pipeline.py", "sampling.py", "inference/image_generator.py"):
        assert ((archive / "pixtok" / module).read_bytes()
                == (ROOT / "pixtok" / module).read_bytes()), module


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_archive_samples_what_the_pipeline_samples(archive, tiny_generator, sampler):
    core = load_generator(archive)
    for guidance in (1.0, 4.0):
        got = core.sample(index=7, n=2, seed=5, steps=3, sampler=sampler, guidance=guidance)
        want = pipeline_pixels(tiny_generator, 7, 2, 5, 3, sampler, guidance)
        np.testing.assert_array_equal(got[..., 0], want)


def test_the_core_reports_steps_of_streamed_requests_only_and_cancels_one(archive):
    core = load_generator(archive)
    base = parse_generate_request({"label": 3, "steps": 4, "seed": 2}, LABELS)
    quiet, loud, stopped = base, {**base, "stream": True}, {**base, "stream": True, "seed": 9}
    heard = []

    def progress(j, step, total):
        heard.append((j, step, total))
        return not (j == 2 and step == 3)          # the third request's client leaves
    plain, streamed, cancelled = core.predict([quiet, loud, stopped], progress=progress)
    assert heard == [(1, s, 4) for s in range(1, 5)] + [(2, 1, 4), (2, 2, 4), (2, 3, 4)]
    assert plain == streamed == core.predict([base])[0]      # the same answer either way
    assert (cancelled.code, cancelled.type) == (400, "cancelled")
    assert "after 3 of 4 steps" in cancelled.message


def test_rest_defaults_are_the_shared_sampling_defaults():
    assert GENERATE_DEFAULTS == {"seed": 0, **SAMPLING_DEFAULTS, "num_images": 1}
    assert GENERATE_DEFAULTS["sampler"] in SAMPLERS and 1 <= GENERATE_DEFAULTS["steps"] <= MAX_STEPS


def test_onnx_of_a_generator_is_refused(tiny_generator, tmp_path):
    with pytest.raises(ExportError, match="--onnx and --quantize are for image models"):
        export_archive(tiny_generator, tmp_path, onnx=True, log=lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_an_archive_module_that_reaches_into_the_repository_fails_the_export(tmp_path):
    stage = tmp_path / "stage"
    stage_code(ROOT / "serving" / "handlers" / "generator.py", stage)    # the real core: passes
    extra = stage / "files" / "pixtok" / "extra.py"
    extra.write_text("from training.train import train\n")
    with pytest.raises(ExportError, match="pixtok/extra.py imports training.train"):
        check_self_contained(stage)
    extra.write_text("from .nowhere import something\n")
    with pytest.raises(ExportError, match="imports pixtok.nowhere"):
        check_self_contained(stage)
    extra.unlink()
    (stage / "handler.py").write_text("from pixtok.nowhere import x\n")
    with pytest.raises(ExportError, match="handler.py imports pixtok.nowhere"):
        check_self_contained(stage)


def test_one_list_of_samplers_for_the_cli_rest_and_the_page():
    import pixtok.cli
    import serving.page_layout
    from pixtok import sampling

    assert pixtok.cli.SAMPLERS is SAMPLERS is serving.page_layout.SAMPLERS is sampling.SAMPLERS
    for sampler in SAMPLERS:      # euler too, which the REST API used to refuse
        request = parse_generate_request({"label": 1, "sampler": sampler}, LABELS)
        assert request["sampler"] == sampler
        assert request["steps"] == sampling.DEFAULT_STEPS[sampler]
