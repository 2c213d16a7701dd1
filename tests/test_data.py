"""Data sets and augmentations on tiny files written in each real format."""
from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import idx_bytes, write_idx
from PIL import Image

from pixtok.resize import resize_image
from training.data import DataError, build_dataset
from training.data.augment import CropFlip, MixUpCutMix, smooth_targets
from training.data.cifar import load_pickle
from training.data.depth import DepthDataset
from training.data.fashion_mnist import CLASSES as FASHION_CLASSES
from training.loader import channel_stats

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

@pytest.fixture
def fashion_dir(tmp_path):
    """A Fashion-MNIST folder: gzipped train files, plain (un-gzipped) t10k files."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    sets = {"train": (6, ".gz"), "t10k": (4, "")}
    arrays = {}
    for prefix, (n, ext) in sets.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        arrays[prefix] = (images, labels)
    return folder, arrays


def test_fashion_mnist_gzipped_and_plain(fashion_dir):
    folder, arrays = fashion_dir
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = build_dataset("fashion-mnist", folder, split=split)
        images, labels = arrays[prefix]
        assert len(ds) == len(images)
        assert ds.images.shape == (len(images), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()
        assert ds.classes == FASHION_CLASSES and ds.classes[9] == "Ankle boot"
        assert ds.in_channels == 1 and ds.image_size == (28, 28)
        image, label = ds[3]
        assert image.shape == (1, 28, 28) and isinstance(label, int) and label == 3


def test_fashion_mnist_resized_at_load(fashion_dir):
    folder, arrays = fashion_dir
    images = arrays["train"][0]
    small = build_dataset("fashion-mnist", folder, image_size=14, resize="nearest")
    # single-pixel resize by 2: output pixel i is input pixel 2i + 1, values untouched
    assert torch.equal(small.images[:, 0], torch.from_numpy(images[:, 1::2, 1::2].copy()))
    big = build_dataset("fashion-mnist", folder, image_size=(32, 30))
    assert big.images.shape == (6, 1, 32, 30) and big.image_size == (32, 30)


def test_fashion_mnist_errors_name_the_path(fashion_dir, tmp_path):
    folder, _ = fashion_dir
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}.*dataset-fashion-mnist"):
        build_dataset("fashion-mnist", tmp_path / "nowhere")

    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: not found.*expected"):
        build_dataset("fashion-mnist", folder, split="test")

    bad = folder / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28), np.uint8))))  # idx2, not idx3
    with pytest.raises(DataError, match=f"{bad}: wrong magic number 0x00000802, expected "
                                        f"0x00000803"):
        build_dataset("fashion-mnist", folder)

    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((6, 28, 28), np.uint8))[:-100]))
    with pytest.raises(DataError, match=f"{bad}: truncated IDX file.*6x28x28"):
        build_dataset("fashion-mnist", folder)

    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((6, 28, 28), np.uint8)))[:-30])
    with pytest.raises(DataError, match=f"{bad}: cannot read"):  # a cut-off gzip stream
        build_dataset("fashion-mnist", folder)

    write_idx(bad, np.zeros((5, 28, 28), np.uint8))  # 5 images, 6 labels
    with pytest.raises(DataError, match=f"{bad}.*5 images but 6 labels"):
        build_dataset("fashion-mnist", folder)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    ds = build_dataset("fashion-mnist", split="test")
    assert len(ds) == 10000 and len(ds.classes) == 10 and ds.image_size == (28, 28)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- resizing

def test_resize_nearest_and_bicubic():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    up = resize_image(img, (12, 18), "nearest")
    assert up.shape == (12, 18, 3) and up.dtype == np.uint8
    assert np.array_equal(up, img.repeat(2, 0).repeat(2, 1))  # every pixel copied, no blending
    down = resize_image(img, (4, 5), "nearest")
    pixels = {tuple(p) for p in img.reshape(-1, 3)}
    assert all(tuple(p) in pixels for p in down.reshape(-1, 3))

    constant = np.full((16, 16), 77, np.uint8)
    assert np.array_equal(resize_image(constant, (8, 8)), np.full((8, 8), 77, np.uint8))
    # the same pixels whether the image arrives as a PIL image or an array, RGB or per channel
    pil = resize_image(Image.fromarray(img), (3, 4))
    assert np.array_equal(pil, resize_image(img, (3, 4), "bicubic"))
    assert np.array_equal(pil[..., 1], resize_image(img[..., 1], (3, 4)))
    smooth = resize_image(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)), (16, 8))
    assert np.all(np.diff(smooth[0].astype(int)) > 0)  # a ramp stays a ramp


def test_build_dataset_argument_errors(fashion_dir):
    folder, _ = fashion_dir
    with pytest.raises(DataError, match="data set 'mnist'"):
        build_dataset("mnist", folder)
    with pytest.raises(DataError, match="split 'val'"):
        build_dataset("fashion-mnist", folder, split="val")
    with pytest.raises(DataError, match="resize 'bilinear'"):
        build_dataset("fashion-mnist", folder, resize="bilinear")
    with pytest.raises(DataError, match="image_size"):
        build_dataset("fashion-mnist", folder, image_size=(0, 4))


# ---------------------------------------------------------------- CIFAR-100 (python pickles)

def py2_opcodes(obj) -> bytes:
    """Protocol-2 opcodes for obj as Python 2 and numpy 1 wrote the original CIFAR files:
    str as BINSTRING (bytes here), arrays through numpy.core.multiarray._reconstruct."""
    if isinstance(obj, bytes):
        if len(obj) < 256:
            return b"U" + bytes([len(obj)]) + obj
        return b"T" + len(obj).to_bytes(4, "little") + obj
    if obj is None:
        return b"N"
    if isinstance(obj, int):
        return b"J" + obj.to_bytes(4, "little", signed=True)
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(py2_opcodes, obj)) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(map(py2_opcodes, obj)) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(py2_opcodes(k) + py2_opcodes(v) for k, v in obj.items()) + b"u"
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    dtype = (b"cnumpy\ndtype\n" + py2_opcodes((b"u1", 0, 1)) + b"R"
             + py2_opcodes((3, b"|", None, None, None, -1, -1, 0)) + b"b")
    state = b"(" + py2_opcodes(1) + py2_opcodes(obj.shape) + dtype + b"\x89"
    state += py2_opcodes(obj.tobytes()) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + py2_opcodes((0,))
            + py2_opcodes(b"b") + b"\x87R" + state + b"b")


def py2_style_pickle(obj) -> bytes:
    """A whole pickle file in the original CIFAR files' Python 2 format."""
    return b"\x80\x02" + py2_opcodes(obj) + b"."


@pytest.fixture
def cifar_dir(tmp_path):
    """cifar-100-python/{train,test,meta} with bytes keys, like the real files."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [f"fine{i}" for i in range(100)]
    coarse = [f"coarse{i}" for i in range(20)]
    meta = {b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [n.encode() for n in coarse]}
    (folder / "meta").write_bytes(py2_style_pickle(meta))
    for split, n in (("train", 5), ("test", 3)):
        # image i: R plane = i, G plane = 100 + i, B plane = 200 + i
        planes = np.array([[i, 100 + i, 200 + i] for i in range(n)], np.uint8)
        data = np.repeat(planes, 1024, axis=1)  # (n, 3072)
        batch = {b"data": data, b"fine_labels": [99 - i for i in range(n)],
                 b"coarse_labels": [i % 20 for i in range(n)], b"batch_label": b"x"}
        (folder / split).write_bytes(py2_style_pickle(batch))
    return folder


def test_cifar100_fine_and_coarse(cifar_dir):
    ds = build_dataset("cifar100", cifar_dir.parent)  # the parent of cifar-100-python
    assert len(ds) == 5 and ds.images.shape == (5, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.in_channels == 3 and ds.image_size == (32, 32)
    assert len(ds.classes) == 100 and ds.classes[99] == "fine99"
    assert ds.labels.tolist() == [99, 98, 97, 96, 95]
    image, label = ds[2]
    assert label == 97 and image[:, 5, 7].tolist() == [2, 102, 202]  # planes are R, G, B

    coarse = build_dataset("cifar100-coarse", cifar_dir, split="test")  # the folder itself
    assert len(coarse.classes) == 20 and coarse.classes[2] == "coarse2"
    assert coarse.labels.tolist() == [0, 1, 2]

    small = build_dataset("cifar100", cifar_dir, split="test", image_size=16)
    assert small.images.shape == (3, 3, 16, 16)
    assert small.images[1, :, 3, 3].tolist() == [1, 101, 201]  # constant planes stay constant


def test_cifar_errors_name_the_path(cifar_dir, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: no CIFAR-100.*cifar-100-python"):
        build_dataset("cifar100", tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs a data folder"):
        build_dataset("cifar100")

    train = cifar_dir / "train"
    train.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=f"{train}: not a CIFAR pickle"):
        build_dataset("cifar100", cifar_dir)

    train.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match=f"{train}: holds a list, expected a dict"):
        build_dataset("cifar100", cifar_dir)

    train.write_bytes(pickle.dumps({b"fine_labels": [1]}, protocol=2))
    with pytest.raises(DataError, match=f"{train}: no 'data' entry"):
        build_dataset("cifar100", cifar_dir)

    train.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                    b"fine_labels": [1, 2]}, protocol=2))
    with pytest.raises(DataError, match=rf"{train}: 'data' is uint8 \(2, 100\)"):
        build_dataset("cifar100", cifar_dir)

    train.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                    b"fine_labels": [1, 100]}, protocol=2))
    with pytest.raises(DataError, match=f"{train}: labels range 1..100, expected 0..99"):
        build_dataset("cifar100", cifar_dir)

    (cifar_dir / "meta").unlink()
    with pytest.raises(DataError, match=f"{cifar_dir / 'meta'}: not found"):
        build_dataset("cifar100", cifar_dir)


class RunsAShellCommand:
    """What a malicious 'CIFAR' pickle holds: unpickling it would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps({b"data": RunsAShellCommand(marker)}, protocol=2))
    assert b"system" in path.read_bytes()
    with pytest.raises(DataError, match=f"{path}: refusing to unpickle (posix|nt|os).system"):
        load_pickle(path)
    assert not marker.exists()


# ---------------------------------------------------------------- ImageFolder

def write_image(path: Path, img: Image.Image, **save_args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save_args)


@pytest.fixture
def image_root(tmp_path):
    """root/train/{cat,dog} in six formats and modes, root/val/cat; expected RGB per file."""
    root = tmp_path / "images"
    size = (8, 6)  # PIL: (W, H)
    expected = {}

    def add(rel, img, rgb, **save_args):
        write_image(root / rel, img, **save_args)
        expected[rel] = rgb

    add("train/cat/a.png", Image.new("RGB", size, (250, 10, 20)), (250, 10, 20))
    add("train/cat/b.JPG", Image.new("RGB", size, (200, 100, 50)), (200, 100, 50), quality=95)
    frames = [Image.new("RGB", size, (255, 0, 0)), Image.new("RGB", size, (0, 0, 255))]
    add("train/cat/c.gif", frames[0], (255, 0, 0), save_all=True, append_images=frames[1:])
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    add("train/dog/d.png", palette, (10, 200, 30))
    add("train/dog/e.png", Image.new("L", size, 123), (123, 123, 123))
    add("train/dog/f.png", Image.new("RGBA", size, (50, 60, 70, 0)), (50, 60, 70))
    add("train/dog/g.bmp", Image.new("RGB", size, (1, 2, 3)), (1, 2, 3))
    add("val/cat/h.webp", Image.new("RGB", size, (40, 80, 120)), (40, 80, 120), lossless=True)
    (root / "train/dog/notes.txt").write_text("not an image")
    return root, expected


def check_images(ds, root, expected):
    for i, path in enumerate(ds.files):
        image, label = ds[i]
        assert image.shape == (3, 4, 3) and image.dtype == torch.uint8
        rgb = torch.tensor(expected[str(path.relative_to(root))])
        tol = 3 if path.suffix.lower() == ".jpg" else 0  # JPEG is lossy
        assert (image.int() - rgb[:, None, None]).abs().max() <= tol, path
        assert ds.classes[label] == path.parent.name


def test_imagefolder_formats_and_modes(image_root):
    root, expected = image_root
    ds = build_dataset("imagefolder", root, image_size=(4, 3), resize="nearest")
    assert ds.classes == ["cat", "dog"] and ds.in_channels == 3 and ds.image_size == (4, 3)
    assert [p.name for p in ds.files] == ["a.png", "b.JPG", "c.gif", "d.png", "e.png", "f.png",
                                          "g.bmp"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and ds.labels.dtype == torch.int64
    check_images(ds, root, expected)

    test = build_dataset("imagefolder", root, split="test", image_size=(4, 3))  # reads val/
    assert test.classes == ["cat", "dog"] and len(test) == 1
    check_images(test, root, expected)


def test_imagefolder_cache(image_root, tmp_path):
    root, expected = image_root
    cache_dir = tmp_path / "cache"
    plain = build_dataset("imagefolder", root, image_size=(4, 3))
    first = build_dataset("imagefolder", root, image_size=(4, 3), cache_dir=cache_dir)
    # no temp files: the cache and the list of files it skipped (none)
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        first.cache_path.name, first.cache_path.with_suffix(".skipped.json").name]
    assert json.loads(first.cache_path.with_suffix(".skipped.json").read_text()) == []
    assert first.cache.shape == (7, 3, 4, 3)
    for i in range(len(plain)):
        assert torch.equal(first[i][0], plain[i][0]) and first[i][1] == plain[i][1]

    # mark the cache file: a second load must read it rather than decode the images again
    marked = np.load(first.cache_path, mmap_mode="r+")
    marked[0, 0, 0, 0] = 7
    marked.flush()
    del marked
    second = build_dataset("imagefolder", root, image_size=(4, 3), cache_dir=cache_dir)
    assert second.cache_path == first.cache_path and int(second[0][0][0, 0, 0]) == 7
    assert torch.equal(second[1][0], plain[1][0])

    # another size, or a changed file, is another cache
    build_dataset("imagefolder", root, image_size=(2, 2), cache_dir=cache_dir)
    write_image(root / "train/cat/a.png", Image.new("RGB", (8, 6), (0, 255, 0)))
    changed = build_dataset("imagefolder", root, image_size=(4, 3), cache_dir=cache_dir)
    assert changed.cache_path != first.cache_path and len(list(cache_dir.iterdir())) == 6
    assert changed[0][0][:, 0, 0].tolist() == [0, 255, 0]


def reference_stats(images) -> tuple[list[float], list[float]]:
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))
    x = x.double().div(255).transpose(0, 1).flatten(1)
    return [round(v, 4) for v in x.mean(1).tolist()], [round(v, 4) for v in x.std(1).tolist()]


def test_channel_stats_in_chunks_equal_one_pass(image_root, tmp_path):
    """channel_stats reads a few images at a time (bounded memory) and merges their moments:
    the same numbers as one float64 pass over the (sampled) set, for tensors and memory-mapped
    caches, whatever the chunk."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8, generator=g)
    images[:, 1] //= 4                                   # channels with other statistics
    ds = DepthDataset(images, torch.ones(37, 1, 5, 4))
    for chunk in (1, 5, 36, 37, 4096):
        assert channel_stats(ds, chunk) == reference_stats(images)
    cached = build_dataset("imagefolder", image_root[0], image_size=(4, 3),
                           cache_dir=tmp_path / "cache")
    assert channel_stats(cached, chunk=3) == reference_stats(cached.cache)
    # a large set is sampled: every 2nd of 100,002 images
    big = torch.randint(0, 256, (100_002, 3, 1, 1), dtype=torch.uint8, generator=g)
    big[::2, 0] = 0                                      # the sample is all zeros in channel 0
    mean, std = channel_stats(DepthDataset(big, torch.ones(100_002, 1, 1, 1)), chunk=999)
    assert (mean, std) == reference_stats(big[::2]) and mean[0] == 0.0


def test_imagefolder_errors_name_the_path(image_root, tmp_path):
    root, _ = image_root
    with pytest.raises(DataError, match="give image_size"):
        build_dataset("imagefolder", root)
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: ImageFolder root not found"):
        build_dataset("imagefolder", tmp_path / "nowhere", image_size=4)

    no_split = tmp_path / "flat"
    (no_split / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{no_split}: no train folder; expected ROOT/train/"):
        build_dataset("imagefolder", no_split, image_size=4)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{empty / 'train'}: no class folders"):
        build_dataset("imagefolder", empty, image_size=4)
    (empty / "train" / "cat").mkdir()
    (empty / "train" / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"{empty / 'train'}: no images"):
        build_dataset("imagefolder", empty, image_size=4)

    (root / "val" / "bird").mkdir()
    with pytest.raises(DataError, match=r"val: class folders \['bird'\] are not in"):
        build_dataset("imagefolder", root, split="test", image_size=4)

    # every file broken: nothing to train on, one line; no half-written cache left behind
    for name in ("cat", "dog"):
        for path in (root / "train" / name).iterdir():
            path.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"{root / 'train'}: none of its 7 images can be decoded"):
        build_dataset("imagefolder", root, image_size=4, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".json"]


def grey_folder(root: Path, bad: int = 0) -> Path:
    """root/train/{ant,bee}: 3 grey PNGs each (intensity 10 * i), plus `bad` broken files."""
    for k, name in enumerate(("bee", "ant")):
        for i in range(3):
            write_image(root / f"train/{name}/{i}.png", Image.new("L", (6, 4), 10 * i + k))
    for i in range(bad):
        (root / f"train/bee/broken{i}.png").write_bytes(b"\x89PNG cut short")
    return root


def test_imagefolder_channels_from_the_images(tmp_path, capsys):
    """A folder of grey images is a 1-channel data set; a colour image among them is converted
    to grey with a warning under channels=1, and makes the whole set RGB by default."""
    root = grey_folder(tmp_path / "grey")
    ds = build_dataset("imagefolder", root, image_size=(4, 6))
    assert ds.classes == ["ant", "bee"] and ds.in_channels == 1 and ds[0][0].shape == (1, 4, 6)
    assert ds[0][0].flatten().tolist() == [1] * 24 and capsys.readouterr().err == ""
    write_image(root / "train/ant/colour.png", Image.new("RGB", (6, 4), (200, 100, 0)))
    rgb = build_dataset("imagefolder", root, image_size=(4, 6))
    assert rgb.in_channels == 3 and rgb[0][0][:, 0, 0].tolist() == [1, 1, 1]
    assert "converted 6 of 7 grey images to RGB" in capsys.readouterr().err
    grey = build_dataset("imagefolder", root, image_size=(4, 6), channels=1)
    assert grey.in_channels == 1 and int(grey[3][0][0, 0, 0]) == round(0.299 * 200 + 0.587 * 100)
    assert "converted 1 of 7 colour images to grey" in capsys.readouterr().err


@pytest.mark.parametrize("cached", [False, True])
def test_imagefolder_skips_corrupt_files_with_a_count(tmp_path, capsys, cached):
    root = grey_folder(tmp_path / "grey", bad=2)
    cache = tmp_path / "cache" if cached else None
    for _ in range(2 if cached else 1):        # a cache built, then read back
        capsys.readouterr()
        ds = build_dataset("imagefolder", root, image_size=(4, 6), cache_dir=cache)
        assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert [int(ds[i][0][0, 0, 0]) for i in range(6)] == [1, 11, 21, 0, 10, 20]
        assert all(p.name[0].isdigit() for p in ds.files)
    if cached:
        skipped = json.loads(ds.cache_path.with_suffix(".skipped.json").read_text())
        assert skipped == ["bee/broken0.png", "bee/broken1.png"]
        assert ds.cache.shape == (6, 1, 4, 6)
    else:
        assert "skipped 2 of 8 images that cannot be decoded" in capsys.readouterr().err


def test_a_folder_describes_its_channels_and_size(tmp_path):
    from training.data.imagefolder import describe_folder

    root = grey_folder(tmp_path / "grey")                        # 6 grey images of 6x4 (W x H)
    assert describe_folder(root) == {"channels": 1, "image_size": [4, 6]}
    for i in range(7):                                            # most images are now 64x48
        write_image(root / f"train/ant/big{i}.png", Image.new("RGB", (64, 48)))
    # the median size 48x64 is 3072 pixel tokens: shrunk to <= 1024, aspect kept
    assert describe_folder(root) == {"channels": 3, "image_size": [27, 36]}
    assert describe_folder(root, patch_size=4) == {"channels": 3, "image_size": [48, 64]}


def test_imagefolder_val_folder_is_its_own_split(image_root):
    root, _ = image_root
    val = build_dataset("imagefolder", root, split="val", image_size=(4, 3))
    assert len(val) == 1 and val.classes == ["cat", "dog"]


# ---------------------------------------------------------------- CropFlip

def crop_flip_reference(x, params, padding):
    """One sample at a time: zero-pad, slice, flip."""
    out = []
    for i, img in enumerate(x):
        padded = torch.nn.functional.pad(img, (padding,) * 4)
        top, left = int(params["top"][i]), int(params["left"][i])
        crop = padded[:, top:top + x.shape[2], left:left + x.shape[3]]
        out.append(crop.flip(-1) if params["flip"][i] else crop)
    return torch.stack(out)


def test_cropflip_identity_flip_and_crop():
    x = torch.randint(1, 256, (16, 3, 5, 7), dtype=torch.uint8)  # no zeros: padding shows
    gen = torch.Generator().manual_seed(0)
    identity = CropFlip(padding=0, flip=False)
    assert torch.equal(identity(x, gen), x)

    flipper = CropFlip(padding=0, flip=True)
    params = flipper.params(gen, 16, 5, 7)
    assert 0 < int(params["flip"].sum()) < 16
    out = flipper.apply(x, params)
    assert torch.equal(out[params["flip"]], x[params["flip"]].flip(-1))
    assert torch.equal(out[~params["flip"]], x[~params["flip"]])

    cropper = CropFlip(padding=2, flip=False)
    corner = {"top": torch.zeros(16, dtype=torch.long), "left": torch.zeros(16, dtype=torch.long),
              "flip": torch.zeros(16, dtype=torch.bool)}
    out = cropper.apply(x, corner)  # shifted 2 down and 2 right, zeros come in at the border
    assert torch.equal(out[:, :, 2:, 2:], x[:, :, :-2, :-2])
    assert (out[:, :, :2] == 0).all() and (out[:, :, :, :2] == 0).all()

    both = CropFlip(padding=3, flip=True)
    params = both.params(gen, 16, 5, 7)
    assert params["top"].max() <= 6 and params["left"].min() >= 0
    out = both.apply(x, params)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, crop_flip_reference(x, params, 3))


def test_cropflip_params_slice_like_the_batch():
    x = torch.randint(0, 256, (12, 1, 6, 6), dtype=torch.uint8)
    aug = CropFlip(padding=2, flip=True)
    params = aug.params(torch.Generator().manual_seed(5), 12, 6, 6)
    again = aug.params(torch.Generator().manual_seed(5), 12, 6, 6)
    assert all(torch.equal(params[k], again[k]) for k in params)  # same seed, same draw
    whole = aug.apply(x, params)
    for a, b in ((0, 6), (6, 12), (3, 4)):  # what each DDP rank applies to its slice
        part = aug.apply(x[a:b], {k: v[a:b] for k, v in params.items()})
        assert torch.equal(part, whole[a:b])


# ---------------------------------------------------------------- MixUp / CutMix

def test_smooth_targets():
    t = smooth_targets(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.equal(smooth_targets(torch.tensor([1]), 3), torch.tensor([[0.0, 1.0, 0.0]]))


def test_mixup_cutmix_off_only_smooths():
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mixed, targets = MixUpCutMix(0.0, 0.0, label_smoothing=0.2, num_classes=5)(
        x, y, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x)
    assert torch.allclose(targets, smooth_targets(y, 5, 0.2))
    assert torch.allclose(targets[0, 0], torch.tensor(0.84)) and torch.allclose(
        targets[0, 1], torch.tensor(0.04))


def test_mixup_mixes_with_the_flipped_batch():
    x = torch.rand(6, 2, 4, 4)
    y = torch.arange(6)  # y[i] != y[5 - i], so the target on y[i] is lambda itself
    gen = torch.Generator().manual_seed(1)
    mixed, targets = MixUpCutMix(0.8, 0.0, num_classes=6)(x, y, gen)
    lam = targets[0, 0]
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert torch.allclose(targets[torch.arange(6), y], lam.expand(6))
    again = MixUpCutMix(0.8, 0.0, num_classes=6)(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], mixed)  # the generator decides everything


def test_cutmix_lambda_is_the_kept_area():
    x = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 16, 16)
    y = torch.arange(6)
    aug = MixUpCutMix(0.0, 1.0, label_smoothing=0.1, num_classes=6)
    seen = set()
    for seed in range(8):
        mixed, targets = aug(x, y, torch.Generator().manual_seed(seed))
        kept = (mixed == x).float().mean(dim=(1, 2, 3))  # each image's own pixels
        pasted = (mixed == x.flip(0)).float().mean(dim=(1, 2, 3))
        assert torch.allclose(kept + pasted, torch.ones(6))
        lam = float(kept[0])
        seen.add(round(lam, 4))
        assert torch.allclose(kept, torch.full((6,), lam))
        expected = smooth_targets(y, 6, 0.1) * lam + smooth_targets(y.flip(0), 6, 0.1) * (1 - lam)
        assert torch.allclose(targets, expected, atol=1e-6)
        assert torch.allclose(targets.sum(1), torch.ones(6))
    assert len(seen) > 3  # the box really varies with the seed
    assert torch.equal(x, torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(
        6, 3, 16, 16))  # the input batch is left alone


def test_mixup_cutmix_switches():
    x = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 1, 8, 8)
    y = torch.arange(4)
    aug = MixUpCutMix(1.0, 1.0, switch_prob=0.5, num_classes=4)
    kinds = set()
    for seed in range(12):
        mixed, _ = aug(x, y, torch.Generator().manual_seed(seed))
        values = set(mixed[0].unique().tolist())
        kinds.add("cutmix" if values <= {0.0, 3.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}
