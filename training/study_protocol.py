"""A study's pre-registered protocol: the decision rule, the learning-rate grid, the run plan
they imply, convergence, and the verdicts `pixtok study --report` writes.

A study file may fix, before any run, how it will be decided:

    [lr_grid]                  # seed 0 of every arm at each peak lr; the best on val is used
    lr = [1e-3, 2e-3]          # for the arm's other seeds
    [decision]
    margin = 0.003             # equivalence margin, in the metric's units
    add_seeds = [3, 4]         # added to both arms of an inconclusive, converged comparison
    [[decision.comparisons]]
    arms = ["p1", "p2"]
    paper = "better"           # the paper's claim for the first arm: better | worse | equal
    source = "Tab. 3(a): ..."  # where the paper says so, quoted in the report

The rule (`verdict`): the difference first arm - second arm, paired by seed and signed so that
positive means the first arm is better, with a two-sided 95 % t-interval over the pairs.
- paper better (worse): replicated when the interval excludes 0 on the paper's side;
  contradicted when it excludes 0 on the other side or lies within +-margin (no effect);
- paper equal: replicated when the interval lies within +-margin; contradicted when it lies
  wholly beyond it;
- otherwise inconclusive; and inconclusive ("not converged") whatever the means say when either
  arm's validation metric moved more than the margin over the last quarter of training.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from pixtok.errors import UserError

CLAIMS = ("better", "worse", "equal")
# the fraction of training at the end over which a converged run's val metric must be still
LAST = 0.25


@dataclass
class Comparison:
    a: str
    b: str
    paper: str
    source: str


@dataclass
class Decision:
    margin: float
    add_seeds: list[int]
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"margin": self.margin, "add_seeds": self.add_seeds,
                "comparisons": [vars(c) for c in self.comparisons]}


def _number(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{where}: {what} must be a number > 0, not {value!r}")
    return float(value)


def parse_lr_grid(table, where: str) -> list[float]:
    """[lr_grid] -> its peak learning rates ([] without the table)."""
    if table is None:
        return []
    if not isinstance(table, dict) or set(table) != {"lr"}:
        raise UserError(f"{where} [lr_grid]: expected one key, lr = [...]")
    values = table["lr"]
    if not isinstance(values, list) or len(values) < 2:
        raise UserError(f"{where} [lr_grid]: lr must list at least two rates, e.g. [1e-3, 2e-3]")
    rates = [_number(v, "each lr", f"{where} [lr_grid]") for v in values]
    if len(set(rates)) != len(rates):
        raise UserError(f"{where} [lr_grid]: the rates must differ, not {values}")
    return rates


def parse_decision(table, arms: dict, seeds: list[int], where: str) -> Decision | None:
    """[decision] -> Decision (None without the table: an exploration, no verdicts)."""
    if table is None:
        return None
    where = f"{where} [decision]"
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table")
    unknown = sorted(set(table) - {"margin", "add_seeds", "comparisons"})
    if unknown or "margin" not in table or not table.get("comparisons"):
        raise UserError(f"{where}: needs margin and [[decision.comparisons]]"
                        + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))
    add = table.get("add_seeds", [])
    if not isinstance(add, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                            for s in add) or set(add) & set(seeds) \
            or len(set(add)) != len(add):
        raise UserError(f"{where}: add_seeds must be distinct whole numbers not in seeds, "
                        f"not {add!r}")
    decision = Decision(_number(table["margin"], "margin", where), list(add))
    for i, c in enumerate(table["comparisons"]):
        here = f"{where} comparison {i + 1}"
        if not isinstance(c, dict) or set(c) - {"arms", "paper", "source"}:
            raise UserError(f"{here}: keys are arms, paper, source")
        pair = c.get("arms")
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1] or \
                not set(pair) <= set(arms):
            raise UserError(f"{here}: arms must name two different arms of the study, "
                            f"not {pair!r}")
        if c.get("paper") not in CLAIMS:
            raise UserError(f"{here}: paper must be one of {', '.join(CLAIMS)} (the paper's "
                            f"claim for {pair[0]} against {pair[1]})")
        if not isinstance(c.get("source"), str) or not c["source"].strip():
            raise UserError(f"{here}: source must say where the paper claims it")
        decision.comparisons.append(Comparison(pair[0], pair[1], c["paper"], c["source"]))
    return decision


def rule_text(decision: Decision | None, seeds: list[int], metric: str) -> str:
    """The pre-registered rule in words, as the report prints it beside the verdicts."""
    if decision is None:
        return ("No verdict was pre-registered for this study (an exploration): its numbers "
                "are reported, not decided.")
    more = (f"; seeds {decision.add_seeds} are added to both arms of a comparison that is "
            "inconclusive and converged" if decision.add_seeds else "")
    return (f"Fixed in the study file before any run. For each comparison A vs B: the "
            f"difference A - B in {metric}, paired by seed and signed so that > 0 means A is "
            f"better, with a two-sided 95 % t-interval (Student's t, n - 1 degrees of freedom) "
            f"over the pairs; equivalence margin ±{decision.margin:g}. Where the paper says A "
            "is better (worse): **replicated** if the interval excludes 0 on the paper's side, "
            "**contradicted** if it excludes 0 on the other side or lies within the margin; "
            "where the paper says they are equal: **replicated** if the interval lies within "
            "the margin, **contradicted** if it lies wholly beyond it; otherwise "
            "**inconclusive**. Whatever the means say, a comparison is **inconclusive (not "
            f"converged)** when either arm's mean val {metric} moved more than the margin over "
            f"the last {LAST:.0%} of training. Seeds {seeds} first{more}.")


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def paired_interval(diffs: list[float]) -> dict:
    """Mean of paired differences with its two-sided 95 % t-interval (None below 2 pairs)."""
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": diffs[0] if diffs else None, "low": None, "high": None}
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def verdict(interval: dict, paper: str, margin: float, converged: bool) -> str:
    low, high = interval["low"], interval["high"]
    if low is None:
        return "pending"
    if not converged:
        return "inconclusive (not converged)"
    within = -margin <= low and high <= margin
    if paper == "equal":
        if within:
            return "replicated"
        return "contradicted" if low > margin or high < -margin else "inconclusive"
    sign = 1 if paper == "better" else -1
    low, high = sorted((sign * low, sign * high))
    if low > 0:
        return "replicated"
    return "contradicted" if high < 0 or within else "inconclusive"


def curve_values(curve: list[dict], metric: str) -> list[tuple[float, float]]:
    """[(epoch, value)] of a run's val evaluations that hold the metric."""
    return [(float(e["epoch"]), float(e[metric])) for e in curve
            if e.get(metric) is not None and e.get("epoch") is not None]


def late_movement(curve: list[dict], metric: str, lower_is_better: bool) -> float | None:
    """How far the val metric improved over the last quarter of training: the last value minus
    the one at (or just before) 75 % of the epochs, signed so that > 0 is an improvement; None
    with fewer than four evaluations (convergence cannot be shown)."""
    points = curve_values(curve, metric)
    if len(points) < 4:
        return None
    end_epoch, end = points[-1]
    before = [v for e, v in points if e <= (1 - LAST) * end_epoch + 1e-9]
    if not before:
        return None
    move = end - before[-1]
    return -move if lower_is_better else move


def choose_lr(results: dict[float, dict], metric: str, lower_is_better: bool) -> float | None:
    """The grid's rate whose seed-0 run is best on val ({lr: result}); None until all ran.
    A tie goes to the rate listed first."""
    if not results or any(r is None for r in results.values()):
        return None

    def score(lr):
        value = results[lr]["val"].get(metric)
        value = math.inf if value is None else float(value)
        return value if lower_is_better else -value
    return min(results, key=score)


def decide(decision: Decision, finals: dict, metric: str, lower_is_better: bool) -> list[dict]:
    """Each comparison's verdict from the finished runs ({(arm, seed): result} at each arm's
    chosen lr)."""
    rows = []
    for c in decision.comparisons:
        seeds = sorted(s for (arm, s) in finals if arm == c.a and (c.b, s) in finals)
        diffs = []
        for s in seeds:
            a, b = (finals[(arm, s)]["test"].get(metric) for arm in (c.a, c.b))
            if a is not None and b is not None:
                diffs.append((b - a) if lower_is_better else (a - b))
        interval = paired_interval(diffs)
        moves = {}
        for arm in (c.a, c.b):
            found = [late_movement(finals[(arm, s)].get("curve", []), metric, lower_is_better)
                     for s in seeds]
            moves[arm] = None if not found or None in found else statistics.fmean(found)
        converged = all(m is not None and abs(m) <= decision.margin for m in moves.values())
        rows.append({"arms": [c.a, c.b], "paper": c.paper, "source": c.source, **interval,
                     "late_movement": moves, "converged": converged,
                     "verdict": verdict(interval, c.paper, decision.margin, converged)})
    return rows


def fmt_interval(row: dict) -> str:
    if row["low"] is None:
        return "—" if row["mean"] is None else f"{row['mean']:+.4f} (n=1)"
    return f"{row['mean']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}] (n={row['n']})"


def fmt_move(value) -> str:
    return "not shown (< 4 evaluations)" if value is None else f"{value:+.4f}"
