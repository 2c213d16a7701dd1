"""Depth data sets: NYU-v2 labeled (.mat), a folder of RGB + 16-bit depth PNGs, rendered scenes.

Every data set has `len()`, `ds[i] -> (uint8 (3, H, W), float32 depth (1, H, W) in metres, 0 where
invalid)`, the whole split in memory as `images` (uint8 (N, 3, H, W)) and `depths` (float32
(N, 1, H, W)), `image_size` (H, W) and `in_channels` (3). The default size is the paper's 48x64.
RGB is resized bicubic; depth is resized nearest (every output depth is one measured depth:
interpolating across an object's edge would invent depths that lie on neither surface).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixtok.resize import nearest_index, resize_image
from training.data.base import DataError, parse_image_size
from training.data.rgbd import DepthDataset
from training.data.scenes import SceneDataset

NAMES = ("nyu", "scenes", "folder")
NYU_FILE = "nyu_depth_v2_labeled.mat"
NYU_SPLITS_FILE = "splits.mat"


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a float depth map (H, W) -> size, same pixel centres as resize_image."""
    rows, cols = nearest_index(depth.shape[0], size[0]), nearest_index(depth.shape[1], size[1])
    return np.ascontiguousarray(depth[rows][:, cols])


def read_indices(spec, split: str) -> np.ndarray:
    """1-based sample numbers of `split` -> 0-based int64 indices.

    spec: a splits .mat holding trainNdxs/testNdxs (MATLAB v7.3 via h5py, or older via scipy),
    or the indices of this split alone: a .txt (whitespace separated), a .npy, or a list.
    """
    if isinstance(spec, (list, tuple, np.ndarray)):
        ndx = np.asarray(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"{path}: split file not found (expected a splits .mat with "
                            f"trainNdxs/testNdxs, or a .txt/.npy of 1-based indices)")
        if path.suffix == ".mat":
            ndx = read_mat_split(path, f"{split}Ndxs")
        elif path.suffix == ".npy":
            ndx = np.load(path, allow_pickle=False)
        else:
            try:
                ndx = np.loadtxt(path, ndmin=1)
            except ValueError as e:
                raise DataError(f"{path}: expected whitespace-separated 1-based indices "
                                f"({e})") from None
    ndx = np.asarray(ndx, dtype=np.float64).ravel()
    if ndx.size == 0 or np.any(ndx != np.round(ndx)) or ndx.min() < 1:
        raise DataError(f"split indices {spec}: expected positive whole numbers (1-based, as in "
                        f"MATLAB)")
    return ndx.astype(np.int64) - 1


def read_mat_split(path: Path, key: str) -> np.ndarray:
    """Array `key` of a .mat file: v7.3 files are HDF5 (h5py); v5 files need scipy."""
    import h5py

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DataError(f"{path}: no {key!r} (found {', '.join(f.keys())})")
            return f[key][()]
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: a MATLAB v5 file; install scipy to read it, or save it with "
                        f"-v7.3 or as .txt") from None
    try:
        mat = loadmat(path)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .mat file ({e})") from None
    if key not in mat:
        raise DataError(f"{path}: no {key!r} (found {', '.join(k for k in mat if k[0] != '_')})")
    return mat[key]


def load_nyu(data_dir, split: str, image_size: tuple[int, int], splits=None) -> DepthDataset:
    """NYU-v2 labeled: data_dir is nyu_depth_v2_labeled.mat or a folder holding it.

    MATLAB stores arrays column-major, so h5py sees images as (N, 3, W, H) and depths as
    (N, W, H); both are transposed back here. `splits` defaults to splits.mat beside the data.
    """
    import h5py

    path = Path(data_dir) if data_dir is not None else Path(NYU_FILE)
    if path.is_dir():
        path = path / NYU_FILE
    if not path.is_file():
        raise DataError(f"{path}: NYU-v2 file not found (expected {NYU_FILE}, the labeled set "
                        f"saved by MATLAB -v7.3, with datasets 'images' and 'depths')")
    if splits is None:
        splits = path.parent / NYU_SPLITS_FILE
        if not splits.is_file():
            raise DataError(f"{path}: no split given and no {splits}; pass splits= a splits.mat "
                            f"(trainNdxs/testNdxs) or a .txt/.npy/list of 1-based indices")
    if not h5py.is_hdf5(path):
        raise DataError(f"{path}: not an HDF5 (MATLAB -v7.3) file")
    with h5py.File(path, "r") as f:
        if "images" not in f or "depths" not in f:
            raise DataError(f"{path}: expected datasets 'images' and 'depths', found "
                            f"{', '.join(f.keys())}")
        rgb, depth = f["images"], f["depths"]
        if rgb.ndim != 4 or rgb.shape[1] != 3 or depth.shape != (rgb.shape[0], *rgb.shape[2:]):
            raise DataError(f"{path}: images {rgb.shape} and depths {depth.shape}; expected "
                            f"(N, 3, W, H) and (N, W, H) as MATLAB stores them")
        idx = read_indices(splits, split)
        if idx.max() >= rgb.shape[0]:
            raise DataError(f"split index {idx.max() + 1} is past the {rgb.shape[0]} samples "
                            f"in {path}")
        h, w = image_size
        images = np.empty((len(idx), 3, h, w), np.uint8)
        depths = np.empty((len(idx), 1, h, w), np.float32)
        for k, i in enumerate(idx):   # one sample at a time: the full file is ~3 GB
            img = np.asarray(rgb[i], dtype=np.uint8).transpose(2, 1, 0)   # (H, W, 3)
            images[k] = resize_image(img, image_size, "bicubic").transpose(2, 0, 1)
            depths[k, 0] = resize_depth(np.asarray(depth[i], np.float32).T, image_size)
    return DepthDataset(torch.from_numpy(images), torch.from_numpy(depths), own=True)


def load_folder(data_dir, split: str, image_size: tuple[int, int]) -> DepthDataset:
    """root/<split>/rgb/*.png with root/<split>/depth/*.png (16-bit, millimetres, 0 = invalid)."""
    layout = "root/{train,test}/rgb/*.png + root/{train,test}/depth/*.png (16-bit, mm)"
    if data_dir is None:
        raise DataError(f"the folder data set needs data_dir: {layout}")
    rgb_dir, depth_dir = Path(data_dir) / split / "rgb", Path(data_dir) / split / "depth"
    for d in (rgb_dir, depth_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found; expected {layout}")
    rgb_files = {p.stem: p for p in sorted(rgb_dir.glob("*.png"))}
    depth_files = {p.stem: p for p in sorted(depth_dir.glob("*.png"))}
    if not rgb_files:
        raise DataError(f"{rgb_dir}: no .png files; expected {layout}")
    if rgb_files.keys() != depth_files.keys():
        lone = sorted(rgb_files.keys() ^ depth_files.keys())
        raise DataError(f"{Path(data_dir) / split}: rgb/ and depth/ must hold the same file "
                        f"stems; unmatched: {', '.join(lone[:5])}")
    h, w = image_size
    images = np.empty((len(rgb_files), 3, h, w), np.uint8)
    depths = np.empty((len(rgb_files), 1, h, w), np.float32)
    for k, stem in enumerate(rgb_files):
        rgb, mm = read_png(rgb_files[stem]).convert("RGB"), read_png(depth_files[stem])
        if mm.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise DataError(f"{depth_files[stem]}: mode {mm.mode}; expected a 16-bit "
                            f"single-channel PNG of millimetres")
        if rgb.size != mm.size:
            raise DataError(f"{rgb_files[stem]} is {rgb.size[0]}x{rgb.size[1]} but its depth "
                            f"{depth_files[stem]} is {mm.size[0]}x{mm.size[1]}")
        images[k] = resize_image(rgb, image_size, "bicubic").transpose(2, 0, 1)
        metres = np.asarray(mm, dtype=np.float32) / 1000.0
        depths[k, 0] = resize_depth(metres, image_size)
    return DepthDataset(torch.from_numpy(images), torch.from_numpy(depths), own=True)


def read_png(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return img


def build_depth_dataset(name: str, data_dir=None, split: str = "train",
                        image_size=(48, 64), **kw) -> DepthDataset:
    """Depth data set `name`: "nyu" (kw: splits), "folder", "scenes" (kw: n, seed, cache_dir)."""
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}: expected train or test")
    size = parse_image_size(image_size)
    if size is None:
        raise DataError("depth data sets need an image_size (H, W), e.g. (48, 64)")
    allowed = {"nyu": {"splits"}, "folder": set(), "scenes": {"n", "seed", "cache_dir"}}
    if name not in allowed:
        raise DataError(f"depth data set {name!r}: expected one of {', '.join(NAMES)}")
    extra = set(kw) - allowed[name]
    if extra:
        raise DataError(f"depth data set {name!r} takes no option {', '.join(sorted(extra))}")
    if name == "nyu":
        return load_nyu(data_dir, split, size, kw.get("splits"))
    if name == "folder":
        return load_folder(data_dir, split, size)
    n = kw.get("n", 2000 if split == "train" else 500)
    if not isinstance(n, int) or n < 1:
        raise DataError(f"scenes: n={n!r}; expected a positive number of scenes")
    return SceneDataset(n, int(kw.get("seed", 0)), size, split,
                        cache_dir=kw.get("cache_dir") or None)
