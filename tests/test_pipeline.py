"""PixelDiTPipeline: guidance, samplers, determinism and an offline save/load round trip."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from pixtok.errors import UserError
from pixtok.pipeline import make_scheduler

LABELS = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
          "Ankle boot"]
ROOT = Path(__file__).resolve().parents[1]


def make_pipeline(sampler: str = "ddpm"):
    """A tiny DiT/1 pipeline: 8x8x4 latents, 32x32 grey images."""
    return tiny_pipeline(latent_size=8, sampler=sampler, labels=LABELS)


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


def test_guidance_one_batch_and_formula(pipe):
    x, t = torch.randn(3, 4, 8, 8), torch.tensor(400)
    ids = torch.tensor([0, 4, 9])
    with torch.no_grad():
        cond = pipe.transformer(x, t.expand(3), ids)
        uncond = pipe.transformer(x, t.expand(3), torch.full_like(ids, 10))
        one = pipe.guided_prediction(x, t, ids, 1.0)
        four = pipe.guided_prediction(x, t, ids, 4.0)
    assert (cond[:, :4] - uncond[:, :4]).abs().max() > 1e-2     # the halves differ
    assert torch.allclose(one, cond, atol=1e-5)                 # scale 1 = conditional
    assert torch.allclose(four[:, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]),
                          atol=1e-4)
    assert torch.allclose(four[:, 4:], cond[:, 4:], atol=1e-5)  # variance: conditional half
    batches = []
    hook = pipe.transformer.register_forward_hook(lambda m, i, o: batches.append(i[2].tolist()))
    pipe([1, 2], num_inference_steps=3, output_type="latent")
    hook.remove()
    assert batches == [[1, 2, 10, 10]] * 3                      # one 2N pass per step, null = 10
    batches.clear()
    hook = pipe.transformer.register_forward_hook(lambda m, i, o: batches.append(i[2].tolist()))
    pipe([1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    hook.remove()
    assert batches == [[1, 2]] * 2                              # no guidance: no null half


def test_same_seed_same_bytes(pipe):
    def sample(seed):
        return pipe(["Bag", 3], num_inference_steps=4,
                    generator=torch.Generator().manual_seed(seed)).images
    a, b, c = sample(7), sample(7), sample(8)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert a[0].tobytes() != c[0].tobytes()
    assert a[0].mode == "L" and a[0].size == (32, 32)          # 8x8x4 latents -> 32x32 gray


def test_the_step_callback_hears_every_step_and_can_cancel(pipe):
    from pixtok.pipeline_pixel_dit import SamplingCancelled

    def sample(callback=None):
        return pipe([2], num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                    output_type="np", callback=callback).images
    heard = []
    with_callback = sample(lambda step, total: heard.append((step, total)))
    assert heard == [(i, 5) for i in range(1, 6)]
    np.testing.assert_array_equal(with_callback, sample())       # listening changes nothing
    heard.clear()
    with pytest.raises(SamplingCancelled, match="after 2 of 5 steps") as caught:
        sample(lambda step, total: heard.append(step) or step < 2)
    assert heard == [1, 2] and (caught.value.step, caught.value.total) == (2, 5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "euler"])
def test_samplers(sampler, pipe, monkeypatch):
    pipe.scheduler = make_scheduler(sampler)
    seen = []
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step",
                        lambda out, *a, **k: seen.append(out.shape[1]) or step(out, *a, **k))
    images = pipe([0, 5], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (2, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    # only DDPM samples with the learned variance; the others get eps alone
    assert seen == [8 if sampler == "ddpm" else 4] * 4
    assert np.isfinite(pipe([1], num_inference_steps=2, output_type="np").images).all()
    pipe.scheduler = make_scheduler("ddpm")


def test_latents_decode_with_quantisation(pipe):
    latents = pipe([2], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)
    images = pipe.decode_latents(latents)
    with torch.no_grad():
        quantised, _, _ = pipe.vae.quantize(latents)
        direct = pipe.vae.decode(quantised, force_not_quantize=True).sample
    assert torch.allclose(images, (direct / 2 + 0.5).clamp(0, 1), atol=1e-6)
    assert pipe.encode_images(images).shape == (1, 4, 8, 8)


def test_class_labels(pipe):
    assert pipe.class_ids(["Coat", 9, "2"]).tolist() == [4, 9, 2]
    with pytest.raises(UserError, match="unknown class"):
        pipe.class_ids(["Hat"])
    with pytest.raises(UserError, match="out of range"):
        pipe.class_ids([10])
    with pytest.raises(UserError, match="num_inference_steps"):
        pipe([0], num_inference_steps=1001)
    with pytest.raises(UserError, match="sampler"):
        make_scheduler("heun")
    custom = make_scheduler("ddim", make_scheduler("ddpm").config | {"beta_end": 0.03})
    assert custom.config.beta_end == 0.03


def test_save_and_load_offline_in_one_call(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "gen")
    images = pipe(["Sneaker", 0], num_inference_steps=3,
                  generator=torch.Generator().manual_seed(3), output_type="np").images
    expected = hashlib.sha256(images.tobytes()).hexdigest()
    # a fresh process, offline: one from_pretrained call brings back the model and the labels
    script = (
        "import hashlib, sys, torch\n"
        "from pixtok.pipeline import PixelDiTPipeline\n"
        "pipe = PixelDiTPipeline.from_pretrained(sys.argv[1])\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "im = pipe(['Sneaker', 0], num_inference_steps=3,"
        " generator=torch.Generator().manual_seed(3), output_type='np').images\n"
        "print(type(pipe.scheduler).__name__, pipe.labels[7], len(pipe.labels))\n"
        "print(hashlib.sha256(im.tobytes()).hexdigest())\n")
    # the same torch thread count as this process: another count may sum in another order
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "gen")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:3] == ["DDPMScheduler", "Sneaker", "10"]
    assert lines[-1] == expected
