"""A VQGAN run resumed midway (discriminator, its optimizer, the code-usage window and the
restart count come back from train_state.pt) ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json

import torch
from clirun import pixtok
from datafiles import learnable_fashion
from safetensors.torch import load_file

ARGS = ["vq_width=8", "codebook_size=32", "batch_size=32", "eval_batch_size=128", "threads=1",
        "amp=off", "eval_every=0.25", "restart_every=3", "gan_weight=0.1", "gan_start=6"]


def test_vqgan_resume_is_exact(tmp_path):
    data = learnable_fashion(tmp_path / "fashion", n_train=256, n_test=32)
    args = [f"data_dir={data}", *ARGS]
    pixtok("train", "vqgan-fashion", "--out", str(tmp_path / "a"), *args, "max_steps=16")
    pixtok("train", "vqgan-fashion", "--out", str(tmp_path / "b"), *args, "max_steps=8")
    pixtok("train", "vqgan-fashion", "--out", str(tmp_path / "b"), "--resume", "max_steps=16")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" /
                                                                     "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)["task"]
    sb = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["task"]
    assert sa["step"] == sb["step"] == 16 and sa["restarts"] == sb["restarts"] > 0
    for k in sa["disc"]:
        assert torch.equal(sa["disc"][k], sb["disc"][k]), k
    lines = [[{k: v for k, v in json.loads(x).items() if k != "time"}
              for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert lines[0] == lines[1] and [m["step"] for m in lines[0]] == [2, 4, 6, 8, 10, 12, 14, 16]
