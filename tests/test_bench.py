"""`pixtok bench infer --quick` writes the JSON the issue specifies (numbers are not asserted)."""
from __future__ import annotations

import json

from clirun import pixtok


def test_bench_infer_json(tmp_path):
    out = tmp_path / "infer.json"
    res = pixtok("bench", "infer", "--quick", "--json", out)
    data = json.loads(out.read_text())
    assert data == json.loads(res.stdout)
    assert data["suite"] == "infer"
    first = data["results"][0]
    assert (first["model"], first["image_size"], first["batch"]) == ("ViT-T/1", 32, 8)
    for r in data["results"]:
        assert r["images_per_s"] > 0 and r["gemm_flops_per_s"] > 1e9
        assert r["fraction_of_gemm"] == r["images_per_s"] * r["flops_per_image"] / \
            r["gemm_flops_per_s"]
    assert first["flops_per_image"] == 20_566_030_848      # ViT-T/1 at 32x32, 100 classes
    tokens = sorted({m["tokens"] for m in data["memory"]})
    assert tokens[:2] == [1024, 4096]
    by = {(m["tokens"], m["attention"]): m["peak_mb"] for m in data["memory"]}
    # the textbook attention materialises (heads, L, L) scores: it must cost more at 4096 tokens
    assert by[(4096, "naive")] > by[(4096, "sdpa")]
