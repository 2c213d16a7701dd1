"""CIFAR-100 (Krizhevsky 2009) from its "python version": cifar-100-python/{train,test,meta}.

Each split is a pickled dict: b"data" uint8 (N, 3072) with the R, G and B planes of a 32x32
image one after the other, b"fine_labels" (100 classes) and b"coarse_labels" (20 superclasses);
meta holds b"fine_label_names" and b"coarse_label_names". The pickles are a user's file, so they
are read with an unpickler that can build numpy arrays and nothing else.
"""
from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path

import numpy as np

from .base import DataError, InMemoryDataset

FOLDER = "cifar-100-python"
LAYOUT = (f"expected the folder {FOLDER} with the pickles train, test and meta (the python "
          f"version of CIFAR-100, unpacked from cifar-100-python.tar.gz), or its parent")


def numpy_global(name: str):
    """numpy's multiarray helper `name`, wherever this numpy keeps it (numpy._core since 2.0)."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no multiarray.{name}")


# (module, name) a CIFAR pickle may ask for -> the object it gets. Python 2 pickles (the
# originals) name __builtin__ and numpy.core; Python 3 protocol-2 pickles add _codecs.encode.
ALLOWED = {
    **{(m, "_reconstruct"): numpy_global("_reconstruct")
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): numpy_global("scalar")
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(m, t.__name__): t for m in ("builtins", "__builtin__")
       for t in (list, dict, tuple, set, frozenset, bytes, bytearray)},
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those numpy arrays and containers need."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise DataError(f"{self.path}: refusing to unpickle {module}.{name}: a CIFAR pickle "
                        f"holds only numpy arrays, lists and dicts; {LAYOUT}")


def load_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys."""
    if not path.is_file():
        raise DataError(f"{path}: not found; {LAYOUT}")
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a broken pickle raises nearly anything: it is the file's fault
        raise DataError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e}); {LAYOUT}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, expected a dict; {LAYOUT}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def require(d: dict, key: str, path: Path):
    if key not in d:
        raise DataError(f"{path}: no {key!r} entry (has {sorted(map(str, d))}); {LAYOUT}")
    return d[key]


def find_folder(data_dir) -> Path:
    """data_dir itself if it holds the pickles, else data_dir/cifar-100-python."""
    if data_dir is None:
        raise DataError(f"CIFAR-100 needs a data folder: {LAYOUT}")
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / FOLDER):
        if any((folder / name).is_file() for name in ("train", "test", "meta")):
            return folder
    raise DataError(f"{data_dir}: no CIFAR-100 here; {LAYOUT}")


def load_cifar100(data_dir, split: str, image_size, resize: str,
                  coarse: bool = False) -> InMemoryDataset:
    """One split of CIFAR-100 with fine (100) or coarse (20) labels, images (N, 3, H, W)."""
    folder = find_folder(data_dir)
    kind = "coarse" if coarse else "fine"
    meta = load_pickle(folder / "meta")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n)
               for n in require(meta, f"{kind}_label_names", folder / "meta")]
    path = folder / split
    batch = load_pickle(path)
    data = require(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' is {getattr(data, 'dtype', '')} {shape}, expected "
                        f"uint8 (N, 3072); {LAYOUT}")
    labels = np.asarray(require(batch, f"{kind}_labels", path))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{kind}_labels' is not a list of integers; {LAYOUT}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return InMemoryDataset(images, labels, classes, image_size, resize, str(path))
