"""`pixtok eval` and `pixtok bench sample` on a tiny generator, measured by a tiny classifier that
`pixtok train` trains in the test (subprocesses, as a user runs them)."""
from __future__ import annotations

import json

import pytest
import torch
from clirun import ENV, pixtok
from conftest import tiny_pipeline
from datafiles import learnable_fashion

from pixtok.cli import main
from pixtok.errors import UserError
from pixtok.inference.validate import parse_generate_request
from pixtok.sampling import DEFAULT_STEPS, SAMPLERS, SAMPLING_DEFAULTS, default_steps
from training.data.fashion_mnist import CLASSES
from training.evaluate_generator import (
    Classifier,
    generation_metrics,
    load_pipeline,
    sampler_and_steps,
)
from training.sample import sampling_settings


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """ViT-F/1 at 14x14 on the small Fashion-MNIST files, trained by `pixtok train`."""
    root = tmp_path_factory.mktemp("cls")
    data = learnable_fashion(root / "fashion")
    out = root / "vit"
    pixtok("train", "vit1-fashion", "--out", str(out), f"data_dir={data}", "model=ViT-F/1",
           "image_size=14", "batch_size=32", "eval_batch_size=128", "threads=1", "amp=off",
           "epochs=6", "lr=3e-3", "warmup_epochs=0.5", "ema=0.9")
    return out


@pytest.fixture(scope="module")
def generator(classifier, tmp_path_factory):
    """A random-weight DiT-F/1 over a tiny VQGAN as a pipeline folder, with the config.json
    `pixtok train` writes beside it (the VQGAN's 2-pixel padding, the classifier to use)."""
    folder = tmp_path_factory.mktemp("gen") / "dit"
    tiny_pipeline(latent_size=8, sampler="dpm", labels=CLASSES).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"input": {"pad": 2},
                                                    "classifier": str(classifier)}))
    return folder


def test_eval_prints_fid_proxy_class_agreement_and_n(generator, classifier):
    res = pixtok("eval", str(generator), "-n", "40", "--steps", "3")   # classifier: from config
    metrics = json.loads(res.stdout)
    # stderr says what it does and how far it got (one batch of 40 images, 3 sampler steps)
    assert "eval: sampling 40 images, dpm-3, guidance 4: 100%" in res.stderr
    assert "3/3" in res.stderr
    assert metrics["n"] == 40 and metrics["n_real"] == 40
    assert (metrics["sampler"], metrics["steps"], metrics["guidance"]) == ("dpm", 3, 4.0)
    assert metrics["classifier"] == str(classifier)
    assert 0 <= metrics["class_agreement"] <= 1
    assert metrics["real_class_agreement"] > 0.3            # the classifier works on real images
    # random weights are far from the data; two halves of the real test set are close
    assert metrics["fid_proxy"] > 3 * metrics["fid_proxy_floor"] > 0
    # the judge's view of the samples: IS over its 10 classes, and k-NN precision and recall
    assert 1 <= metrics["is_proxy"] <= 10 and metrics["is_proxy_std"] >= 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    # the CLI's number is the library's: same samples, same features, same distance
    pipe = load_pipeline(generator)
    again = generation_metrics(pipe, Classifier(classifier), 40, pad=2, steps=3, batch_size=256)
    assert again["fid_proxy"] == pytest.approx(metrics["fid_proxy"], rel=1e-6)
    assert again["class_agreement"] == metrics["class_agreement"]


def test_classifier_input_crops_the_padding_then_resizes(classifier):
    clf = Classifier(classifier)
    images = torch.zeros(2, 1, 32, 32)
    images[:, :, 2:30, 2:30] = 1.0                          # a white 28x28 image, padded black
    fitted = clf.fit(images, pad=2)
    assert fitted.shape == (2, 1, 14, 14)
    assert torch.allclose(fitted, torch.ones_like(fitted), atol=1e-5)


def test_eval_errors_are_one_line(generator, tmp_path, capsys):
    assert main(["eval", str(generator), "--classifier", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classifier checkpoint not found" in err[0], err


def test_bench_sample_on_any_generator(generator, classifier, tmp_path):
    env = {**ENV, "PIXTOK_BENCH_GENERATOR": str(generator), "PIXTOK_BENCH_SAMPLES": "16",
           "PIXTOK_BENCH_CLASSIFIER": str(classifier)}
    res = pixtok("bench", "sample", "--quick", "--json", str(tmp_path / "b.json"), env=env)
    result = json.loads(res.stdout)
    assert result == json.loads((tmp_path / "b.json").read_text())
    # stderr: which of the 10 settings runs and how far along, in sampler steps of all of them
    # (one batch of 16 images per setting: 2 x (250 + 50 + 10 + 20 + 25) steps)
    assert "bench sample 1/10: ddpm-250, guidance 1, 16 images" in res.stderr
    assert "bench sample 10/10: dpm-25, guidance 4, 16 images: 100%" in res.stderr
    assert "710/710" in res.stderr
    assert result["suite"] == "sample" and result["n"] == 16
    rows = result["results"]
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        (s, k, g) for g in (1.0, 4.0)
        for s, k in (("ddpm", 250), ("ddim", 50), ("dpm", 10), ("dpm", 20), ("dpm", 25))]
    assert all(r["images_per_s"] > 0 and r["fid_proxy"] > 0 for r in rows)
    ddpm, dpm10 = rows[0]["images_per_s"], rows[2]["images_per_s"]
    assert dpm10 > 5 * ddpm                                  # 10 model calls against 250
    assert result["fid_proxy_floor"] >= 0


def test_one_rule_for_the_steps_of_a_sampler_given_without_them():
    """`pixtok sample`, `pixtok eval` (and a study) and the REST API fill in omitted steps
    with pixtok.sampling.default_steps; each refuses an unknown sampler in its own words."""
    assert default_steps(SAMPLING_DEFAULTS["sampler"]) == SAMPLING_DEFAULTS["steps"]
    for sampler in SAMPLERS:
        want = default_steps(sampler)
        if sampler != SAMPLING_DEFAULTS["sampler"]:
            assert want == DEFAULT_STEPS[sampler]
        assert sampling_settings(sampler, None, None)["steps"] == want
        assert sampler_and_steps(sampler, None) == (sampler, want)
        assert parse_generate_request({"label": 0, "sampler": sampler}, ["a"])["steps"] == want
    assert sampler_and_steps(None, 7) == (SAMPLING_DEFAULTS["sampler"], 7)
    for fill in (lambda: sampling_settings("heun", None, None),
                 lambda: sampler_and_steps("heun", None)):
        with pytest.raises(UserError, match="unknown sampler 'heun'"):
            fill()
