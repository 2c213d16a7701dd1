"""`pixtok study`: a comparison of recipe variants (arms) over seeds, as resumable real runs.

A study file (TOML, training/studies/NAME.toml) names a base recipe, the seeds, the metric (a
key of `pixtok eval`'s JSON) and one table of recipe overrides per arm:

    base = "vit1-fashion"
    seeds = [0, 1, 2]
    metric = "acc1"
    held_fixed = "input size 28x28, model size, epochs"   # said in the report
    [overrides]            # every arm
    val_size = 5000
    [arms.p1]
    model = "ViT-P/1"
    [scales.paper]         # `scale=paper` on the command line: more overrides for every arm
    epochs = 100
    [scales.paper.arms.p1] # ... and for one arm
    lr = 5e-4

Every arm x seed is a real `pixtok train BASE --out DIR/runs/ARM/seedS --resume seed=S ...` in
a subprocess (so a killed study continues each run from its last checkpoint), then `pixtok
eval` of the finished checkpoint on the validation split and on the test split, once. A run's
result.json marks it finished. DIR/study.json holds the study file's hash: a folder is never
continued with another study file or other overrides. DIR/results.json and DIR/report.md (with
PNG plots) are rewritten from the finished runs at the end of every invocation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tqdm import tqdm

from pixtok.checkpoint import write_json
from pixtok.errors import UserError
from training.checkpoint import settle_folder
from training.recipe import FIELDS, load_recipe, parse_overrides
from training.study_protocol import (
    choose_lr,
    decide,
    fmt_interval,
    fmt_move,
    late_movement,
    parse_decision,
    parse_lr_grid,
    rule_text,
)

STUDY_DIR = Path(__file__).parent / "studies"
LOWER_IS_BETTER = {"loss", "rmse", "rel", "log10", "silog", "rmse_scaled", "fid_proxy"}
NATIVE_SIZE = {"fashion-mnist": (28, 28), "cifar100": (32, 32), "cifar100-coarse": (32, 32),
               "scenes": (48, 64), "nyu": (48, 64)}
STUDY_KEYS = {"base", "seeds", "metric", "overrides", "arms", "scales", "held_fixed", "plot_x",
              "description", "analyze", "generator", "lr_grid", "decision", "also"}
# where a shipped study's finished runs are recorded, in the project (committed as they finish)
RECORDS_DIR = STUDY_DIR.parents[1] / "docs" / "studies"
# a generator study's [generator] table: how each finished generator is measured
GENERATOR_KEYS = {"guidance", "samples", "judge", "judge_sha256", "sampler", "steps",
                  "sample_seed", "judge2", "judge2_sha256"}


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def find_study(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    path = STUDY_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"unknown study {name_or_path!r}; known studies: "
                        f"{', '.join(study_names())} (or give a .toml file)")
    return path


def _table_overrides(table: dict, where: str) -> dict:
    """A TOML table of recipe overrides, checked against the recipe's keys."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table of recipe overrides")
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown recipe key(s) {', '.join(unknown)}")
    return dict(table)


class Study:
    """A parsed study file plus the command line's overrides; arms resolved to recipes."""

    def __init__(self, name_or_path: str, overrides: list[str] = ()):
        self.path = find_study(name_or_path)
        text = self.path.read_bytes()
        spec = self._read_spec(text)
        where = str(self.path)
        self.name = self.path.stem
        self.base, self.metric = spec["base"], spec["metric"]
        self.seeds = self._check_seeds(spec["seeds"], where)
        self.held_fixed = spec.get("held_fixed", "")
        self.plot_x = spec.get("plot_x", "")
        self.also = spec.get("also", [])           # more test metrics, reported beside
        if not isinstance(self.also, list) or not all(isinstance(m, str) for m in self.also):
            raise UserError(f"{where}: also must list metric names, not {self.also!r}")
        if self.plot_x and self.plot_x not in FIELDS:
            raise UserError(f"{where}: plot_x={self.plot_x!r} is not a recipe key")
        self.lower_is_better = self.metric.split("@")[0] in LOWER_IS_BETTER
        self.analyze = spec.get("analyze", [])
        if not isinstance(self.analyze, list) or set(self.analyze) - set(spec["arms"]):
            raise UserError(f"{where}: analyze must list arms of the study, not {self.analyze}")
        self.arms = self._arm_values(spec, overrides, where)
        self.recipes = {arm: self._check_arm(arm, values) for arm, values in self.arms.items()}
        tasks = {r.task for r in self.recipes.values()}
        if tasks - {"classify", "depth", "dit"} or len(tasks) > 1:
            raise UserError(f"{where}: a study compares classify, depth or dit runs, one task "
                            f"per study, not {', '.join(sorted(tasks))}")
        self.task = tasks.pop()
        self.generator = self._check_generator(spec.get("generator"), where)
        self.lr_grid = parse_lr_grid(spec.get("lr_grid"), where)
        if self.lr_grid and any("lr" in values for values in self.arms.values()):
            raise UserError(f"{where}: an arm sets lr, which [lr_grid] chooses")
        self.decision = parse_decision(spec.get("decision"), self.arms, self.seeds, where)
        digest = hashlib.sha256(text)
        digest.update(json.dumps(sorted(overrides)).encode())
        self.sha256 = digest.hexdigest()
        self.file_sha256 = hashlib.sha256(text).hexdigest()
        self.overrides = list(overrides)

    def _read_spec(self, text: bytes) -> dict:
        """The study file's TOML, with its required keys and no unknown ones."""
        try:
            spec = tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not valid TOML ({e})") from None
        unknown = sorted(set(spec) - STUDY_KEYS)
        if unknown:
            raise UserError(f"{self.path}: unknown study key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(STUDY_KEYS))}")
        for key in ("base", "seeds", "metric", "arms"):
            if key not in spec:
                raise UserError(f"{self.path}: missing {key!r}")
        return spec

    def _check_generator(self, table, where: str) -> dict | None:
        """The [generator] table of a dit study, checked; the judge's weights must be the ones
        the file pins, so that a re-shipped classifier never silently changes a score."""
        if self.task != "dit":
            if table is not None:
                raise UserError(f"{where}: [generator] is for dit studies; this one trains "
                                f"{self.task} runs")
            return None
        if not isinstance(table, dict):
            raise UserError(f"{where}: a dit study needs a [generator] table (guidance, samples, "
                            "judge, judge_sha256)")
        unknown = sorted(set(table) - GENERATOR_KEYS)
        missing = sorted({"guidance", "samples", "judge", "judge_sha256"} - set(table))
        if unknown or missing:
            raise UserError(f"{where} [generator]: "
                            + (f"unknown key(s) {', '.join(unknown)}" if unknown else
                               f"missing {', '.join(missing)}")
                            + f"; keys: {', '.join(sorted(GENERATOR_KEYS))}")
        guidance = table["guidance"]
        if not isinstance(guidance, list) or not guidance or not all(
                isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 1
                for g in guidance):
            raise UserError(f"{where} [generator]: guidance must list scales >= 1, e.g. "
                            f"[1.0, 1.5], not {guidance!r}")
        samples = table["samples"]
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 4:
            raise UserError(f"{where} [generator]: samples must be a whole number >= 4")
        from pixtok.sampling import SAMPLERS
        if table.get("sampler", SAMPLERS[0]) not in SAMPLERS:
            raise UserError(f"{where} [generator]: sampler must be one of {', '.join(SAMPLERS)}")
        from training.evaluate_generator import PROTOCOL_METRICS
        name, _, at = self.metric.partition("@")
        scales = [f"{float(g):g}" for g in guidance]
        if name not in PROTOCOL_METRICS or at not in scales:
            raise UserError(f"{where}: metric {self.metric!r}: a dit study's metric is "
                            f"METRIC@GUIDANCE with METRIC one of {', '.join(PROTOCOL_METRICS)} "
                            f"and GUIDANCE one of {', '.join(scales)}")
        if ("judge2" in table) != ("judge2_sha256" in table):
            raise UserError(f"{where} [generator]: judge2 and judge2_sha256 go together")
        judges = {key: pinned_judge(table[key], table[f"{key}_sha256"], f"{where} [generator]")
                  for key in ("judge", "judge2") if key in table}
        return {**table, **judges, "guidance": [float(g) for g in guidance]}

    @staticmethod
    def _check_seeds(seeds, where: str) -> list[int]:
        if not isinstance(seeds, list) or not seeds:
            raise UserError(f"{where}: seeds is empty; give at least one, e.g. seeds = [0, 1, 2]")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or \
                len(set(seeds)) != len(seeds):
            raise UserError(f"{where}: seeds must be distinct whole numbers, not {seeds}")
        return seeds

    @staticmethod
    def _scale_tables(spec: dict, scale: str, where: str) -> tuple[dict, dict]:
        """(overrides for every arm, {arm: overrides}) of the [scales.NAME] set `scale`."""
        if not scale:
            return {}, {}
        scales = spec.get("scales", {})
        if scale not in scales:
            raise UserError(f"scale={scale}: {where} has no [scales.{scale}] "
                            f"(it has: {', '.join(scales) or 'none'})")
        table = dict(scales[scale])
        scale_arms = table.pop("arms", {})
        for arm in scale_arms:
            if arm not in spec["arms"]:
                raise UserError(f"{where} [scales.{scale}.arms.{arm}]: no arm {arm!r}")
        return _table_overrides(table, f"{where} [scales.{scale}]"), scale_arms

    def _arm_values(self, spec: dict, overrides, where: str) -> dict[str, dict]:
        """{arm: recipe overrides}: the study's [overrides], the arm's table, a scale=NAME set,
        then the command line's key=value, later ones winning."""
        common = _table_overrides(spec.get("overrides", {}), f"{where} [overrides]")
        arms = spec["arms"]
        if not isinstance(arms, dict) or not arms:
            raise UserError(f"{where}: no [arms.NAME] tables")
        cli, scale = [], ""
        for item in overrides:
            key, sep, value = item.partition("=")
            if key == "scale" and sep:
                scale = value
            else:
                cli.append(item)
        cli_values = parse_overrides(cli)
        scale_common, scale_arms = self._scale_tables(spec, scale, where)
        values_of = {}
        for arm, table in arms.items():
            values = {**common, **_table_overrides(table, f"{where} [arms.{arm}]"),
                      **scale_common,
                      **_table_overrides(scale_arms.get(arm, {}), f"{where} [scales.{scale}."
                                                                  f"arms.{arm}]"),
                      **cli_values}
            if "seed" in values:
                raise UserError(f"{where} arm {arm}: seed is set by the study's seeds list")
            values_of[arm] = values
        return values_of

    def _check_arm(self, arm: str, values: dict):
        """The arm's recipe; an arm whose model the data cannot take is a user error now, not
        hours into the study."""
        try:
            recipe = load_recipe(self.base, values)
        except UserError as e:
            raise UserError(f"arm {arm}: {e}") from None
        if recipe.task in ("classify", "depth", "mae") and recipe.model.startswith("ViT-"):
            from pixtok.models.vit import vit_config
            size = tuple(recipe.image_size) or NATIVE_SIZE.get(recipe.dataset)
            if size:
                try:
                    vit_config(recipe.model, image_size=size, pos_embed=recipe.pos_embed,
                               embed=recipe.embed, pool=recipe.pool)
                except ValueError as e:
                    raise UserError(f"arm {arm} (model={recipe.model}, image "
                                    f"{size[0]}x{size[1]}): {e}") from None
        return recipe

    def runs(self) -> list[tuple[str, int]]:
        """Every (arm, seed) of the first seeds: seeds in order, each with every arm in file
        order, so that a study stopped early has compared every arm on its first seeds."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]

    def all_seeds(self) -> list[int]:
        return self.seeds + (self.decision.add_seeds if self.decision else [])

    def shard_of(self, arm: str, seed: int, n: int) -> int:
        """The shard (of n) that runs (arm, seed), every lr of it: fixed whatever has run."""
        order = [(a, s) for s in self.all_seeds() for a in self.arms]
        return order.index((arm, seed)) % n

    @staticmethod
    def run_path(arm: str, seed: int, lr: float | None = None) -> str:
        """A run's place under DIR/runs/ (and its record's under the records folder)."""
        return f"{arm}/seed{seed}" if lr is None else f"{arm}/lr{lr:g}/seed{seed}"

    def chosen_lrs(self, done: dict) -> dict[str, float | None]:
        """{arm: the grid's rate that seed 0 found best on val, None until its grid ran}."""
        first = self.seeds[0]
        return {arm: choose_lr({lr: done.get((arm, first, lr)) for lr in self.lr_grid},
                               self.metric, self.lower_is_better) for arm in self.arms}

    def finals(self, done: dict) -> dict[tuple[str, int], dict]:
        """{(arm, seed): result} of the finished runs that count: each arm at its chosen lr."""
        if not self.lr_grid:
            return {(arm, seed): r for (arm, seed, _), r in done.items()}
        chosen = self.chosen_lrs(done)
        return {(arm, seed): r for (arm, seed, lr), r in done.items() if lr == chosen[arm]}

    def verdicts(self, done: dict, seeds: list[int] | None = None) -> list[dict]:
        if self.decision is None:
            return []
        finals = {k: r for k, r in self.finals(done).items() if seeds is None or k[1] in seeds}
        return decide(self.decision, finals, self.metric, self.lower_is_better)

    def extra_seeds(self, done: dict) -> set[tuple[str, int]]:
        """(arm, seed) runs the rule adds: the decision's add_seeds for both arms of each
        comparison that is inconclusive (and converged) on the first seeds, all of them run,
        decided on the first seeds alone so that no verdict is reached by stopping early."""
        finals, extra = self.finals(done), set()
        for row in self.verdicts(done, self.seeds):
            complete = all((arm, s) in finals for arm in row["arms"] for s in self.seeds)
            if complete and row["verdict"] == "inconclusive":
                extra |= {(arm, s) for arm in row["arms"] for s in self.decision.add_seeds}
        return extra

    def plan(self, done: dict) -> list[tuple[tuple[str, int, float | None], bool]]:
        """[((arm, seed, lr), ready)]: every run the protocol asks for, given the finished ones
        ({(arm, seed, lr): result}); a run waits (not ready) until its arm's lr is chosen."""
        chosen = self.chosen_lrs(done) if self.lr_grid else {}
        extra = self.extra_seeds(done)
        planned = []
        for seed in self.all_seeds():
            for arm in self.arms:
                if seed not in self.seeds and (arm, seed) not in extra:
                    continue
                if not self.lr_grid:
                    planned.append(((arm, seed, None), True))
                elif seed == self.seeds[0]:
                    planned += [((arm, seed, lr), True) for lr in self.lr_grid]
                else:
                    planned.append(((arm, seed, chosen[arm]), chosen[arm] is not None))
        return planned

    def arm_args(self, arm: str, seed: int, lr: float | None = None) -> list[str]:
        """The key=value overrides `pixtok train` gets for one run."""
        args = []
        for key, value in self.arms[arm].items():
            if isinstance(value, list):
                value = ("x" if key == "image_size" else ",").join(map(str, value))
            elif isinstance(value, bool):
                value = str(value).lower()
            args.append(f"{key}={value}")
        return args + ([f"lr={lr:g}"] if lr is not None else []) + [f"seed={seed}"]


def pinned_judge(path: str, sha256: str, where: str) -> str:
    """The judge classifier's folder, whose weights must be the ones the study file pins, so
    that a re-shipped classifier never silently changes a score."""
    from training.evaluate_generator import judge_sha256
    judge = Path(path)
    if not judge.is_absolute() and not judge.exists():
        judge = STUDY_DIR.parents[1] / judge           # a path in the project
    found = judge_sha256(judge)
    if found != sha256:
        raise UserError(f"{where}: the judge {judge} has weights sha256 {found[:16]}..., the "
                        f"study pins {str(sha256)[:16]}...; scores from another judge are not "
                        "comparable (pin the new hash in a new study file to change judges)")
    return str(judge)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(s) for s in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def claim_folder(out: Path, study: Study, resume: bool) -> None:
    """Create DIR/study.json, or check that DIR was made by this study file and overrides."""
    marker = out / "study.json"
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored.get("sha256") != study.sha256:
            what = "study file" if stored.get("file_sha256") != study.file_sha256 else \
                "command-line overrides"
            raise UserError(f"{out} holds a study made by a different {what} "
                            f"({stored.get('study')} {stored.get('file_sha256', '')[:12]}, "
                            f"overrides {stored.get('overrides')}); use another --out")
        if not resume and any((out / "runs").glob("*/*/config.json")):
            raise UserError(f"{out} already holds runs of this study; pass --resume to "
                            "continue it or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"study": study.name, "file": str(study.path), "sha256": study.sha256,
                        "file_sha256": study.file_sha256, "overrides": study.overrides,
                        "base": study.base, "metric": study.metric, "seeds": study.seeds,
                        "arms": study.arms})


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says: runs on two
    CPUs differ in their float sums, so the same seed need not give the same number on both."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    return (f"cpu ({cpu_model()}, {platform.machine()}, {threads} threads of "
            f"{os.cpu_count()} cores)")


def pixtok_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pixtok", *map(str, args)]


def run_logged(cmd: list[str], log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def evaluate(run_dir: Path, split: str, log: Path) -> dict:
    """`pixtok eval RUN --split SPLIT`, in this process (a subprocess per split costs more than
    the evaluation of a small model)."""
    from training.evaluate import evaluate_split
    metrics = evaluate_split(run_dir, split)
    with open(log, "a") as f:
        f.write(f"eval --split {split}: {json.dumps(metrics)}\n")
    return metrics


def final_val(run_dir: Path, step: int) -> dict | None:
    """The run's own evaluation of its final weights on val (training evaluates on val when it
    holds one out, and always at the last step), so the study need not repeat it."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1]) if lines and lines[-1].strip() else {}
    if last.get("step") != step:
        return None
    return metric_values(last)


def metric_values(evaluation: dict) -> dict:
    """An evaluation's line of metrics.jsonl less its step, epoch and time."""
    return {k: v for k, v in evaluation.items() if k not in ("step", "epoch", "time")}


def read_floors(out: Path) -> dict:
    """DIR/floors.json of a generator study: {VQGAN weights sha256: floors}, {} before any."""
    path = out / "floors.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_cost(run_dir: Path) -> tuple[int | None, int | None]:
    """(parameters, forward FLOPs per image) of a finished run's model, counted on meta."""
    import torch

    from pixtok.checkpoint import read_config
    from pixtok.models import build_model
    from training.flops import count_forward_flops

    config = read_config(run_dir)
    spec, shape = config.get("model"), config.get("input", {})
    if not spec or not shape.get("image_size"):
        return None, None
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(spec).parameters())
    if config.get("task") == "dit":          # one denoising step of one latent, no guidance
        c, h, w = shape["latent_shape"]
        inputs = (lambda: torch.randn(1, c, h, w), lambda: torch.tensor([500]),
                  lambda: torch.tensor([0]))
    else:
        h, w = shape["image_size"]
        inputs = (lambda: torch.rand(1, shape["channels"], h, w),)
    flops = count_forward_flops(lambda: build_model(spec).eval(), inputs)
    return params, flops


def evaluate_generator(study: Study, out: Path, run_dir: Path, log: Path,
                       floors_too: bool = True) -> dict:
    """The [generator] protocol on a generator folder (a finished run, or one of its snapshots)
    -> flat test metrics ({"fid_proxy@1.5": ..., "judge2.fid_proxy@1.5": ...}); the floors,
    which depend only on the VQGAN, the judge and n, are measured with the first run of each
    VQGAN and kept in DIR/floors.json."""
    from training.evaluate_generator import (
        Classifier,
        device,
        generator_config,
        load_pipeline,
        protocol_metrics,
    )
    from training.tasks.vqgan import weights_hash

    spec, dev = study.generator, device()
    config = generator_config(run_dir)
    vqgan = weights_hash(run_dir / "vae" / "diffusion_pytorch_model.safetensors")
    floors = read_floors(out)
    more = {"judge2": Classifier(spec["judge2"], dev)} if "judge2" in spec else {}
    result = protocol_metrics(load_pipeline(run_dir, dev), Classifier(spec["judge"], dev),
                              spec["guidance"], spec["samples"],
                              config.get("input", {}).get("pad", 0), spec.get("sampler"),
                              spec.get("steps"), spec.get("sample_seed", 0),
                              data_dir=(config.get("data") or {}).get("data_dir"),
                              floors=floors_too and vqgan not in floors, more_judges=more)
    if "floors" in result:
        floors[vqgan] = {**result.pop("floors"), "n": result["n"],
                         "judge_sha256": result["judge_sha256"], "first_run": str(run_dir)}
        write_json(out / "floors.json", floors)
    with open(log, "a") as f:
        f.write(f"generator protocol ({run_dir.name}): {json.dumps(result)}\n")
    flat = {f"{m}@{g}": v for g, metrics in result["by_guidance"].items()
            for m, v in metrics.items()}
    keys = ("n", "sampler", "steps", "seed", "judge_sha256") + tuple(f"{k}_sha256" for k in more)
    return {**flat, **{k: result[k] for k in keys}, "vqgan_sha256": vqgan}


def generator_curve(study: Study, out: Path, run_dir: Path, log: Path) -> list[dict]:
    """The protocol on each of the run's snapshots (keep_every), oldest first: [{"epoch",
    metrics...}]; each kept in its snapshot folder once measured, so a resumed study does not
    sample it again."""
    curve = []
    snapshots = [p for p in (run_dir / "snapshots").glob("epoch*") if settle_folder(p)]
    for snap in sorted(snapshots, key=lambda p: float(p.name[5:])):
        measured = snap / "protocol.json"
        if not measured.is_file():
            write_json(measured, evaluate_generator(study, out, snap, log, floors_too=False))
        curve.append({"epoch": float(snap.name[5:]), **json.loads(measured.read_text())})
    return curve


def read_curve(run_dir: Path) -> list[dict]:
    """The run's evaluations in training (metrics.jsonl: val where it holds one out)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def run_one(study: Study, out: Path, arm: str, seed: int, lr: float | None = None) -> dict:
    """Train (or continue) one arm x seed (at one lr of the grid), then evaluate it on val and
    on test once."""
    run_dir = out / "runs" / study.run_path(arm, seed, lr)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "study.log"
    t0 = time.time()
    code = run_logged(pixtok_cmd("train", study.base, "--out", run_dir, "--resume",
                                 *study.arm_args(arm, seed, lr)), log)
    if code:
        raise UserError(f"arm {arm} seed {seed}: pixtok train exited {code}: {last_error(log)} "
                        f"(log: {log})")
    wall = run_dir / "study_wall.json"           # train processes' seconds, summed over resumes
    spent = (json.loads(wall.read_text())["train_s"] if wall.is_file() else 0.0) + time.time() - t0
    write_json(wall, {"train_s": spent})
    config = json.loads((run_dir / "config.json").read_text())
    recipe = config["recipe"]
    selected_step = config["step"]
    curve = read_curve(run_dir)
    if study.task == "dit":     # fixed epochs, the final EMA weights: nothing is chosen on val
        val, test = {}, evaluate_generator(study, out, run_dir, log)
        # the generator's curve: its snapshots' protocol scores, then the final one's
        curve = generator_curve(study, out, run_dir, log) + [
            {"epoch": round(config.get("epoch", 0), 4), **test}]
    elif (best := settle_folder(run_dir / "best")) is not None:
        # the weights the validation split chose (training kept them as they went by); their
        # validation metrics are the ones that chose them
        chosen = json.loads((best / "config.json").read_text())
        val = metric_values(chosen["metrics"])
        test = evaluate(best, "test", log)          # the only look at test, once it is done
        selected_step = chosen["step"]
    else:
        val = final_val(run_dir, config["step"]) or evaluate(run_dir, "val", log) \
            if recipe.get("val_size") else {}
        test = evaluate(run_dir, "test", log)
    params, flops = model_cost(run_dir)
    # a run's own clock (metrics.jsonl's time) where the study's is shorter: a run started by
    # hand with the study's arguments and finished under it
    spent = max(spent, max((e.get("time", 0) for e in curve), default=0))
    keys = sorted(study.arms[arm]) + (["lr"] if lr is not None else [])
    result = {"arm": arm, "seed": seed, **({"lr": lr} if lr is not None else {}),
              "val": val, "test": test, "params": params,
              "flops_per_image": flops, "images_seen": config["step"] * recipe["batch_size"],
              "steps": config["step"], "selected_step": selected_step,
              "epochs": round(config.get("epoch", 0), 4),
              "wall_s": round(spent, 1), "device": device_name(),
              "recipe": {k: recipe[k] for k in keys if k in recipe}, "curve": curve}
    write_json(run_dir / "result.json", result)
    return result


def run_key(result: dict) -> tuple[str, int, float | None]:
    return result["arm"], result["seed"], result.get("lr")


def write_record(records: Path, study: Study, result: dict, run_dir: Path) -> Path:
    """A finished run's record, to be committed: its result (metrics, curve, device, wall time)
    and its config.json (recipe, labels, git commit), no weights. `--resume` skips a run that
    has one, on any machine."""
    path = records / f"{study.run_path(*run_key(result))}.json"
    config = json.loads((run_dir / "config.json").read_text())
    write_json(path, {"study": study.name, "sha256": study.sha256, "result": result,
                      "config": config})
    return path


def read_records(records: Path, study: Study) -> dict:
    """{(arm, seed, lr): result} of the records in the folder; a record of another study file
    is an error (the rule it was decided by is not this one)."""
    found = {}
    for path in sorted(records.rglob("*.json")) if records.is_dir() else []:
        record = json.loads(path.read_text())
        if record.get("sha256") != study.sha256:
            raise UserError(f"{path}: a record of study file {record.get('study')} "
                            f"{str(record.get('sha256'))[:12]}, not of this one "
                            f"({study.sha256[:12]}); records are kept per study file")
        result = record["result"]
        if result["arm"] in study.arms:
            found[run_key(result)] = result
    return found


def collect(study: Study, folders: list[Path], records: Path | None = None) -> dict:
    """{(arm, seed, lr): result} of the finished runs: the records, then the study folders'."""
    found = read_records(records, study) if records is not None else {}
    for folder in folders:
        marker = folder / "study.json"
        if not marker.is_file():
            raise UserError(f"{folder}: not a study folder (no study.json)")
        if json.loads(marker.read_text()).get("sha256") != study.sha256:
            raise UserError(f"{folder} holds a study made by a different study file or "
                            "overrides")
        for path in sorted((folder / "runs").rglob("result.json")):
            result = json.loads(path.read_text())
            if result.get("arm") in study.arms:
                found.setdefault(run_key(result), result)
    return found


def ordered(study: Study, done: dict) -> list[dict]:
    """The finished runs that count (each arm at its chosen lr), seeds then arms in order."""
    finals = study.finals(done)
    return [finals[(arm, seed)] for seed in study.all_seeds() for arm in study.arms
            if (arm, seed) in finals]


def metric_of(run: dict, study: Study, split: str):
    value = run[split].get(study.metric)
    return None if value is None else float(value)


def summarise(study: Study, runs: list[dict], split: str) -> list[dict]:
    rows = []
    for arm in study.arms:
        values = [v for r in runs if r["arm"] == arm
                  for v in [metric_of(r, study, split)] if v is not None]
        mine = [r for r in runs if r["arm"] == arm]
        rows.append({"arm": arm, "n": len(values),
                     "mean": statistics.fmean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else None,
                     "flops_per_image": mine[0]["flops_per_image"] if mine else None,
                     "params": mine[0]["params"] if mine else None,
                     "images_seen": mine[0]["images_seen"] if mine else None,
                     "recipe": study.arms[arm]})
    return rows


def fmt(mean, std, n) -> str:
    """mean ± sample std (n seeds); one seed has no spread to show."""
    if mean is None:
        return "not yet run"
    return f"{mean:.4f} (n=1)" if std is None else f"{mean:.4f} ± {std:.4f} (n={n})"


def plot_lines(study: Study, arms: list[str]) -> list[tuple[str, list[str]]]:
    """The lines of the metric-vs-plot_x figure: [(label, [arm, ...])]. Arms whose recipes
    agree on every setting the arms vary, plot_x aside, share a line (T = 0 swaps is on the
    line of the default distance, 0 = anywhere); the label names those settings. Without
    plot_x each arm stands alone."""
    if not study.plot_x:
        return [(arm, [arm]) for arm in arms]
    varied = []
    for a in study.arms:
        for k, v in study.arms[a].items():
            if k != study.plot_x and k not in varied and \
                    any(study.arms[b].get(k) != v for b in study.arms):
                varied.append(k)
    lines: dict[str, list[str]] = {}
    for a in arms:
        label = " ".join(f"{k}={getattr(study.recipes[a], k)}" for k in varied)
        lines.setdefault(label, []).append(a)
    return list(lines.items())


def plots(study: Study, test: list[dict], val: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in test if r["mean"] is not None]
    files = []
    if not done:
        return files
    label = f"test {study.metric} (mean ± std over seeds)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in done:
        if r["flops_per_image"]:
            ax.errorbar(r["flops_per_image"] / 1e9, r["mean"], yerr=r["std"] or 0, fmt="o",
                        capsize=3)
            ax.annotate(r["arm"], (r["flops_per_image"] / 1e9, r["mean"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="forward GFLOPs per image", ylabel=label, title=f"{study.name}: metric vs FLOPs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_flops.png", dpi=120)
    plt.close(fig)
    files.append("metric_vs_flops.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    if study.plot_x:
        xs = [r["recipe"].get(study.plot_x, getattr(study.recipes[r["arm"]], study.plot_x))
              for r in done]
        xs = [x if isinstance(x, (int, float)) else str(x) for x in xs]
        xlabel = study.plot_x
    else:
        xs, xlabel = [r["arm"] for r in done], "arm"
    x_of, row_of = dict(zip((r["arm"] for r in done), xs)), {r["arm"]: r for r in done}
    by_val = {r["arm"]: r for r in val}
    lines = plot_lines(study, [r["arm"] for r in done])
    for i, (name, arms) in enumerate(lines):
        if all(isinstance(x_of[a], (int, float)) for a in arms):
            arms = sorted(arms, key=x_of.get)
        x, colour = [x_of[a] for a in arms], f"C{i}"
        ax.errorbar(x, [row_of[a]["mean"] for a in arms], yerr=[row_of[a]["std"] or 0
                    for a in arms], fmt="o-", capsize=3, color=colour,
                    label=f"test: {name}" if len(lines) > 1 else "test")
        vals = [by_val[a] for a in arms]
        if all(v["mean"] is not None for v in vals):
            ax.errorbar(x, [v["mean"] for v in vals], yerr=[v["std"] or 0 for v in vals],
                        fmt="s--", capsize=3, alpha=0.45, color=colour,
                        label="validation (dashed)" if i == 0 else None)
    for r in done:
        ax.annotate(r["arm"], (x_of[r["arm"]], r["mean"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=study.metric, title=f"{study.name}: {study.metric} vs {xlabel}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_arm.png", dpi=120)
    plt.close(fig)
    files.append("metric_vs_arm.png")
    return files


def analyses(study: Study, runs: list[dict], out: Path, runs_dir: Path
             ) -> list[tuple[str, dict]]:
    """`pixtok analyze` of the first finished seed of each arm the study file lists under
    `analyze`, kept in DIR/analysis/ARM/ (computed once)."""
    from training.analyze import analyze_checkpoint
    done = []
    for arm in study.analyze:
        mine = [r for r in runs if r["arm"] == arm]
        run_dir = runs_dir / "runs" / study.run_path(*run_key(mine[0])) if mine else None
        folder = out / "analysis" / arm
        if not (folder / "analysis.json").is_file():
            if run_dir is None or not (run_dir / "model.safetensors").is_file():
                continue
            analyze_checkpoint(run_dir, folder)
        done.append((arm, json.loads((folder / "analysis.json").read_text())))
    return done


def generator_section(study: Study, runs: list[dict], runs_dir: Path) -> list[str]:
    """The report's table for a dit study: every protocol metric at every guidance scale
    (mean ± std over seeds), then the two floors and the judge."""
    from training.evaluate_generator import PROTOCOL_METRICS

    spec = study.generator
    scales = [f"{g:g}" for g in spec["guidance"]]
    lines = ["", "## Generators, measured by the pinned judge", "",
             f"{spec['samples']} samples per run and guidance scale (balanced over the classes, "
             f"sampler {spec.get('sampler') or 'the default'}, "
             f"{spec.get('steps') or 'its default'} steps, sampling seed "
             f"{spec.get('sample_seed', 0)}), each scored against as many real test images. "
             f"Judge: `{spec['judge']}`, weights sha256 `{spec['judge_sha256']}`. No checkpoint "
             "or guidance scale is chosen: every run trains the same epochs and is scored with "
             "its final (EMA) weights at every scale. A generator's GFLOPs/image above is one "
             "denoiser forward of one latent: a sample costs steps times that, twice over at a "
             "guidance scale above 1.", "",
             "| arm | guidance | " + " | ".join(PROTOCOL_METRICS) + " |",
             "|---|---|" + "---|" * len(PROTOCOL_METRICS)]
    for arm in study.arms:
        mine = [r for r in runs if r["arm"] == arm]
        for g in scales:
            cells = []
            for m in PROTOCOL_METRICS:
                values = [r["test"][f"{m}@{g}"] for r in mine if f"{m}@{g}" in r["test"]]
                cells.append(fmt(statistics.fmean(values) if values else None,
                                 statistics.stdev(values) if len(values) > 1 else None,
                                 len(values)))
            lines.append(f"| {arm} | {g} | " + " | ".join(cells) + " |")
    for vqgan, floor in read_floors(runs_dir).items():
        for name, what in (("real", "real test images (a disjoint set)"),
                           ("vqgan_recon", "VQGAN reconstructions of those real images")):
            cells = [f"{floor[name][m]:.4f}" if m in floor[name] else "—"
                     for m in PROTOCOL_METRICS]
            lines.append(f"| floor: {what}, VQGAN {vqgan[:12]} | — | " + " | ".join(cells) + " |")
    return lines


def grid_rows(study: Study, done: dict) -> list[dict]:
    """The lr grid's runs (first seed of each arm at each rate) and which rate was chosen."""
    chosen, first = study.chosen_lrs(done), study.seeds[0]
    return [{"arm": arm, "lr": lr, "seed": first,
             "val": done[(arm, first, lr)]["val"].get(study.metric)
             if (arm, first, lr) in done else None, "chosen": lr == chosen[arm]}
            for arm in study.arms for lr in study.lr_grid]


def grid_only(study: Study, done: dict) -> list[dict]:
    """The grid's runs at the rates that were not chosen (reported, never compared)."""
    kept = {id(r) for r in study.finals(done).values()}
    return [r for key, r in sorted(done.items(), key=lambda kv: str(kv[0]))
            if id(r) not in kept and "lr" in r]


def movements(study: Study, runs: list[dict]) -> dict:
    """{arm: [each run's val improvement over the last quarter of training]}."""
    moves: dict[str, list] = {}
    for r in runs:
        moves.setdefault(r["arm"], []).append(
            late_movement(r.get("curve", []), study.metric, study.lower_is_better))
    return moves


def curves_plot(study: Study, runs: list[dict], out: Path) -> list[str]:
    """curves.png: every counted run's val metric against epochs, one colour per arm."""
    from training.study_protocol import curve_values
    drawn = [(r, curve_values(r.get("curve", []), study.metric)) for r in runs]
    drawn = [(r, points) for r, points in drawn if len(points) > 1]
    if not drawn:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colour = {arm: f"C{i}" for i, arm in enumerate(study.arms)}
    fig, ax = plt.subplots(figsize=(6, 4))
    labelled = set()
    for r, points in drawn:
        ax.plot([e for e, _ in points], [v for _, v in points], "o-", ms=3, alpha=0.8,
                color=colour[r["arm"]], label=None if r["arm"] in labelled else r["arm"])
        labelled.add(r["arm"])
    ax.set(xlabel="epoch", ylabel=f"val {study.metric}",
           title=f"{study.name}: learning curves (each seed a line)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return ["curves.png"]


def mixed_devices(runs: list[dict]) -> list[str]:
    """A warning line for each seed whose arms ran on more than one device."""
    lines = []
    for seed in sorted({r["seed"] for r in runs}):
        devices = sorted({r["device"] for r in runs if r["seed"] == seed})
        if len(devices) > 1:
            lines += [f"**Seed {seed} ran on more than one device** ({'; '.join(devices)}): "
                      "its pairs mix float sums of different machines.", ""]
    return lines


def decision_section(study: Study, verdicts: list[dict]) -> list[str]:
    lines = ["## Decision", "", rule_text(study.decision, study.seeds, study.metric), ""]
    if not verdicts:
        return lines
    lines += ["| comparison | the paper says (where) | mean paired difference [95 % t-interval] "
              "(pairs) | last-quarter val movement per arm | verdict |", "|---|---|---|---|---|"]
    for v in verdicts:
        a, b = v["arms"]
        moves = ", ".join(f"{arm} {fmt_move(m)}" for arm, m in v["late_movement"].items()) \
            if v["n"] else "—"
        lines.append(f"| {a} vs {b} | {a} {v['paper']} ({v['source']}) | {fmt_interval(v)} | "
                     f"{moves} | **{v['verdict']}** |")
    return lines + [""]


def also_section(study: Study, runs: list[dict]) -> list[str]:
    """The study's other test metrics (`also`), mean ± std over seeds per arm."""
    if not study.also:
        return []
    lines = ["## Other test metrics", "", "| arm | " + " | ".join(study.also) + " |",
             "|---|" + "---|" * len(study.also)]
    for arm in study.arms:
        cells = []
        for m in study.also:
            values = [float(r["test"][m]) for r in runs if r["arm"] == arm and m in r["test"]]
            cells.append(fmt(statistics.fmean(values) if values else None,
                             statistics.stdev(values) if len(values) > 1 else None,
                             len(values)))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def grid_section(study: Study, done: dict) -> list[str]:
    if not study.lr_grid:
        return []
    lines = ["## Learning rate, chosen on val", "",
             f"Seed {study.seeds[0]} of each arm at each peak lr; the rate best on val "
             f"{study.metric} (at the step val chose) is used for every seed of that arm.", "",
             f"| arm | lr | val {study.metric} | chosen |", "|---|---|---|---|"]
    for row in grid_rows(study, done):
        value = "not yet run" if row["val"] is None else f"{row['val']:.4f}"
        lines.append(f"| {row['arm']} | {row['lr']:g} | {value} | "
                     f"{'yes' if row['chosen'] else ''} |")
    return lines + [""]


def convergence_section(study: Study, runs: list[dict]) -> list[str]:
    moves = movements(study, runs)
    if not moves:
        return []
    lines = ["## Convergence", "",
             f"How much val {study.metric} improved over the last quarter of each run (> 0: "
             "still improving); a run with fewer than four evaluations cannot show it.", "",
             "| arm | per run | mean |", "|---|---|---|"]
    for arm, values in moves.items():
        shown = [v for v in values if v is not None]
        mean = f"{statistics.fmean(shown):+.4f}" if shown and len(shown) == len(values) else "—"
        lines.append(f"| {arm} | {', '.join(fmt_move(v) for v in values)} | {mean} |")
    return lines + [""]


def write_report(study: Study, done: dict, out: Path, runs_dir: Path | None = None
                 ) -> dict:
    """results.json, report.md and plots into `out`; analyses read weights under runs_dir."""
    runs = ordered(study, done)
    test, val = summarise(study, runs, "test"), summarise(study, runs, "val")
    verdicts = study.verdicts(done)
    results = {"study": study.name, "metric": study.metric, "sha256": study.sha256,
               "lower_is_better": study.lower_is_better, "overrides": study.overrides,
               "runs": runs,
               "arms": [{k: r[k] for k in ("arm", "n", "mean", "std")} for r in test],
               "val_arms": [{k: r[k] for k in ("arm", "n", "mean", "std")} for r in val],
               "decision": study.decision.to_dict() if study.decision else None,
               "verdicts": verdicts, "lr_grid": grid_rows(study, done),
               "late_movement": movements(study, runs)}
    write_json(out / "results.json", results)
    files = plots(study, test, val, out) + curves_plot(study, runs, out)
    lines = header_lines(study, runs) + arm_table(study, test, val)
    devices = sorted({r["device"] for r in runs})
    lines += ["", f"Devices: {', '.join(devices) or '—'}. Wall time of the finished runs: "
              f"{sum(r['wall_s'] for r in runs + grid_only(study, done)) / 3600:.2f} h.", ""]
    lines += mixed_devices(runs) + decision_section(study, verdicts)
    lines += also_section(study, runs) + grid_section(study, done)
    lines += convergence_section(study, runs)
    lines += [f"![{f}]({f})" for f in files]
    lines += analysis_section(study, runs, out, runs_dir or out)
    if study.task == "dit":
        lines += generator_section(study, runs, runs_dir or out)
    lines += runs_section(study, runs + grid_only(study, done))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return results


def header_lines(study: Study, runs: list[dict]) -> list[str]:
    """The report's title, what was held fixed and how runs are evaluated."""
    return [f"# Study `{study.name}`", "",
            f"Base recipe `{study.base}`, metric `{study.metric}` "
            f"({'lower' if study.lower_is_better else 'higher'} is better), seeds "
            f"{study.seeds}; {len(runs)} of {len(study.runs())} runs finished. Study file "
            f"`{study.path.name}` (sha256 {study.file_sha256[:12]})"
            + (f", command-line overrides `{' '.join(study.overrides)}`" if study.overrides
               else "") + ".", "",
            f"**Held fixed:** {study.held_fixed or 'the base recipe and the common overrides'}. "
            "Each row states its FLOPs per image and images seen, so equal compute is read "
            "off the table, not assumed.", "",
            ("Each generator is measured once it has finished, against the test split only "
             "(see below); nothing is chosen between runs, so no validation split is used."
             if study.task == "dit" else
             "Each run is evaluated on the validation split (what any choice between runs may "
             "look at); once it has finished, the weights that were best on it (CKPT/best/, "
             "the step in the last table) are evaluated once on the test split, which is "
             "reported only."), ""]


def arm_table(study: Study, test: list[dict], val: list[dict]) -> list[str]:
    """One row per arm: its overrides, test and val metric, params, FLOPs, images seen."""
    lines = [f"| arm | overrides | test {study.metric} | val {study.metric} | params | "
             "GFLOPs/image | images seen |", "|---|---|---|---|---|---|---|"]
    for t, v in zip(test, val):
        over = " ".join(f"{k}={v_}" for k, v_ in t["recipe"].items()) or "—"
        gflops = f"{t['flops_per_image'] / 1e9:.4g}" if t["flops_per_image"] else "—"
        val_cell = "—" if study.task == "dit" else fmt(v["mean"], v["std"], v["n"])
        lines.append(f"| {t['arm']} | `{over}` | {fmt(t['mean'], t['std'], t['n'])} | "
                     f"{val_cell} | {t['params'] or '—'} | {gflops} | "
                     f"{t['images_seen'] or '—'} |")
    return lines


def analysis_section(study: Study, runs: list[dict], out: Path, runs_dir: Path) -> list[str]:
    """Mean attention distance per layer of each arm's first seed (`pixtok analyze`), if any."""
    looked = analyses(study, runs, out, runs_dir)
    if not looked:
        return []
    lines = ["", "## Where the heads look (`pixtok analyze`, first seed of each arm)", "",
             "Mean attention distance in pixels per layer (averaged over heads; each head "
             "in analysis/ARM/analysis.json), on held-out images; uniform attention would "
             "give the last column.", "",
             "| arm | " + " | ".join(f"layer {row['layer']}"
                                     for row in looked[0][1]["layers"]) + " | uniform |",
             "|---|" + "---|" * (len(looked[0][1]["layers"]) + 1)]
    for arm, result in looked:
        lines.append(f"| {arm} | " + " | ".join(f"{row['mean']:.2f}"
                                                for row in result["layers"])
                     + f" | {result['uniform_distance']:.2f} |")
    lines.append("")
    for arm, _ in looked:
        lines += [f"![{arm}: distances](analysis/{arm}/attention_distance.png)",
                  f"![{arm}: offsets](analysis/{arm}/attention_offsets.png)"]
    return lines


def runs_section(study: Study, runs: list[dict]) -> list[str]:
    """Every finished run, the lr grid's included."""
    lines = ["", "## Runs", "", f"| arm | seed | test {study.metric} | val {study.metric} | "
             "steps | chosen at step | wall s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        tv, vv = metric_of(r, study, "test"), (metric_of(r, study, "val") if r["val"] else None)
        arm = r["arm"] + (f" (lr {r['lr']:g})" if "lr" in r else "")
        lines.append(f"| {arm} | {r['seed']} | {tv:.4f} | "
                     f"{'—' if vv is None else f'{vv:.4f}'} | {r['steps']} | "
                     f"{r.get('selected_step', r['steps'])} | {r['wall_s']} |")
    return lines


def records_folder(study: Study, out: Path, given: str | None) -> Path:
    """Where finished runs are recorded: --records, else a shipped study's folder in the
    project (docs/studies/NAME/records, committed as runs finish), else DIR/records."""
    if given:
        return Path(given)
    if study.path.parent.resolve() == STUDY_DIR.resolve():
        # runs under command-line overrides (scale=gpu) are another study: their own folder
        label = "-".join(re.sub(r"[^A-Za-z0-9.]+", "-", o) for o in study.overrides)
        return RECORDS_DIR / study.name / label / "records" if label else \
            RECORDS_DIR / study.name / "records"
    return out / "records"


def report(study: Study, done: dict, out: Path, records: Path) -> dict:
    """results.json, report.md and the plots, beside the records (the study's docs folder for
    a shipped study) and, where it differs, in the study folder too."""
    results = {}
    for folder in dict.fromkeys([records.parent, out]):
        if folder == out and not out.is_dir():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        results = write_report(study, done, folder, out)
    return results


def run_cli(args) -> int:
    if args.report:         # key=value after --report are overrides, not folders
        args.overrides += [a for a in args.report if "=" in a]
        args.report = [a for a in args.report if "=" not in a]
    study = Study(args.study, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / "studies" / study.name
    records = records_folder(study, out, getattr(args, "records", None))
    if args.report is not None:
        folders = [f for f in [out] if (f / "study.json").is_file()] + list(map(Path, args.report))
        done = collect(study, folders, records)
        report(study, done, out, records)
        print(f"study {study.name}: {len(study.finals(done))} of {len(study.runs())} runs "
              f"finished; wrote results.json and report.md in {records.parent}")
        return 0
    i, n = parse_shard(args.shard)
    claim_folder(out, study, args.resume)
    done = collect(study, [out], records)
    for key, result in done.items():             # a study folder's runs not recorded yet
        if not (records / f"{study.run_path(*key)}.json").is_file():
            write_record(records, study, result, out / "runs" / study.run_path(*key))
    mine = [(key, ready) for key, ready in study.plan(done) if study.shard_of(*key[:2], n) == i]
    todo = [key for key, _ in mine if key not in done]
    print(f"study {study.name}: {len(study.runs())} runs ({len(study.arms)} arms x "
          f"{len(study.seeds)} seeds)" + (f" + an lr grid of {len(study.lr_grid)}"
                                           if study.lr_grid else "")
          + f", shard {i}/{n} holds {len(mine)}, {len(todo)} to do; folder {out}, records "
          f"{records}", flush=True)
    bar = tqdm(total=len(todo), desc=study.name, unit="run", dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30)
    while (key := next_run(study, done, i, n)) is not None:
        if bar.n >= bar.total:
            bar.total += 1                     # the rule added seeds
        run_and_record(study, out, records, key, bar)
        done = collect(study, [out], records)
        report(study, done, out, records)
        bar.update()
    bar.close()
    results = report(study, done, out, records)
    waiting = [key for key, ready in study.plan(done) if not ready and
               study.shard_of(*key[:2], n) == i]
    if waiting:
        print(f"{len(waiting)} run(s) wait for another shard's lr grid to finish; run this "
              "shard again with --resume once it has")
    for row in results["arms"]:
        print(f"{row['arm']}: {fmt(row['mean'], row['std'], row['n'])}")
    for v in results["verdicts"]:
        print(f"{v['arms'][0]} vs {v['arms'][1]}: {v['verdict']}")
    print(f"wrote results.json and report.md in {records.parent}")
    return 0


def next_run(study: Study, done: dict, i: int, n: int):
    """The first run of shard i of n that the protocol asks for, can start and has not run."""
    return next((key for key, ready in study.plan(done)
                 if ready and key not in done and study.shard_of(*key[:2], n) == i), None)


def run_and_record(study: Study, out: Path, records: Path, key, bar) -> None:
    arm, seed, lr = key
    run_dir = out / "runs" / study.run_path(*key)
    state = "continues" if (run_dir / "train_state.pt").is_file() else "starts"
    bar.write(f"{arm} seed {seed}: {state} pixtok train {study.base} "
              f"{' '.join(study.arm_args(*key))} -> {run_dir} (log: {run_dir / 'study.log'})")
    result = run_one(study, out, arm, seed, lr)
    path = write_record(records, study, result, run_dir)
    val = result["val"].get(study.metric)
    bar.write(f"{arm} seed {seed}: done in {result['wall_s'] / 60:.1f} min; "
              + (f"val {study.metric} {val if val is None else f'{val:.4f}'}, "
                 if result["val"] else "")
              + f"test {study.metric} {result['test'].get(study.metric, float('nan')):.4f}; "
              f"record {path}")
