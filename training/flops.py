"""Our FLOP counter: runs a model once on the meta device and counts the matmul-class operators.

A multiply-add counts 2. Counted: mm, addmm, bmm, baddbmm, matmul-based attention (SDPA kernels
and the math path they may decompose into) and convolutions. Elementwise ops, norms and softmax
are left out, as in the usual MFU convention (they are a few percent of a Transformer).
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _shape(t) -> list[int]:
    return list(t.shape)


def _mm(args) -> int:
    m, k = _shape(args[0])
    return 2 * m * k * _shape(args[1])[1]


def _addmm(args) -> int:
    return _mm(args[1:])


def _bmm(args) -> int:
    b, m, k = _shape(args[0])
    return 2 * b * m * k * _shape(args[1])[2]


def _baddbmm(args) -> int:
    return _bmm(args[1:])


def _sdpa(args) -> int:
    q, k = _shape(args[0]), _shape(args[1])        # (..., L, E), (..., S, E); v: (..., S, Ev)
    ev = _shape(args[2])[-1]
    batch = math.prod(q[:-2])
    return 2 * batch * q[-2] * k[-2] * q[-1] + 2 * batch * q[-2] * k[-2] * ev


def _conv(args) -> int:
    out_ch, in_per_group, *kernel = _shape(args[1])
    x = _shape(args[0])
    stride, padding, dilation = args[3], args[4], args[5]
    transposed = args[6]
    spatial_in = x[2:]
    if transposed:              # weight is (in, out/groups, k...): every input pixel scatters
        return 2 * x[0] * math.prod(spatial_in) * x[1] * in_per_group * math.prod(kernel)
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
           for s, p, d, k, st in zip(spatial_in, padding, dilation, kernel, stride)]
    return 2 * x[0] * out_ch * math.prod(out) * in_per_group * math.prod(kernel)


RULES = {
    aten.mm: _mm, aten.addmm: _addmm, aten.bmm: _bmm, aten.baddbmm: _baddbmm,
    aten.convolution: _conv,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_efficient_attention: _sdpa,
    aten._scaled_dot_product_flash_attention: _sdpa,
    aten._scaled_dot_product_cudnn_attention: _sdpa,
}


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of everything run inside `with FlopCounter() as fc:`; fc.total, fc.by_op."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        rule = RULES.get(func.overloadpacket)
        if rule is not None:
            self.by_op[str(func.overloadpacket)] += rule(args)
        return func(*args, **(kwargs or {}))


def count_forward_flops(build, inputs) -> int:
    """FLOPs of one forward pass of build() on inputs (a tuple), both made on the meta device,
    so even paper-size models are counted in milliseconds without memory."""
    with torch.device("meta"):
        model = build()
        args = tuple(a() if callable(a) else a for a in inputs)
    with FlopCounter() as fc, torch.no_grad():
        model(*args)
    return fc.total
