"""Generation metrics against closed forms and direct computations."""
import numpy as np
import pytest
import scipy.linalg
import torch

from pixtok.errors import UserError
from training.metrics.generation import (
    FeatureExtractor,
    InceptionFeatures,
    class_agreement,
    extract_features,
    fid,
    fid_from_features,
    frechet_distance,
    inception_score,
    precision_recall,
)


def random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected,
                                                                                 rel=1e-10)


def test_frechet_distance_full_covariance_against_sqrtm():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    s1, s2 = random_covariance(rng, 20), random_covariance(rng, 20)
    direct = (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(direct, rel=1e-8)
    assert fd == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)   # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_singular_covariances():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(5, 32))        # fewer samples than dimensions: rank-deficient
    fd = fid_from_features(few, few + 0.01)
    assert np.isfinite(fd) and fd == pytest.approx(32 * 0.01 ** 2, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_features_same_vs_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    assert fid_from_features(a, b) < 0.05
    assert fid_from_features(a, b + 1) == pytest.approx(8.0, rel=0.05)


def test_precision_recall():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 5))
    same = precision_recall(real, real.copy())
    assert same == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(real, real + 100)
    assert far == {"precision": 0.0, "recall": 0.0}
    # two real modes, the generator covers one: high precision, about half the recall
    modes = np.concatenate([real, real + 50])
    dropped = precision_recall(modes, real + rng.normal(size=real.shape) * 0.01)
    assert dropped["precision"] == 1.0 and dropped["recall"] == pytest.approx(0.5, abs=0.02)


def test_inception_score():
    uniform = np.full((100, 10), 0.1)
    assert inception_score(uniform, splits=5)[0] == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(100) % 10]
    mean, std = inception_score(one_hot, splits=5)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
    collapsed = np.eye(10)[np.zeros(100, dtype=int)]            # confident but one class
    assert inception_score(collapsed, splits=1)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        inception_score(np.ones((4, 3)))


def test_class_agreement():
    logits = torch.tensor([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0], [0.2, 0.1]])
    assert class_agreement(logits, [0, 1, 1, 0]) == 0.75


class TinyExtractor(torch.nn.Module):
    """A real (random) conv net as a stand-in feature extractor: any network fits the protocol."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=2)

    def forward(self, images):
        return self.conv(images).relu().mean((2, 3))             # (N, 8)


def test_extractor_protocol_and_fid():
    torch.manual_seed(0)
    real, fake = torch.rand(64, 1, 32, 32), torch.rand(64, 1, 32, 32) * 0.5
    extractor = TinyExtractor()
    assert isinstance(extractor, FeatureExtractor)
    feats = extract_features(extractor, real, batch_size=16)
    assert feats.shape == (64, 8)
    assert fid(extractor, real, real) == pytest.approx(0, abs=1e-8)
    assert fid(extractor, real, fake) > fid(extractor, real, torch.rand(64, 1, 32, 32))


class FakeInception(torch.nn.Module):
    """Same call signature as the TorchScript FID Inception; features are simple image stats."""

    def forward(self, img: torch.Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if return_features:
            return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3))], dim=1)
        return torch.softmax(x.mean((2, 3)), dim=1)


def test_inception_loads_only_a_local_torchscript_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        InceptionFeatures(tmp_path / "inception-2015-12-05.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(UserError):
        InceptionFeatures(tmp_path / "junk.pt")
    torch.jit.save(torch.jit.script(FakeInception()), tmp_path / "inception-2015-12-05.pt")
    inception = InceptionFeatures(tmp_path / "inception-2015-12-05.pt")
    images = torch.ones(2, 1, 8, 8)                              # grayscale, in [0, 1]
    feats = inception(images)
    assert feats.tolist() == [[255.0, 255.0], [255.0, 255.0]]    # uint8 range, 3 channels
    assert inception.probabilities(images).shape == (2, 3)
