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


def test_bench_serve_has_torchserve_kserve_and_in_process_rows(tmp_path):
    """`pixtok bench serve --quick`: every path at 1, 4 and 16 clients in one run (numbers are
    not asserted beyond being measured)."""
    out = tmp_path / "serve.json"
    res = pixtok("bench", "serve", "--quick", "--json", out, timeout=1200)
    data = json.loads(out.read_text())
    assert data == json.loads(res.stdout) and data["suite"] == "serve"
    rows = {(r["path"], r["clients"]): r for r in data["results"]}
    assert set(rows) == {(path, clients)
                         for path in ("torchserve", "torchserve-direct", "kserve", "kserve-v2",
                                      "in-process")
                         for clients in (1, 4, 16)}
    for r in rows.values():
        assert r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert data["startup_s"] > 0 and data["startup_kserve_s"] > 0
    ping = data["ping"]           # the gate's own cost: /ping through it and around it
    assert ping["n"] > 0 and 0 < ping["torchserve"]["p50_ms"] <= ping["torchserve"]["p99_ms"]
    assert ping["gate_p50_ms"] == round(ping["torchserve"]["p50_ms"]
                                        - ping["torchserve-direct"]["p50_ms"], 3)
