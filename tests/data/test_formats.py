"""On-disk readers: IDX (gz or not), CIFAR binary, SVHN .mat, digits, dataset lookup errors.
Every reader is checked against arrays written by the test in the documented byte layout."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from softmoe.data import DATASETS, load_dataset
from softmoe.data import formats


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_mnist_layout(tmp_path, compress):
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    x_train = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y_train = rng.integers(0, 10, 7, dtype=np.uint8)
    x_test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    y_test = rng.integers(0, 10, 3, dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x_train, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", y_train, compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", x_test, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", y_test, compress)
    ds = load_dataset("mnist", "train", root=str(tmp_path))
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x_train))
    assert torch.equal(ds.labels, torch.from_numpy(y_train.astype(np.int64)))
    test = load_dataset("mnist", "test", root=str(tmp_path))
    assert torch.equal(test.images[:, 0], torch.from_numpy(x_test)) and len(test) == 3
    img, label = test[1]
    assert img.shape == (1, 28, 28) and label == int(y_test[1])


def test_idx_torchvision_layout_and_fashion_classes(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 4), ("t10k", 2)):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.full((n, 5, 6), 9, np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    ds = load_dataset("fashion_mnist", "test", root=str(tmp_path))
    assert ds.images.shape == (2, 1, 5, 6) and ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10


def test_idx_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\0" * 20)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*not an IDX"):
        formats.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\0" * 3)
    with pytest.raises(ValueError, match="10 bytes.*3 bytes"):
        formats.read_idx(short)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist():
    ds = load_dataset("fashion_mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))


def _cifar_records(n, label_bytes, rng):
    labels = rng.integers(0, 10 if label_bytes == 1 else 100, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    data = np.concatenate([labels, pixels.reshape(n, -1)], axis=1).tobytes()
    return data, labels, pixels


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    expected_x, expected_y = [], []
    for i in range(1, 6):
        data, labels, pixels = _cifar_records(2, 1, rng)
        (d / f"data_batch_{i}.bin").write_bytes(data)
        expected_x.append(pixels)
        expected_y.append(labels[:, 0])
    data, labels, pixels = _cifar_records(3, 1, rng)
    (d / "test_batch.bin").write_bytes(data)
    ds = load_dataset("cifar10", "train", root=str(tmp_path))
    assert ds.images.shape == (10, 3, 32, 32) and ds.classes[0] == "airplane"
    assert torch.equal(ds.images, torch.from_numpy(np.concatenate(expected_x)))
    assert torch.equal(ds.labels, torch.from_numpy(np.concatenate(expected_y).astype(np.int64)))
    test = load_dataset("cifar10", "test", root=str(d))  # the batches folder itself works too
    assert torch.equal(test.images, torch.from_numpy(pixels))


def test_cifar100_binary_uses_fine_label(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    data, labels, pixels = _cifar_records(4, 2, rng)
    (d / "train.bin").write_bytes(data)
    (d / "test.bin").write_bytes(data)
    ds = load_dataset("cifar100", "train", root=str(tmp_path))
    assert torch.equal(ds.labels, torch.from_numpy(labels[:, 1].astype(np.int64)))
    assert len(ds.classes) == 100


def test_cifar_truncated_file(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (d / name).write_bytes(b"\0" * 3073)
    (d / "test_batch.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(ValueError, match="test_batch.bin.*3073"):
        load_dataset("cifar10", "test", root=str(tmp_path))


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", "test", root=str(tmp_path))
    assert ds.images.shape == (5, 3, 32, 32)
    assert ds.labels.tolist() == [0, 1, 2, 0, 9]  # label 10 is the digit 0
    # pixel (row 4, col 7, channel 2) of image 3
    assert int(ds.images[3, 2, 4, 7]) == int(x[4, 7, 2, 3])


def test_digits_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # stratified: every class has 20% (rounded) of its images in test
    from sklearn.datasets import load_digits

    d = load_digits()
    counts = np.bincount(d.target)
    assert test.labels.bincount().tolist() == [int(round(c * 0.2)) for c in counts]
    # values 0..16 -> round(v * 255 / 16), and the split is a partition of the 1797 images
    all_imgs = torch.cat([train.images, test.images]).reshape(1797, 64).numpy()
    ref = np.round(d.images.reshape(1797, 64) * 255 / 16).astype(np.uint8)

    def as_rows(a):
        return sorted(map(bytes, a))

    assert as_rows(all_imgs) == as_rows(ref)
    # fixed: loading again gives the same split
    assert torch.equal(load_dataset("digits", "test").images, test.images)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="unknown dataset 'cifar-10'.*cifar10.*did you mean 'cifar10'"):
        load_dataset("cifar-10")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("digits", "validation")


def test_missing_named_dataset_says_what_to_place(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin.*install torchvision"):
        load_dataset("cifar10", "train", root=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="idx3"):
        load_dataset("mnist", "test", root=str(tmp_path))
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn"}
