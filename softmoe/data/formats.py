"""Readers for the standard on-disk formats of the small vision datasets, with no torchvision
and no unpickling: IDX (MNIST, Fashion-MNIST; gzipped or not), the CIFAR *binary* version
(`cifar-10-batches-bin`, `cifar-100-binary`), and SVHN's MATLAB files (scipy.io.loadmat reads
arrays only). Each returns numpy arrays: images uint8 (N, C, H, W), labels int64 (N,).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
SVHN_CLASSES = [str(i) for i in range(10)]


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000TTDD (TT type code, DD number of dims),
    big-endian int32 dims, then the data. Only unsigned bytes (0x08) are used by the datasets."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code != 0x08:
        raise ValueError(f"{path}: IDX type code {type_code:#x} is not unsigned byte (0x08)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
                         f"{len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of `split` in `directory`, gzipped or not; None if absent.
    Also accepts the `train-images.idx3-ubyte` spelling some mirrors use."""
    found = []
    for base in _IDX_NAMES[split]:
        candidates = [base, base + ".gz", base.replace("-idx", ".idx"), base.replace("-idx", ".idx") + ".gz"]
        hit = next((directory / c for c in candidates if (directory / c).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def read_idx_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected 3 dims (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    return images[:, None].copy(), labels.astype(np.int64)  # (N, 1, H, W)


def read_cifar_binary(paths: list[Path], label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR binary batches: records of `label_bytes` label bytes then 3*32*32 pixel bytes
    (channel-major, row-major). CIFAR-10 has 1 label byte; CIFAR-100 has 2 (coarse, fine)."""
    record = label_bytes + 3 * 32 * 32
    images, labels = [], []
    for p in paths:
        data = _read_bytes(p)
        if len(data) == 0 or len(data) % record:
            raise ValueError(f"{p}: size {len(data)} is not a multiple of the CIFAR record size {record}")
        arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
        labels.append(arr[:, label_index].astype(np.int64))
        images.append(arr[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def cifar_binary_files(directory: Path, which: str, split: str) -> tuple[list[Path], list[str]] | None:
    """The binary batch files and class names of CIFAR-10/100 under `directory` (which holds
    `cifar-10-batches-bin/` or is that folder itself); None when not found."""
    sub = "cifar-10-batches-bin" if which == "cifar10" else "cifar-100-binary"
    for d in (directory / sub, directory):
        if which == "cifar10":
            names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
            meta = d / "batches.meta.txt"
        else:
            names = ["train.bin"] if split == "train" else ["test.bin"]
            meta = d / "fine_label_names.txt"
        files = [d / n for n in names]
        if all(f.is_file() for f in files):
            classes = None
            if meta.is_file():
                classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
            if which == "cifar10" and not classes:
                classes = CIFAR10_CLASSES
            if which == "cifar100" and (not classes or len(classes) != 100):
                classes = [str(i) for i in range(100)]
            return files, classes
    return None


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits: X (32, 32, 3, N) uint8, y (N, 1) with label 10 meaning digit 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for corrupt files
        raise ValueError(f"cannot read {path}: {e}") from e
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: expected variables 'X' and 'y', found {found}")
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8))  # (N, 3, 32, 32)
    y = mat["y"].reshape(-1).astype(np.int64) % 10
    return x, y
