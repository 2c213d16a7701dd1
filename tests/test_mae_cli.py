"""`pixtok train` / `pixtok eval` for MAE pre-training and fine-tuning, run as a user runs them
on small CIFAR-100 pickles written here."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import pixtok
from PIL import Image
from safetensors.torch import load_file

from pixtok.checkpoint import save_weights, write_json
from pixtok.errors import UserError
from pixtok.models.vit import ViT, vit_config
from training.adapt import init_encoder
from training.data import build_dataset
from training.distributed import Dist
from training.recipe import load_recipe
from training.tasks.classify import ClassifyTask

# the real recipes, shrunk: ViT-F/1 on 8x8 images, a one-block decoder, 8 steps an epoch, and
# no crop or flip (a 4-pixel shift of an 8x8 ramp leaves little to learn in a few steps)
TINY = ["model=ViT-F/1", "image_size=8", "batch_size=32", "threads=1", "amp=off",
        "crop_padding=0", "hflip=false", "decoder_width=16", "decoder_depth=1",
        "decoder_heads=2", "warmup_epochs=0.5"]


def write_cifar100(folder: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """cifar-100-python/{train,test,meta} of one colour ramp, tinted and noisy per image: a
    hidden pixel's colour follows from its position and the visible pixels' tint."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    ys, xs = np.mgrid[0:32, 0:32] / 31
    ramps = np.stack([xs, ys, 1 - xs])                                # (3, 32, 32)
    for split, n in (("train", n_train), ("test", n_test)):
        shift = rng.uniform(0, 0.25, (n, 3, 1, 1))                   # each image a little tinted
        planes = 0.75 * ramps + shift + rng.uniform(-0.03, 0.03, (n, 3, 32, 32))
        data = (np.clip(planes, 0, 1) * 255).round().astype(np.uint8).reshape(n, 3072)
        labels = rng.integers(0, 100, n)
        batch = {b"data": data, b"fine_labels": labels.tolist(),
                 b"coarse_labels": (labels // 5).tolist()}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("data") / "cifar-100-python")


def pretrain_args(cifar: Path) -> list[str]:
    return [f"data_dir={cifar}", *TINY, "epochs=6", "eval_every=2", "min_lr=0"]


@pytest.fixture(scope="module")
def pretrained(cifar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mae"
    pixtok("train", "mae-t1-cifar100", "--out", str(out), *pretrain_args(cifar))
    return out


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_pretrain_lowers_the_loss_and_eval_writes_a_grid(pretrained, cifar, tmp_path):
    lines = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [2, 4, 6] and all(m["n"] == 64 for m in lines)
    assert lines[-1]["loss"] < 0.7 * lines[0]["loss"], lines
    # and it beats predicting the mean colour: it reads the pixels' positions and the visible tint
    test = build_dataset("cifar100", cifar, split="test", image_size=8).images.double() / 255
    mean_colour_mse = (test - test.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean().item()
    assert lines[-1]["loss"] < 0.6 * mean_colour_mse, (lines, mean_colour_mse)
    config = json.loads((pretrained / "config.json").read_text())
    assert config["task"] == "mae" and config["model"]["arch"] == "mae"
    assert config["model"]["args"]["mask_ratio"] == 0.75
    assert config["model"]["args"]["encoder"]["image_size"] == [8, 8]

    res = pixtok("eval", str(pretrained))
    metrics = json.loads(res.stdout)
    # the same fixed masks as the run's last evaluation, so the same number
    assert metrics["loss"] == pytest.approx(lines[-1]["loss"], rel=1e-5) and metrics["n"] == 64
    grid = Path(metrics["grid"])
    assert grid == pretrained / "reconstruction.png"
    # rows input / masked / reconstruction, 8 images of 8x8, drawn 4x larger
    assert Image.open(grid).size == (8 * 8 * 4, 3 * 8 * 4)
    pixels = np.asarray(Image.open(grid).convert("RGB"))[::4, ::4]           # (24, 64, 3)
    masked = pixels[8:16]
    grey = (masked == 128).all(axis=-1).mean()
    assert 0.6 < grey < 0.9                                                 # 75% hidden
    # visible pixels are pasted back: input and reconstruction agree wherever nothing is hidden
    shown = ~(masked == 128).all(axis=-1)
    assert (pixels[:8][shown] == pixels[16:][shown]).all()

    other = tmp_path / "grids" / "mine.png"
    res = pixtok("eval", str(pretrained), "--out", str(other), "-n", "3")
    assert json.loads(res.stdout)["grid"] == str(other)
    assert Image.open(other).size == (3 * 8 * 4, 3 * 8 * 4)


def test_resume_masks_exactly_like_an_uninterrupted_run(pretrained, cifar, tmp_path):
    """Half the run, then --resume: the masks come from the restored RNG, so the weights equal
    the uninterrupted run's bit for bit (a fresh RNG would repeat the first steps' masks)."""
    half = tmp_path / "half"
    pixtok("train", "mae-t1-cifar100", "--out", str(half), *pretrain_args(cifar), "max_steps=20")
    assert torch.load(half / "train_state.pt", weights_only=True)["step"] == 20
    pixtok("train", "mae-t1-cifar100", "--out", str(half), "--resume", "max_steps=0")
    full, resumed = weights(pretrained), weights(half)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_finetune_starts_from_the_mae_encoder(pretrained, cifar, tmp_path):
    mae = weights(pretrained)
    encoder = {k[len("encoder."):]: v for k, v in mae.items() if k.startswith("encoder.")}
    # in process: the task's init_from copies every encoder tensor exactly, the head stays
    recipe = load_recipe("mae-t1-cifar100-ft", [f"data_dir={cifar}", "model=ViT-F/1",
                                                "image_size=8", f"init_from={pretrained}"])
    task = ClassifyTask(recipe, Dist())
    head = task.model.head.weight.detach().clone()
    assert not torch.equal(task.model.state_dict()["pos_embed"], encoder["pos_embed"])
    task.init_from(recipe.init_from)
    state = task.model.state_dict()
    assert set(state) - set(encoder) == {"head.weight", "head.bias"}
    for k, v in encoder.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(state["head.weight"], head)

    # through the CLI: one step at a vanishing lr leaves the encoder where the MAE left it
    out = tmp_path / "ft"
    pixtok("train", "mae-t1-cifar100-ft", "--out", str(out), f"data_dir={cifar}",
           f"init_from={pretrained}", *TINY[:5], "max_steps=1", "lr=1e-9", "eval_every=100")
    tuned = weights(out)
    for k, v in encoder.items():
        torch.testing.assert_close(tuned[k], v, atol=1e-6, rtol=0, msg=k)
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "classify" and config["recipe"]["layer_decay"] == 0.65


def test_init_from_a_wrong_checkpoint_is_a_one_line_error(pretrained, cifar, tmp_path):
    classifier = tmp_path / "classifier"
    write_json(classifier / "config.json", {
        "format": "pixtok-checkpoint/1", "task": "classify",
        "model": {"arch": "vit", "name": "ViT-F/1", "args": {}}})
    save_weights(classifier / "model.safetensors", {"x": torch.zeros(1)})
    for path, extra, message in [(classifier, [], "holds another model"),
                                 (pretrained, ["model=ViT-P/1"], "width 32 vs 64")]:
        res = pixtok("train", "mae-t1-cifar100-ft", "--out", str(tmp_path / "x"),
                     f"data_dir={cifar}", *TINY[:5], *extra, f"init_from={path}", check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], res.stderr
        assert not (tmp_path / "x" / "model.safetensors").exists()
    # the same checks in process, for the other ways a folder can fail to fit
    for path, name, message in [(tmp_path / "nowhere", "ViT-F/1", "not a checkpoint folder"),
                                (pretrained, "ViT-F/2", "patch_size 1 vs 2")]:
        vit = ViT(vit_config(name, image_size=(8, 8), num_classes=100))
        with pytest.raises(UserError, match=re.escape(message)) as error:
            init_encoder(str(path), vit)
        assert str(path) in str(error.value)
