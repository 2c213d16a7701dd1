"""A generator's pipeline folder loads in stock diffusers, without pixtok: the folder carries the
pipeline's and the transformer's code (pixtok/pipeline.py), and a process that cannot import
pixtok samples from it the same images as `pixtok sample`."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from clirun import ENV, ROOT, pixtok
from conftest import LABELS
from PIL import Image

from pixtok.pipeline import CARRIED_CODE, PixelDiTPipeline
from training.sample import image_grid

SITE_PACKAGES = sysconfig.get_paths()["purelib"]

# Run in `python -I -S`: no PYTHONPATH, no working directory, no site-packages .pth files (so
# not pixtok's editable install); only the installed packages' folder is put back on sys.path.
STOCK = r"""
import json, sys
sys.path.append(sys.argv[1])
assert not any(p and __import__("os").path.isdir(__import__("os").path.join(p, "pixtok"))
               for p in sys.path), sys.path
try:
    import pixtok
except ImportError:
    pass
else:
    raise SystemExit(f"pixtok is importable here: {pixtok.__file__}")
import numpy as np
import torch
from diffusers import DiffusionPipeline

folder, label, n, seed, steps, guidance, out = sys.argv[2:]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe([label] * int(n), guidance_scale=float(guidance), num_inference_steps=int(steps),
              generator=torch.Generator().manual_seed(int(seed)), output_type="pt").images
np.save(out, images.float().numpy())
print(json.dumps({"pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
                  "transformer": type(pipe.transformer).__module__,
                  "scheduler": type(pipe.scheduler).__name__, "labels": pipe.labels,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] == "pixtok")}))
"""


def stock_diffusers(folder: Path, tmp_path: Path, label: str, n: int, seed: int, steps: int,
                    guidance: float) -> tuple[dict, np.ndarray]:
    """Sample from `folder` in a process where pixtok cannot be imported."""
    out = tmp_path / "stock.npy"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-I", "-S", "-c", STOCK, SITE_PACKAGES, str(folder),
                          label, str(n), str(seed), str(steps), str(guidance), str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1]), np.load(out)


def test_the_folder_carries_its_code_and_names_it(tiny_generator):
    index = json.loads((tiny_generator / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_pixel_dit", "PixelDiTPipeline"]
    assert index["transformer"] == ["pixel_dit", "PixelDiT"]
    assert index["vae"] == ["diffusers", "VQModel"] and index["labels"] == LABELS
    for name, module in CARRIED_CODE.items():      # copies of pixtok's own modules, byte for byte
        assert (tiny_generator / name).read_bytes() == Path(module.__file__).read_bytes(), name
    assert (tiny_generator / "pipeline_pixel_dit.py").is_file()
    assert {p.name for p in (tiny_generator / "transformer").glob("*.py")} == \
        {"pixel_dit.py", "pixel_layers.py"}


@pytest.mark.parametrize("name", sorted(CARRIED_CODE))
def test_carried_code_imports_torch_and_diffusers_only(name):
    """What a folder carries may not import pixtok, or anything but torch, diffusers, the
    standard library and its sibling files (relatively)."""
    source = Path(CARRIED_CODE[name].__file__)
    siblings = {Path(n).stem for n in CARRIED_CODE if Path(n).parent == Path(name).parent}
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in siblings, (name, node.module)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for top in (n.split(".")[0] for n in names):
                assert top in {"torch", "diffusers", "__future__"} | sys.stdlib_module_names, \
                    (name, top)


def test_stock_diffusers_samples_what_pixtok_sample_draws(tiny_generator, tmp_path):
    label, n, seed, steps, guidance = "bag", 3, 11, 5, 3.0
    png = tmp_path / "pixtok.png"
    pixtok("sample", tiny_generator, "--label", label, "--seed", seed, "--steps", steps,
           "--sampler", "ddpm", "--guidance", guidance, "-n", n, "--out", png,
           env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    info, images = stock_diffusers(tiny_generator, tmp_path, label, n, seed, steps, guidance)
    assert info["pipeline"] == "diffusers_modules.local.pipeline_pixel_dit.PixelDiTPipeline"
    assert info["transformer"] == "diffusers_modules.local.pixel_dit"
    assert info["scheduler"] == "DDPMScheduler" and info["labels"] == LABELS
    assert info["modules"] == []
    assert images.shape == (n, 1, 16, 16) and images.std() > 0.01
    import torch

    mine = np.asarray(image_grid(torch.from_numpy(images)))
    np.testing.assert_array_equal(mine, np.asarray(Image.open(png)))


def test_pixtok_loads_the_folder_without_running_its_code(tiny_generator, tmp_path):
    """pixtok builds the parts from its own classes: a folder's code is never executed by it
    (here a carried file that would fail on import), and folders of the older layout load."""
    import shutil

    folder = tmp_path / "gen"
    shutil.copytree(tiny_generator, folder)
    (folder / "pipeline_pixel_dit.py").write_text("raise RuntimeError('ran the folder code')\n")
    (folder / "transformer" / "pixel_dit.py").write_text("raise RuntimeError('ran it')\n")
    pipe = PixelDiTPipeline.from_pretrained(folder)
    assert type(pipe.transformer).__module__ == "pixtok.models.pixel_dit"
    assert pipe.labels == LABELS and type(pipe.scheduler).__name__ == "DDPMScheduler"
    old = json.loads((folder / "model_index.json").read_text())
    old.update(_class_name="PixelDiTPipeline", transformer=["training.models.dit", "PixelDiT"])
    (folder / "model_index.json").write_text(json.dumps(old))
    for name in CARRIED_CODE:
        (folder / name).unlink()
    assert PixelDiTPipeline.from_pretrained(folder).labels == LABELS
    with pytest.raises(TypeError, match="unexpected arguments"):
        PixelDiTPipeline.from_pretrained(folder, colour="red")


def test_the_shipped_generator_loads_in_stock_diffusers(tmp_path):
    """model_store/fashion-dit1 carries the code as links to the modules it copies."""
    folder = ROOT / "model_store" / "fashion-dit1"
    for name, module in CARRIED_CODE.items():
        assert (folder / name).resolve() == Path(module.__file__).resolve(), name
    info, images = stock_diffusers(folder, tmp_path, "Sneaker", 1, 0, 2, 4.0)
    assert info["labels"][7] == "Sneaker" and images.shape == (1, 1, 32, 32)
    assert PixelDiTPipeline.from_pretrained(folder).labels[7] == "Sneaker"
