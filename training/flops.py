"""FLOP counting: PyTorch's own counter (torch.utils.flop_counter.FlopCounterMode), plus the one
attention kernel it has no formula for (CPU flash attention), counted like its GPU siblings.

A multiply-add counts 2. Counted: matmuls (mm, addmm, bmm, baddbmm), attention (the SDPA
kernels, or the matmuls of the math path they decompose into on the meta device) and
convolutions. Elementwise ops, norms and softmax are left out, as in the usual MFU convention
(they are a few percent of a Transformer).
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and (softmax)V of a (..., L, E) x (..., S, E) x (..., S, Ev) attention."""
    batch = math.prod(query_shape[:-2])
    length, span = query_shape[-2], key_shape[-2]
    return 2 * batch * length * span * (query_shape[-1] + value_shape[-1])


class FlopCounter(FlopCounterMode):
    """Counts FLOPs of everything run inside `with FlopCounter() as fc:`; fc.total, fc.by_op."""

    def __init__(self):
        super().__init__(display=False, custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops})

    @property
    def total(self) -> int:
        return self.get_total_flops()

    @property
    def by_op(self) -> Counter:
        return Counter({str(op): n for op, n in self.get_flop_counts().get("Global", {}).items()})


def count_forward_flops(build, inputs) -> int:
    """FLOPs of one forward pass of build() on inputs (a tuple), both made on the meta device,
    so even paper-size models are counted in milliseconds without memory."""
    with torch.device("meta"):
        model = build()
        args = tuple(a() if callable(a) else a for a in inputs)
    with FlopCounter() as fc, torch.no_grad():
        model(*args)
    return fc.total
