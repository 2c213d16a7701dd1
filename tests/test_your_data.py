"""The path of docs/your-data.md, end to end as a user runs it: a small grey-scale ImageFolder
with class names of its own, `pixtok train folder-classify` fine-tuning the shipped fashion-vit1
at another size, `pixtok eval`, `pixtok export`, TorchServe, and REST answers that name the
folders and agree with `pixtok eval`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clirun import message_lines, pixtok
from PIL import Image

NAMES = ["zebra-stripes", "checks", "blank"]         # not sorted: the labels must be


def pattern(name: str, rng) -> np.ndarray:
    """A 12x12 grey image of one class: horizontal stripes, a checkerboard, or flat, on noise."""
    y, x = np.mgrid[:12, :12]
    base = {"zebra-stripes": (y // 2) % 2 * 160, "checks": ((y // 3 + x // 3) % 2) * 160,
            "blank": np.full((12, 12), 80)}[name]
    return np.clip(base + rng.integers(0, 60, (12, 12)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("your-data") / "patterns"
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for name in NAMES:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(pattern(name, rng), mode="L").save(root / split / name /
                                                                  f"{i}.png")
    (root / "train" / "checks" / "broken.png").write_bytes(b"\x89PNG cut short")
    return root


def test_fine_tune_the_shipped_classifier_on_a_folder_and_serve_it(folder, tmp_path):
    from export.archive import build_missing_archives
    from serving import launcher

    run = tmp_path / "run"
    res = pixtok("train", "folder-classify", "--out", run, f"data_dir={folder}",
                 "init_from=fashion-vit1", "budget_minutes=0", "epochs=3", "batch_size=16",
                 "eval_every=3", "warmup_epochs=0.5", "threads=1", timeout=600)
    said = message_lines(res.stderr)
    # what was adapted, one line each; what was wrong with the folder, one line each
    assert any("position embedding: learned 28x28 grid resampled to 12x12" in s for s in said)
    assert any("head: new for 3 classes (reset, not copied" in s for s in said)
    assert any("skipped 1 of 73 images that cannot be decoded" in s for s in said)
    config = json.loads((run / "config.json").read_text())
    assert config["labels"] == sorted(NAMES)
    assert config["input"] == {"image_size": [12, 12], "channels": 1, "resize": "bicubic"}
    assert config["data"]["channels"] == 1 and config["recipe"]["init_from"] == "fashion-vit1"
    mean = config["model"]["args"]["mean"][0]                 # measured on the training folder
    assert mean != 0.286 and 0.2 < mean < 0.6

    metrics = json.loads(pixtok("eval", run).stdout)          # the val/ folder (no test/)
    assert metrics["n"] == 24 and metrics["acc1"] > 1 / 3    # better than chance

    store = tmp_path / "store"
    pixtok("export", run, "--out", store, "--name", "patterns")
    run_dir = tmp_path / "serve"
    srv = launcher.start(store, run_dir=run_dir, timeout=180, log=lambda *_: None,
                         ports=launcher.free_ports(), build=build_missing_archives)
    try:
        client = srv.client()
        correct = 0
        for path in sorted((folder / "val").rglob("*.png")):
            got = client.classify(path.read_bytes(), model="patterns")
            assert got["label"] in NAMES and {t["label"] for t in got["top_k"]} == set(NAMES)
            correct += got["label"] == path.parent.name
    finally:
        launcher.stop(run_dir, log=lambda *_: None)
    assert correct / 24 == pytest.approx(metrics["acc1"])


def write_depth_folder(root: Path, n: int = 8) -> Path:
    """root/{train,test}/{rgb,depth}: random RGB and a depth in mm that follows its brightness."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for d in ("rgb", "depth"):
            (root / split / d).mkdir(parents=True)
        for i in range(n):
            rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            mm = (1000 + 20 * rgb.mean(axis=2)).astype(np.uint16)
            Image.fromarray(rgb).save(root / split / "rgb" / f"{i}.png")
            Image.fromarray(mm).save(root / split / "depth" / f"{i}.png")
    return root


@pytest.mark.parametrize("source, said", [
    ("scenes-vit1-depth", ["learned 48x64 grid resampled to 12x16", "depth head: kept"]),
    ("fashion-vit1", ["pixel embedding: 1 -> 3 channels", "[cls] token: dropped",
                      "depth head: new"]),
])
def test_folder_depth_starts_from_a_shipped_depth_model_or_classifier(tmp_path, source, said):
    folder = write_depth_folder(tmp_path / "rgbd")
    run = tmp_path / "run"
    res = pixtok("train", "folder-depth", "--out", run, f"data_dir={folder}",
                 f"init_from={source}", "image_size=12x16", "budget_minutes=0", "max_steps=1",
                 "batch_size=4", "eval_every=100", "threads=1", "amp=off", timeout=600)
    lines = message_lines(res.stderr)
    for words in said:
        assert any(words in line for line in lines), (words, lines)
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["n"] > 0 and metrics["rmse"] > 0
    assert json.loads((run / "config.json").read_text())["input"]["image_size"] == [12, 16]


@pytest.mark.parametrize("recipe", ["folder-classify", "vqgan-fashion", "mae-t1-cifar100"])
def test_every_task_reads_an_imagefolders_channels_and_size(folder, recipe):
    """config.json's data entry settles what the folder is, for a ViT task and the others
    (a VQGAN's model name is not a ViT's: no patch size to round to)."""
    from training.recipe import load_recipe
    from training.tasks.common import data_spec

    loaded = load_recipe(recipe, ["dataset=imagefolder", f"data_dir={folder}"])
    spec = data_spec(loaded)
    assert spec["channels"] == 1                                 # a grey folder
    assert spec["image_size"] == (loaded.image_size or [12, 12])  # the recipe's, else the folder's


def test_make_folder_writes_the_measured_folders(tmp_path):
    """python -m training.data.make_folder: the folders docs/your-data.md measures on."""
    from datafiles import learnable_fashion

    from training.data.make_folder import main

    data = learnable_fashion(tmp_path / "fashion", n_train=200, n_test=60)
    for flags, mode in (([], "L"), (["--rgb"], "RGB"), (["--rotate-invert"], "L")):
        out = tmp_path / f"out{len(flags)}{mode}"
        assert main([str(out), "--classes", "3", "--train", "2", "--val", "1", "--size", "8",
                     "--data", str(data), *flags]) == 0
        assert sorted(p.name for p in (out / "train").iterdir()) == ["pullover", "t-shirt",
                                                                      "trouser"]
        files = sorted(out.rglob("*.png"))
        assert len(files) == 9 and {Image.open(f).mode for f in files} == {mode}
        assert {Image.open(f).size for f in files} == {(8, 8)}
    plain = np.array(Image.open(tmp_path / "out0L/train/trouser/0000.png"))
    turned = np.array(Image.open(tmp_path / "out1L/train/trouser/0000.png"))
    assert np.array_equal(turned, 255 - np.rot90(plain))


@pytest.mark.slow
def test_a_generator_of_the_folders_classes_from_folder_vqgan_then_folder_dit(folder, tmp_path):
    """The generator half of docs/your-data.md: folder-vqgan, then folder-dit over it; the
    pipeline folder's classes are the folder names, sorted, and sampling takes them by name."""
    small = ["budget_minutes=0", "epochs=1", "batch_size=16", "amp=off", "threads=1"]
    vq, dit = tmp_path / "vq", tmp_path / "dit"
    pixtok("train", "folder-vqgan", f"data_dir={folder}", "--out", vq, "max_steps=4", *small)
    pixtok("train", "folder-dit", f"data_dir={folder}", f"vqgan={vq}", "--out", dit,
           "model=DiT-F/1", "max_steps=4", *small)
    index = json.loads((dit / "model_index.json").read_text())
    assert index["labels"] == sorted(NAMES)
    out = json.loads(pixtok("sample", dit, "--label", "zebra-stripes", "--steps", "2",
                            "--out", tmp_path / "z.png").stdout)
    assert out["label"] == "zebra-stripes" and out["index"] == sorted(NAMES).index("zebra-stripes")
    with Image.open(tmp_path / "z.png") as image:
        assert image.size == (12, 12) and image.mode == "L"
    bad = pixtok("sample", dit, "--label", "sneaker", "--out", tmp_path / "s.png", check=False)
    (line,) = message_lines(bad.stderr)
    assert bad.returncode == 2 and "sneaker" in line and "zebra-stripes" in line


@pytest.mark.slow
def test_folder_dit_fine_tunes_the_shipped_generator_into_the_folders_classes(folder, tmp_path):
    """init_from=fashion-dit1 over the shipped VQGAN: a new label table for the folder's three
    classes, the 8x8 latent grid resampled to this size's 4x4, every other weight taken."""
    res = pixtok("train", "folder-dit", f"data_dir={folder}", "vqgan=model_store/fashion-dit1",
                 f"latent_dir={tmp_path / 'latents'}", "init_from=fashion-dit1", "--out",
                 tmp_path / "dit", "budget_minutes=0", "epochs=1", "max_steps=2",
                 "batch_size=16", "amp=off", "threads=1")
    said = [line for line in message_lines(res.stderr) if line.startswith("init_from:")]
    assert said[0].startswith("init_from: labels: 3 classes") and "null class kept" in said[0]
    assert said[1] == "init_from: latent grid: 8x8 -> 4x4: position table resampled"
    assert json.loads((tmp_path / "dit/model_index.json").read_text())["labels"] == sorted(NAMES)
