"""The latent cache holds exactly what the VQGAN's encoder gives on the fly, mirrored images too."""
from __future__ import annotations

import json

import pytest
import torch
from datafiles import learnable_fashion

from pixtok.errors import UserError
from pixtok.models.vqgan import build_vqgan
from training.data import build_dataset
from training.latents import LatentCache, build_cache, ensure_cache, is_current, prepare_images

SPEC = {"vqgan": "hash-a", "data": {"dataset": "fashion-mnist"}, "split": "train", "pad": 2}


def tiny_vqgan(seed: int = 0):
    torch.manual_seed(seed)
    return build_vqgan("f4-small", block_out_channels=[8, 16, 16], norm_num_groups=8,
                       num_vq_embeddings=32).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = learnable_fashion(tmp_path_factory.mktemp("data") / "fashion", n_train=40, n_test=4)
    return build_dataset("fashion-mnist", folder, split="train")


def test_prepare_images_pads_with_black_in_minus_one_to_one():
    x = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    y = prepare_images(x, pad=2)
    assert y.shape == (1, 1, 32, 32)
    assert y[0, 0, 2:30, 2:30].eq(1).all() and y[0, 0, :2].eq(-1).all() and y[..., -2:].eq(-1).all()


def test_cache_equals_on_the_fly_encoding_with_mirrored_copy(dataset, tmp_path):
    vq = tiny_vqgan()
    # 40 images in shards of 16 (three shards, the last one short), batches of 7 across them
    build_cache(tmp_path / "c", vq, dataset, SPEC, pad=2, batch_size=7, shard_items=16,
                log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["count"] == 40 and index["shape"] == [4, 8, 8]
    assert index["classes"][0] == "T-shirt/top"

    images = dataset.images                                    # (40, 1, 28, 28) uint8
    with torch.no_grad():
        direct = vq.encode(prepare_images(images, 2)).latents  # pre-quantisation
        mirrored = vq.encode(prepare_images(images.flip(-1), 2)).latents
        quantised, _, _ = vq.quantize(direct)
    assert (direct - quantised).abs().max() > 1e-3             # so "pre-quant" is a real check

    for memory_limit in (2**30, 0):                            # held in memory / read from files
        cache = LatentCache(tmp_path / "c", memory_limit=memory_limit)
        assert (cache.memory is None) == (memory_limit == 0)
        assert len(cache) == 40 and cache.shape == (4, 8, 8)
        assert torch.equal(cache.labels, dataset.labels)
        idx = torch.tensor([39, 0, 17, 16, 5, 31])
        flip = torch.tensor([False, True, True, False, False, True])
        x, y = cache.get(idx, flip)
        expected = torch.where(flip[:, None, None, None], mirrored[idx], direct[idx])
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(y, dataset.labels[idx])
        torch.testing.assert_close(cache.rows("latents", torch.arange(40)), direct,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.rows("latents_flipped", torch.arange(40)), mirrored,
                                   atol=1e-5, rtol=1e-5)
    assert cache.std() == pytest.approx(direct.double().std().item(), rel=1e-4)


def test_cache_is_reused_rebuilt_and_resumed(dataset, tmp_path):
    folder = tmp_path / "c"
    calls = []

    def make():
        calls.append(1)
        return dataset

    vq = tiny_vqgan()
    first = ensure_cache(folder, vq, make, SPEC, pad=2, batch_size=16, log=lambda *_: None)
    assert calls == [1] and is_current(folder, SPEC)
    stamp = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    again = ensure_cache(folder, vq, make, SPEC, pad=2, log=lambda *_: None)
    assert calls == [1] and (folder / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(again.rows("latents", [3]), first.rows("latents", [3]))

    # another VQGAN (its weights hash is in the spec): the cache is rebuilt with its latents
    other = tiny_vqgan(seed=1)
    spec_b = {**SPEC, "vqgan": "hash-b"}
    rebuilt = ensure_cache(folder, other, make, spec_b, pad=2, log=lambda *_: None)
    assert calls == [1, 1] and not is_current(folder, SPEC)
    with torch.no_grad():
        expected = other.encode(prepare_images(dataset.images[3:4], 2)).latents
    torch.testing.assert_close(rebuilt.rows("latents", [3]), expected, atol=1e-5, rtol=1e-5)

    # an interrupted build (index.json missing) keeps its finished shards and completes
    build_cache(tmp_path / "r", other, dataset, spec_b, pad=2, shard_items=16, log=lambda *_: None)
    (tmp_path / "r" / "index.json").unlink()
    (tmp_path / "r" / "shard-00002.safetensors").unlink()
    kept = (tmp_path / "r" / "shard-00000.safetensors").stat().st_mtime_ns
    build_cache(tmp_path / "r", other, dataset, spec_b, pad=2, shard_items=16, log=lambda *_: None)
    assert (tmp_path / "r" / "shard-00000.safetensors").stat().st_mtime_ns == kept
    resumed = LatentCache(tmp_path / "r")
    torch.testing.assert_close(resumed.rows("latents", torch.arange(40)),
                               rebuilt.rows("latents", torch.arange(40)), atol=1e-6, rtol=0)


def test_incomplete_folder_is_not_a_cache(tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(UserError, match="not a complete latent cache"):
        LatentCache(tmp_path)
