"""`load_dataset(name, split, root, download)`: every dataset as an in-memory ImageDataset.

Where files come from, in order:
  - `digits`: scikit-learn's embedded 8x8 digits (no download), split by a fixed seed;
  - a path: an ImageFolder directory (`train/` plus `test/` or `val/`);
  - a named dataset with files under `root` (or `$SOFTMOE_DATA_DIR/<name>`, or
    `~/.cache/softmoe/datasets/<name>`): IDX files, CIFAR binary batches, SVHN .mat files, or an
    ImageFolder layout; Fashion-MNIST also from Debian's /usr/share/datasets/fashion-mnist;
  - otherwise torchvision, if installed (downloading when `download=True`).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np
import torch

from softmoe._compat import import_torchvision_datasets
from softmoe._io import user_cache_dir

from . import formats
from .dataset import ImageDataset
from .folder import read_image_folder

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn")
SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DEBIAN_DATASETS = Path("/usr/share/datasets")


def default_data_root(name: str) -> Path:
    return user_cache_dir("datasets", "SOFTMOE_DATA_DIR") / name


def load_dataset(name: str, split: str = "train", root: str | None = None, download: bool = False, *,
                 image_size: int | None = None, skip_bad: bool = False, cache: bool = True) -> ImageDataset:
    """Load `split` ("train" or "test"; "val" for ImageFolder) of dataset `name` (one of
    DATASETS, or a path to an ImageFolder directory) into memory as uint8 (N, C, H, W).

    `image_size`, `skip_bad`, `cache` apply to ImageFolder data (resize while decoding, skip
    unreadable files, cache the decoded arrays)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, one of {list(DATASETS)} or a directory")
    folder_split = split in ("train", "test", "val")
    if not folder_split:
        raise ValueError(f"split must be 'train' or 'test' (or 'val' for ImageFolder data), got {split!r}")
    if name not in DATASETS:
        if os.sep in name or name.startswith(".") or Path(name).exists():
            return _image_folder(Path(name), split, image_size, skip_bad, cache, display=name)
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}: choose one of {list(DATASETS)} or give the path of an "
                         f"ImageFolder directory (with train/ and test/ or val/){hint}")
    if split == "val":
        raise ValueError(f"dataset {name!r} has splits {list(SPLITS)}, got 'val'")
    if name == "digits":
        return _digits(split)
    base = Path(root) if root else default_data_root(name)
    found = _read_local(name, split, base, image_size, skip_bad, cache)
    if found is not None:
        return found
    if name == "fashion_mnist" and root is None:
        found = _read_local(name, split, DEBIAN_DATASETS / "fashion-mnist", image_size, skip_bad, cache)
        if found is not None:
            return found
    return _torchvision(name, split, base, download)


def _to_dataset(images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str,
                skipped: int = 0) -> ImageDataset:
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                        classes, name, split, skipped)


def _digits(split: str) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to 0..255. A stratified split with a
    fixed seed (numpy's legacy RandomState, whose stream never changes): 20% of each class to test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    labels = d.target.astype(np.int64)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(idx[: int(round(len(idx) * DIGITS_TEST_FRACTION))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    keep = is_test if split == "test" else ~is_test
    return _to_dataset(images[keep], labels[keep], [str(i) for i in range(10)], "digits", split)


def _image_folder(root: Path, split: str, image_size, skip_bad, cache, display: str) -> ImageDataset:
    images, labels, classes, skipped = read_image_folder(root, split, image_size=image_size, skip_bad=skip_bad,
                                                         cache=cache)
    return _to_dataset(images, labels, classes, display, split, skipped)


def _is_image_folder(base: Path) -> bool:
    return (base / "train").is_dir() and ((base / "test").is_dir() or (base / "val").is_dir())


def _read_local(name: str, split: str, base: Path, image_size, skip_bad, cache) -> ImageDataset | None:
    """The dataset from files under `base` in any format this module reads, or None."""
    if not base.is_dir():
        return None
    if name in ("mnist", "fashion_mnist"):
        sub = "MNIST" if name == "mnist" else "FashionMNIST"  # torchvision's layout
        for d in (base, base / "raw", base / sub / "raw"):
            if d.is_dir():
                files = formats.find_idx_files(d, split)
                if files:
                    x, y = formats.read_idx_split(*files)
                    classes = formats.MNIST_CLASSES if name == "mnist" else formats.FASHION_MNIST_CLASSES
                    return _to_dataset(x, y, classes, name, split)
    elif name in ("cifar10", "cifar100"):
        found = formats.cifar_binary_files(base, name, split)
        if found:
            files, classes = found
            x, y = formats.read_cifar_binary(files, 1 if name == "cifar10" else 2, 0 if name == "cifar10" else 1)
            return _to_dataset(x, y, classes, name, split)
    elif name == "svhn":
        path = base / f"{split}_32x32.mat"
        if path.is_file():
            x, y = formats.read_svhn_mat(path)
            return _to_dataset(x, y, formats.SVHN_CLASSES, name, split)
    if _is_image_folder(base):
        ds = _image_folder(base, split, image_size, skip_bad, cache, display=name)
        return ds
    return None


_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST", "fashion_mnist": "FashionMNIST",
                "svhn": "SVHN"}
_EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin (the CIFAR binary version) or train/ + test/ "
               "class folders",
    "cifar100": "cifar-100-binary/{train,test}.bin (the CIFAR binary version) or train/ + test/ class folders",
    "mnist": "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (IDX files)",
    "fashion_mnist": "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (IDX files)",
    "svhn": "{train,test}_32x32.mat",
}


def _torchvision(name: str, split: str, base: Path, download: bool) -> ImageDataset:
    tvd = import_torchvision_datasets()
    if tvd is None or (not download and not base.is_dir()):
        how = ("install torchvision and pass download=True (config: download=true)" if tvd is None
               else "pass download=True (config: download=true) to download it with torchvision")
        raise FileNotFoundError(f"dataset {name!r} ({split}) not found under {str(base)!r}: expected "
                                f"{_EXPECTED_FILES[name]}; place the files there (or pass root=DIR) or {how}")
    cls = getattr(tvd, _TORCHVISION[name])
    try:
        if name == "svhn":
            tv = cls(str(base), split=split, download=download)
        else:
            tv = cls(str(base), train=(split == "train"), download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"dataset {name!r} ({split}) not found under {str(base)!r} ({e}); expected "
                                f"{_EXPECTED_FILES[name]}, or pass download=True") from e
    data = tv.data.numpy() if isinstance(tv.data, torch.Tensor) else np.asarray(tv.data)
    if name == "svhn":  # (N, 3, 32, 32) already
        images, labels = data, np.asarray(tv.labels)
    elif data.ndim == 3:  # MNIST-like (N, H, W)
        images, labels = data[:, None], np.asarray(tv.targets)
    else:  # CIFAR (N, H, W, 3)
        images, labels = data.transpose(0, 3, 1, 2), np.asarray(tv.targets)
    classes = list(getattr(tv, "classes", None) or [str(i) for i in range(int(labels.max()) + 1)])
    return _to_dataset(images.astype(np.uint8), labels.astype(np.int64), classes, name, split)
