"""Generation metrics: FID (Frechet distance), Inception Score, precision/recall (k-NN
manifolds, Kynkaanniemi et al. 2019) and class agreement, over a pluggable feature extractor.

A FeatureExtractor is any callable images (N, C, H, W) in [0, 1] -> features (N, D). `pixtok
eval` of a generator reports all of them with the judge classifier as the network (fid_proxy,
is_proxy, precision, recall, class_agreement). Numbers are comparable to published ones only
with the published network: InceptionFeatures loads it from a file the user provides. (sFID is
not offered: nothing here has spatial Inception features, and no pixtok metric needs it.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pixtok.errors import UserError


@runtime_checkable
class FeatureExtractor(Protocol):
    """images (N, C, H, W) in [0, 1] -> features (N, D)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def sqrtm_trace(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for covariances, via the symmetric PSD matrix
    sigma1^(1/2) sigma2 sigma1^(1/2), which has the same eigenvalues as sigma1 sigma2 but can be
    diagonalised with eigh (no complex parts, no ill-conditioned general sqrtm)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(_drop_noise(w))) @ v.T
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(_drop_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def _drop_noise(eig: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that are rounding noise (numpy's matrix_rank tolerance): their square
    roots would otherwise add up to a visible error for rank-deficient covariances."""
    tol = max(eig.max(initial=0.0), 0.0) * len(eig) * np.finfo(np.float64).eps
    return np.where(eig > tol, eig, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * sqrtm_trace(s1, s2))


def fid_from_features(real, fake) -> float:
    """Frechet distance between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


@torch.no_grad()
def extract_features(extractor, images, batch_size: int = 64):
    """Features of images (a (N, C, H, W) tensor in [0, 1] or an iterable of such batches)
    -> (N, D) float64 numpy array."""
    batches = images.split(batch_size) if torch.is_tensor(images) else images
    out = [extractor(batch).flatten(1).double().cpu() for batch in batches]
    return torch.cat(out).numpy()


def fid(extractor, real_images, fake_images, batch_size: int = 64) -> float:
    """FID: Frechet distance of the extractor's features of real vs generated images."""
    return fid_from_features(extract_features(extractor, real_images, batch_size),
                             extract_features(extractor, fake_images, batch_size))


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` chunks -> (mean, std). probs: (N, K) softmax
    outputs (rows sum to 1). Uniform predictions score 1; confident, evenly spread ones score K."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not np.allclose(p.sum(1), 1, atol=1e-3):
        raise ValueError("inception_score needs (N, K) probabilities whose rows sum to 1")
    scores = []
    for chunk in np.array_split(p, min(splits, len(p))):
        marginal = chunk.mean(0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(marginal + 1e-12))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (N,)."""
    radii = []
    for chunk in x.split(batch):
        d = torch.cdist(chunk, x)                               # (B, N), includes self at 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch: int):
    """Fraction of points inside at least one ball (centers, radii)."""
    hits = [(torch.cdist(chunk, centers) <= radii[None]).any(1) for chunk in points.split(batch)]
    return torch.cat(hits).double().mean().item()


def precision_recall(real, fake, k: int = 3, batch: int = 1024) -> dict:
    """Improved precision and recall (Kynkaanniemi et al.): precision is the share of generated
    samples inside the real manifold (union of k-NN balls around real features), recall the
    share of real samples inside the generated one. real, fake: (N, D) features."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"need more than k={k} samples on each side")
    precision = _inside(f, r, _knn_radii(r, k, batch), batch)
    recall = _inside(r, f, _knn_radii(f, k, batch), batch)
    return {"precision": precision, "recall": recall}


def class_agreement(classifier_logits, labels) -> float:
    """Share of generated images a classifier assigns to the class they were generated for."""
    logits = torch.as_tensor(np.asarray(classifier_logits))
    labels = torch.as_tensor(np.asarray(labels)).long()
    return (logits.argmax(1) == labels).double().mean().item()


class InceptionFeatures:
    """The FID Inception network, loaded only from the user's file, never downloaded.

    File format: the TorchScript export of TF's inception-2015-12-05 graph used by StyleGAN2-ADA,
    EDM and clean-fid (inception-2015-12-05.pt). It takes uint8-range (N, 3, H, W) images, resizes
    them itself, and returns 2048-d pool features with return_features=True and 1008-way
    probabilities with no_output_bias=True."""

    def __init__(self, path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: Inception weights not found (no downloads: give the local "
                            f"TorchScript file inception-2015-12-05.pt)")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise UserError(f"{path}: not a TorchScript Inception file ({e})") from None
        self.device = device

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:                                # grayscale -> three equal channels
            images = images.expand(-1, 3, -1, -1)
        return (images.clamp(0, 1) * 255).round().to(self.device, torch.uint8)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(images), return_features=True)       # (N, 2048)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 1008) for the Inception Score."""
        return self.net(self._prepare(images), no_output_bias=True)

