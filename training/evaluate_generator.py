"""Generator evaluation: a generator's pipeline folder loaded, sampled and measured by a classifier
this project trained on the same data, for `pixtok eval`, the DiT task's evaluations, `pixtok
bench sample` and a generator study's protocol (protocol_metrics).

fid_proxy is the Frechet distance between the classifier's features (its pooled tokens, before the
head) of n generated images and of n real test images; class_agreement is the share of generated
images the classifier puts in the class they were generated for. Beside them, the real-data floor:
the same distance between two disjoint sets of n real test images, which is what a perfect
generator would score at this n (the estimate is biased upwards for small n). Numbers are
comparable between generators of the same data set measured with the same classifier, not with
published FIDs (for those, see training.metrics.generation.InceptionFeatures).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pixtok.errors import UserError
from pixtok.sampling import SAMPLERS, SAMPLING_DEFAULTS, default_steps
from training.metrics.generation import (
    class_agreement,
    fid_from_features,
    inception_score,
    precision_recall,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLASSIFIER = Path("model_store") / "fashion-vit1"
DEFAULT_SAMPLES = 1000


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(ckpt, device: str | torch.device = "cpu"):
    """A generator checkpoint folder -> PixelDiTPipeline (progress bar off)."""
    from diffusers.utils import logging as diffusers_logging

    from pixtok.pipeline import PixelDiTPipeline

    ckpt = Path(ckpt)
    if not (ckpt / "model_index.json").is_file():
        raise UserError(f"{ckpt}: not a generator checkpoint (no model_index.json); expected "
                        "a folder written by `pixtok train dit...`")
    diffusers_logging.set_verbosity_error()                 # stderr: our one-line errors only
    diffusers_logging.disable_progress_bar()
    try:
        pipe = PixelDiTPipeline.from_pretrained(ckpt)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}: cannot load the pipeline ({str(e).splitlines()[0]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generator_config(ckpt) -> dict:
    """The config.json `pixtok train` writes beside the pipeline ({} for other folders)."""
    try:
        return json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def classifier_path(explicit=None, config: dict | None = None) -> Path | None:
    """The classifier for fid_proxy: the one given, else the generator config's, else
    model_store/fashion-vit1 (in the working directory or the project) when it exists."""
    if explicit:
        return Path(explicit).expanduser()
    if config and config.get("classifier"):
        return Path(config["classifier"]).expanduser()
    for path in (DEFAULT_CLASSIFIER, ROOT / DEFAULT_CLASSIFIER):
        if (path / "config.json").is_file():
            return path
    return None


class Classifier:
    """A classifier checkpoint as a feature extractor: images (N, C, H, W) in [0, 1] ->
    pooled tokens before the head (N, D), and logits."""

    def __init__(self, path, device: str | torch.device = "cpu"):
        from pixtok.checkpoint import load_model

        self.model, self.config = load_model(path, device)
        if self.config.get("task") != "classify" or not hasattr(self.model, "forward_features"):
            raise UserError(f"{path}: not a classifier checkpoint (task "
                            f"{self.config.get('task')!r})")
        self.path, self.device = Path(path), device
        self.labels = list(self.config["labels"])
        self.image_size = tuple(self.config["input"]["image_size"])
        self.channels = self.config["input"]["channels"]

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 256):
        """(N, C, H, W) at the classifier's input size -> features (N, D), logits (N, K)."""
        feats, logits = [], []
        for batch in images.split(batch_size):
            f = self.model.pool(self.model.forward_features(batch.to(self.device).float()))
            feats.append(f.double().cpu())
            logits.append(self.model.head(f).double().cpu())
        return torch.cat(feats), torch.cat(logits)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def fit(self, images: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """Generated images (N, C, H, W) -> the classifier's input: crop the padding the VQGAN
        was trained with, match channels, resize (bicubic, antialiased) if sizes still differ."""
        if pad:
            images = images[..., pad:images.shape[-2] - pad, pad:images.shape[-1] - pad]
        if images.shape[1] != self.channels:
            if self.channels == 1:
                images = images.mean(1, keepdim=True)
            else:
                images = images.expand(-1, self.channels, -1, -1)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic",
                                   antialias=True, align_corners=False)
        return images.clamp(0, 1)


@torch.no_grad()
def sampling_bar(total_steps: int, desc: str):
    """A progress bar on stderr counting sampler steps (a batch of images takes one per step);
    stdout stays for the command's JSON. TQDM_DISABLE=1 turns it off."""
    from tqdm import tqdm

    return tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                file=sys.stderr)


def sample_images(pipe, labels: list[int], sampler: str, steps: int, guidance: float,
                  seed: int = 0, batch_size: int = 64,
                  progress=None) -> tuple[torch.Tensor, float]:
    """Generate one image per label -> (images (N, C, H, W) in [0, 1] on the CPU, seconds).
    One CPU generator seeded once runs through the batches: same arguments, same images.
    progress: a bar (sampling_bar) that advances by one at every sampler step of every batch,
    ceil(N / batch_size) * steps in all."""
    from pixtok.pipeline import make_scheduler

    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config,
                                    pipe.transformer.config.learn_sigma)
    gen = torch.Generator().manual_seed(seed)
    images = []
    start = time.perf_counter()
    for i in range(0, len(labels), batch_size):
        out = pipe(labels[i:i + batch_size], guidance_scale=guidance, num_inference_steps=steps,
                   generator=gen, output_type="pt",
                   callback=(lambda step, total: progress.update(1)) if progress else None).images
        images.append(out.float().cpu())
    return torch.cat(images), time.perf_counter() - start


def real_reference(classifier: Classifier, n: int, data_dir=None, split: str = "test") -> dict:
    """Features of two disjoint sets of min(n, half the split) real images -> {"a", "b",
    "a_logits", "a_labels", "n_real"}; fid_proxy compares with a, the floor is b vs a."""
    from training.tasks.classify import load_split

    data = dict(classifier.config["data"], **({"data_dir": str(data_dir)} if data_dir else {}))
    dataset = load_split(data, split)
    if list(dataset.classes) != classifier.labels:
        raise UserError(f"{data.get('data_dir')}: its classes differ from the classifier's labels")
    n_real = min(n, len(dataset) // 2)
    if n_real < 2:
        raise UserError(f"the {split} split has {len(dataset)} images; fid_proxy needs at least 4")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    a, b = order[:n_real], order[n_real:2 * n_real]
    images = dataset.images.float().div(255)
    fa, la = classifier.features_and_logits(classifier.fit(images[a]))
    fb, _ = classifier.features_and_logits(classifier.fit(images[b]))
    return {"a": fa, "b": fb, "a_logits": la, "a_labels": dataset.labels[a], "n_real": n_real,
            "b_images": dataset.images[b], "b_labels": dataset.labels[b]}


def score(classifier: Classifier, images: torch.Tensor, labels, reference: dict,
          pad: int = 0) -> dict:
    """fid_proxy, is_proxy (the Inception Score with the judge's class probabilities),
    precision and recall (of its features, k = 3) and class_agreement of generated images
    against a real_reference."""
    feats, logits = classifier.features_and_logits(classifier.fit(images, pad))
    is_mean, is_std = inception_score(torch.softmax(logits.double(), 1),
                                      splits=min(10, max(1, len(logits) // 2)))
    return {"fid_proxy": fid_from_features(reference["a"], feats),
            "is_proxy": is_mean, "is_proxy_std": is_std,
            # k-NN manifolds need more than k = 3 samples on each side
            **(precision_recall(reference["a"], feats) if min(len(feats), len(reference["a"])) > 3
               else {}),
            "class_agreement": class_agreement(logits, torch.as_tensor(labels))}


def check_labels(pipe, classifier: Classifier) -> None:
    if pipe.labels is not None and list(pipe.labels) != classifier.labels:
        raise UserError(f"{classifier.path}: its labels {classifier.labels} differ from the "
                        f"generator's {list(pipe.labels)}")


def generation_metrics(pipe, classifier, n: int = DEFAULT_SAMPLES, pad: int = 0,
                       sampler: str | None = None, steps: int | None = None,
                       guidance: float | None = None, seed: int = 0, batch_size: int = 64,
                       data_dir=None, split: str = "test", show_progress: bool = False) -> dict:
    """Sample n images (balanced over the classes) and score them -> the metrics dict.
    show_progress: a bar on stderr over the sampler steps (`pixtok eval`)."""
    if n < 2:
        raise UserError(f"-n {n}: fid_proxy needs at least 2 samples")
    if not isinstance(classifier, Classifier):
        classifier = Classifier(classifier, pipe.device)
    check_labels(pipe, classifier)
    sampler, steps = sampler_and_steps(sampler, steps)
    guidance = SAMPLING_DEFAULTS["guidance"] if guidance is None else guidance
    reference = real_reference(classifier, n, data_dir, split)
    k = pipe.transformer.config.num_classes
    labels = [i % k for i in range(n)]
    bar = (sampling_bar(-(-n // batch_size) * steps, f"eval: sampling {n} images, "
                        f"{sampler}-{steps}, guidance {guidance:g}") if show_progress else None)
    try:
        images, seconds = sample_images(pipe, labels, sampler, steps, guidance, seed,
                                        batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    floor = fid_from_features(reference["a"], reference["b"])
    return {**score(classifier, images, labels, reference, pad), "fid_proxy_floor": floor,
            "real_class_agreement": class_agreement(reference["a_logits"], reference["a_labels"]),
            "n": n, "n_real": reference["n_real"], "sampler": sampler, "steps": steps,
            "guidance": guidance, "seed": seed, "images_per_s": n / seconds,
            "classifier": str(classifier.path)}


PROTOCOL_METRICS = ("fid_proxy", "precision", "recall", "class_agreement", "is_proxy")


def judge_sha256(path) -> str:
    """sha256 of a classifier checkpoint's weights: the judge a generator study pins."""
    from training.tasks.vqgan import weights_hash

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no model.safetensors; the judge must be a classifier "
                        "checkpoint folder")
    return weights_hash(weights)


@torch.no_grad()
def reconstructions(pipe, images: torch.Tensor, pad: int = 0, batch_size: int = 256):
    """uint8 real images (N, C, H, W) -> their VQGAN round trip (encode, quantise, decode) in
    [0, 1], still padded: what a generator that gets every latent right would give back."""
    out = []
    for batch in images.split(batch_size):
        x = batch.float().div(255)
        if pad:
            x = F.pad(x, (pad,) * 4, value=0.0)
        z = pipe.encode_images(x.to(pipe.device))
        out.append(pipe.decode_latents(z).float().cpu())
    return torch.cat(out)


def protocol_metrics(pipe, classifier: Classifier, guidances, n: int, pad: int = 0,
                     sampler: str | None = None, steps: int | None = None, seed: int = 0,
                     batch_size: int = 64, data_dir=None, split: str = "test",
                     floors: bool = True, more_judges: dict | None = None) -> dict:
    """A generator study's measurement of one generator: n samples (balanced over the classes)
    at each guidance scale, scored against n real images of `split` by the judge (fid_proxy,
    k-NN precision and recall, class agreement, is_proxy), and, with floors, the same scores
    for two references: real images (a disjoint set of n; what a perfect generator gets at
    this n) and their VQGAN reconstructions (the best any generator over these latents gets).
    more_judges ({name: Classifier}) score the same samples again, each against its own real
    reference, as "NAME.METRIC" (a judge of another architecture, so that an ordering is not
    an artefact of one judge's features).
    -> {"by_guidance": {"1.5": metrics}, "floors": {"real": ..., "vqgan_recon": ...}, ...}"""
    if n < 4:
        raise UserError(f"samples={n}: precision and recall need at least 4 samples")
    check_labels(pipe, classifier)
    sampler, steps = sampler_and_steps(sampler, steps)
    reference = real_reference(classifier, n, data_dir, split)
    more = {name: (judge, real_reference(judge, n, data_dir, split))
            for name, judge in (more_judges or {}).items()}
    for judge, _ in more.values():
        check_labels(pipe, judge)
    k = pipe.transformer.config.num_classes
    labels = [i % k for i in range(n)]

    def keep(metrics: dict) -> dict:
        return {m: metrics[m] for m in PROTOCOL_METRICS if m in metrics}

    by_guidance = {}
    for g in guidances:
        bar = sampling_bar(-(-n // batch_size) * steps, f"study: sampling {n} images, "
                           f"{sampler}-{steps}, guidance {float(g):g}")
        try:
            images, seconds = sample_images(pipe, labels, sampler, steps, float(g), seed,
                                            batch_size, bar)
        finally:
            bar.close()
        by_guidance[f"{float(g):g}"] = {**keep(score(classifier, images, labels, reference, pad)),
                                        "images_per_s": n / seconds}
        for name, (judge, ref) in more.items():
            by_guidance[f"{float(g):g}"].update(
                {f"{name}.{m}": v for m, v in keep(score(judge, images, labels, ref, pad)).items()})
    result = {"by_guidance": by_guidance, "n": n, "n_real": reference["n_real"],
              "sampler": sampler, "steps": steps, "seed": seed, "split": split,
              "judge": str(classifier.path), "judge_sha256": judge_sha256(classifier.path),
              **{f"{name}_sha256": judge_sha256(judge.path) for name, (judge, _) in more.items()}}
    if floors:
        real = reference["b_images"].float().div(255)
        recon = reconstructions(pipe, reference["b_images"], pad)
        result["floors"] = {
            "real": keep(score(classifier, real, reference["b_labels"], reference)),
            "vqgan_recon": keep(score(classifier, recon, reference["b_labels"], reference, pad))}
    return result


def sampler_and_steps(sampler: str | None, steps: int | None) -> tuple[str, int]:
    """An omitted sampler or step count filled in as `pixtok sample` fills it
    (pixtok/sampling.py); a UserError for an unknown sampler that needs its default steps."""
    sampler = sampler or SAMPLING_DEFAULTS["sampler"]
    if steps:
        return sampler, steps
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    return sampler, default_steps(sampler)


def evaluate_checkpoint(ckpt, config: dict, args) -> dict:
    """`pixtok eval` for a generator: fid_proxy (with its real-data floor), class_agreement, n."""
    dev = device()
    pipe = load_pipeline(ckpt, dev)
    gen_config = generator_config(ckpt)
    path = classifier_path(getattr(args, "classifier", None), gen_config)
    if path is None:
        raise UserError(f"{ckpt}: no classifier to measure fid_proxy with; pass --classifier CKPT "
                        f"(a classifier trained on the same data, e.g. `pixtok train "
                        f"vit1-fashion`) or put one at {DEFAULT_CLASSIFIER}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: classifier checkpoint not found")
    n = args.num_samples or DEFAULT_SAMPLES
    pad = gen_config.get("input", {}).get("pad", 0)
    return generation_metrics(pipe, Classifier(path, dev), n, pad,
                              getattr(args, "sampler", None), getattr(args, "steps", None),
                              getattr(args, "guidance", None), getattr(args, "seed", 0) or 0,
                              min(args.batch_size, 256), args.data, args.split,
                              show_progress=True)
