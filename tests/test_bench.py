"""`pixtok bench infer --quick` writes the JSON the issue specifies (numbers are not asserted)."""
from __future__ import annotations

import json

from clirun import pixtok


def test_bench_infer_json(tmp_path):
    out = tmp_path / "infer.json"
    res = pixtok("bench", "infer", "--quick", "--json", out)
    data = json.loads(out.read_text())
    assert data == json.loads(res.stdout)
    assert data["suite"] == "infer" and data["rounds"] >= 3
    first = data["results"][0]
    assert (first["model"], first["image_size"], first["batch"]) == ("ViT-T/1", 32, 8)
    for r in data["results"]:
        assert r["images_per_s"] > 0 and r["gemm_flops_per_s"] > 1e8 and r["rounds"] >= 3
        # the median over rounds of (model rate / the same round's GEMM rate)
        assert 0 < r["fraction_of_gemm"] < 10
    # FlopCounterMode's count: ViT-T/1 at 32x32 (1024 tokens + [cls]), 100 classes
    assert first["flops_per_image"] == 20_566_030_848
    # the served classifier shape under PyTorch, ONNX Runtime fp32 and int8, side by side
    served = {(r["backend"], r["batch"]): r for r in data["results"] if r["model"] == "ViT-N/1"}
    assert set(served) == {(b, n) for b in ("torch", "onnxruntime", "onnxruntime-int8")
                           for n in (1, 16)}
    for r in served.values():
        assert r["speedup_vs_torch"] == r["images_per_s"] / served[("torch", r["batch"])][
            "images_per_s"]
    tokens = sorted({m["tokens"] for m in data["memory"]})
    assert tokens[:2] == [1024, 4096]
    by = {(m["tokens"], m["attention"]): m["peak_mb"] for m in data["memory"]}
    # the textbook attention materialises (heads, L, L) scores: it must cost more at 4096 tokens
    assert by[(4096, "naive")] > by[(4096, "sdpa")]


def test_bench_serve_has_torchserve_kserve_and_in_process_rows_per_backend(tmp_path):
    """`pixtok bench serve --quick`: every path with each backend at 1, 4 and 16 clients, in
    alternating rounds, in one run (numbers are not asserted beyond being measured)."""
    out = tmp_path / "serve.json"
    res = pixtok("bench", "serve", "--quick", "--json", out, timeout=1200)
    data = json.loads(out.read_text())
    assert data == json.loads(res.stdout) and data["suite"] == "serve"
    rows = {(r["path"], r["backend"], r["clients"]): r for r in data["results"]}
    assert set(rows) == {(path, backend, clients)
                         for path in ("torchserve", "kserve", "in-process")
                         for backend in ("torch", "onnxruntime")
                         for clients in (1, 4, 16)}
    for (path, backend, clients), r in rows.items():
        assert r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["rounds"] == data["rounds"] >= 2
        assert ("of_in_process" in r) == (path != "in-process")
        assert ("speedup_vs_torch" in r) == (backend == "onnxruntime")
        if backend == "onnxruntime":
            eager = rows[(path, "torch", clients)]["images_per_s"]
            assert r["speedup_vs_torch"] == round(r["images_per_s"] / eager, 3)
    assert data["startup_s"] > 0 and data["startup_kserve_s"] > 0 and data["threads"] >= 1
    ping = data["ping"]           # the gate's own cost: /ping through it and around it
    assert ping["n"] > 0 and 0 < ping["torchserve"]["p50_ms"] <= ping["torchserve"]["p99_ms"]
    assert ping["gate_p50_ms"] == round(ping["torchserve"]["p50_ms"]
                                        - ping["torchserve-direct"]["p50_ms"], 3)
