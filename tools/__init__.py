"""What measures or describes the parts: the `pixtok bench` suites (infer, sample, serve, load,
drill), the capacity notes (docs/capacity.md) and the shipped models' cards.

Tools may import every part (pixtok, training, export, serving), as the CLI does; no part
imports them, and the CLI only by name when `pixtok bench` runs one (docs/architecture.md).
"""
