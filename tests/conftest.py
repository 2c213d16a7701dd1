"""Shared fixtures: tiny classifier checkpoints, and ONE real TorchServe for the whole session.

The server is started by the code `pixtok serve` runs (serving.launcher.start) on a temporary run
folder and free ports, so it never meets a user's server or the default ports. Its keys expire
every 6 seconds, so every test also exercises the client's key renewal.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtok.checkpoint import save_weights, write_json
from pixtok.models.vit import ViT, vit_config

LABELS = ["tee", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
          "boot"]


def make_classifier(folder: Path, image_size=(8, 8), channels: int = 1, seed: int = 0,
                    resize: str = "bicubic") -> Path:
    """A random-weight ViT-F/1 classifier checkpoint folder, as `pixtok train` lays it out."""
    torch.manual_seed(seed)
    cfg = vit_config("ViT-F/1", image_size=image_size, in_channels=channels,
                     num_classes=len(LABELS))
    model = ViT(cfg)
    write_json(folder / "config.json", {
        "format": "pixtok-checkpoint/1", "task": "classify",
        "model": {"arch": "vit", "name": "ViT-F/1", "args": cfg.to_dict()},
        "labels": LABELS,
        "input": {"image_size": list(image_size), "channels": channels, "resize": resize},
        "data": {"name": "generated"}, "recipe": {}, "git_commit": None, "step": 0})
    save_weights(folder / "model.safetensors", model.state_dict())
    return folder


def make_depth(folder: Path, image_size=(12, 16), seed: int = 0) -> Path:
    """A random-weight ViT-F/1 depth checkpoint folder (RGB in), as the depth task lays it out.
    The head's last layer is random, not zero, so depth varies over the image (about 1-10 m)."""
    from pixtok.models.depth import DepthViT

    torch.manual_seed(seed)
    cfg = vit_config("ViT-F/1", image_size=image_size, in_channels=3, num_classes=0)
    model = DepthViT(cfg)
    with torch.no_grad():
        model.head.mlp[-1].weight.normal_(0, 0.08)
    write_json(folder / "config.json", {
        "format": "pixtok-checkpoint/1", "task": "depth",
        "model": {"arch": "vit-depth", "name": "ViT-F/1", "args": model.args()},
        "unit": "m", "input": {"image_size": list(image_size), "channels": 3,
                               "resize": "bicubic"},
        "data": {"name": "generated"}, "recipe": {}, "git_commit": None, "step": 0})
    save_weights(folder / "model.safetensors", model.state_dict())
    return folder


def tiny_pipeline(latent_size: int = 4, sampler: str = "ddpm", labels=LABELS, seed: int = 0):
    """A random-weight DiT-F/1 over a tiny f4 VQGAN: 4 x latent_size^2 latents, grey images 4x
    the latent size. The DiT's weights are perturbed (a fresh one predicts zeros), so labels and
    seeds matter."""
    from pixtok.models.dit import PixelDiT, dit_config
    from pixtok.models.vqgan import build_vqgan
    from pixtok.pipeline import PixelDiTPipeline, make_scheduler

    torch.manual_seed(seed)
    dit = PixelDiT(**dit_config("DiT-F/1", sample_size=latent_size, in_channels=4,
                                num_classes=len(labels)))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    vae = build_vqgan("f4-small", block_out_channels=[8, 16, 16], norm_num_groups=8,
                      num_vq_embeddings=32, sample_size=4 * latent_size)
    pipe = PixelDiTPipeline(dit.eval(), vae.eval(), make_scheduler(sampler), labels=labels)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_generator(folder: Path, seed: int = 0, sampler: str = "ddpm") -> Path:
    """tiny_pipeline() saved as a pipeline folder: 4x4x4 latents, 16x16 grey images."""
    tiny_pipeline(sampler=sampler, seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("ckpt") / "tiny-cls")


@pytest.fixture(scope="session")
def tiny_depth(tmp_path_factory) -> Path:
    return make_depth(tmp_path_factory.mktemp("ckpt") / "tiny-depth")


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory) -> Path:
    return make_generator(tmp_path_factory.mktemp("ckpt") / "tiny-gen")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A running TorchServe with tiny-cls (built by the launcher from its checkpoint folder, so
    with its ONNX file: ONNX Runtime runs it), tiny-cls-torch (the same weights exported with
    --no-onnx: PyTorch), tiny-depth (a depth checkpoint folder) and tiny-gen (a generator's
    pipeline folder), the last two also built by the launcher. srv.checkpoint,
    srv.depth_checkpoint and srv.generator_checkpoint are the folders."""
    from export.archive import build_missing_archives, export_archive
    from serving import launcher

    store = tmp_path_factory.mktemp("model_store")
    ckpt = make_classifier(store / "tiny-cls")
    export_archive(ckpt, store, name="tiny-cls-torch", onnx=False, log=lambda *_: None)
    depth, generator = make_depth(store / "tiny-depth"), make_generator(store / "tiny-gen")
    run_dir = tmp_path_factory.mktemp("run")
    srv = launcher.start(store, run_dir=run_dir, timeout=120, log=lambda *_: None,
                         ports=launcher.free_ports(), token_expiration_min=0.1,
                         build=build_missing_archives)
    srv.checkpoint, srv.depth_checkpoint, srv.generator_checkpoint = ckpt, depth, generator
    yield srv
    launcher.stop(run_dir, log=lambda *_: None)


@pytest.fixture(scope="session")
def ui(server, tmp_path_factory):
    """The Gradio front end over `server`, started the way `pixtok serve` starts it, on a free
    port; it uses the first served model of each task (.models: {task: name})."""

    from serving import launcher
    from serving.page_settings import served_models
    from training.data.examples import write_examples

    models = {task: names[0] for task, names in served_models(server.run_dir).items()}
    port = launcher.free_ports()["inference"]
    env = {"GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    front = launcher.start_ui(server.run_dir, port=port, models=models, env=env, timeout=120,
                              log=lambda *_: None, examples=write_examples)
    front.models = models
    yield front
    launcher.stop_ui(server.run_dir, log=lambda *_: None)


# `make test-fast` leaves these out (pytest -m "not serve and not slow"): tests that start a real
# TorchServe, Gradio page or browser (by the fixtures they use, or the whole module), and tests
# that train or evaluate through the CLI in subprocesses
SERVE_FIXTURES = {"server", "ui", "kserve", "ks", "foreground", "browser_page"}
SERVE_MODULES = {"test_browser", "test_container", "test_gradio", "test_kserve", "test_page_store",
                 "test_kserve_server", "test_openapi", "test_contract_fuzz"}
SLOW_MODULES = {"test_train", "test_depth_cli", "test_mae_cli", "test_generation_cli",
                "test_generation_eval", "test_vqgan_resume", "test_distributed", "test_bench",
                "test_study", "test_study_generator", "test_quantize"}
# single tests that train a model in process for tens of seconds
SLOW_TESTS = {"test_tiny_depth_vit_beats_mean_depth_baseline", "test_vqgan_trains",
              "test_a_few_steps_lower_the_loss", "test_a_tiny_vit1_learns",
              "test_dit_trains_with_falling_loss"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SERVE_MODULES or SERVE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.serve)
        if (module in SLOW_MODULES or item.originalname in SLOW_TESTS
                or "pixtok(" in _source(item)):
            item.add_marker(pytest.mark.slow)


def _source(item) -> str:
    """The test function's source: a test that runs the CLI is slow wherever it lives."""
    import inspect

    try:
        return inspect.getsource(item.function)
    except (OSError, TypeError):
        return ""
