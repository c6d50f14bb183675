"""ImageFolder directories: decoding (exact pixels for PNG), class order, channel handling,
errors naming the file, skip-and-count, the cache and the process pool."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softmoe.data import folder, load_dataset
from softmoe.data.folder import read_image_folder


def make_folder(root: Path, splits=("train", "test"), classes=("cat", "ant"), n=3, size=(6, 5), mode="RGB", seed=0):
    """PNG (lossless) images with known pixels; returns {split: [(class, array)]}."""
    rng = np.random.default_rng(seed)
    made = {}
    for split in splits:
        made[split] = []
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(root / split / cls / f"{i:03d}.png")
                made[split].append((cls, arr))
    return made


def test_image_folder_pixels_and_classes(tmp_path):
    made = make_folder(tmp_path / "ds")
    ds = load_dataset(str(tmp_path / "ds"), "train", cache=False)
    assert ds.classes == ["ant", "cat"]  # sorted folder names
    assert ds.images.shape == (6, 3, 5, 6)  # (N, C, H, W) with H=5, W=6
    # files are read in sorted class order: ant's 3 images, then cat's
    by_class = {c: [a for cc, a in made["train"] if cc == c] for c in ("ant", "cat")}
    expected = np.stack(by_class["ant"] + by_class["cat"]).transpose(0, 3, 1, 2)
    assert torch.equal(ds.images, torch.from_numpy(expected))
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_grayscale_gives_one_channel_and_mixed_gives_three(tmp_path):
    make_folder(tmp_path / "g", mode="L")
    ds = load_dataset(str(tmp_path / "g"), "train", cache=False)
    assert ds.images.shape == (6, 1, 5, 6)
    make_folder(tmp_path / "m", mode="L")
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb, "RGB").save(tmp_path / "m" / "train" / "ant" / "999.png")
    mixed = load_dataset(str(tmp_path / "m"), "train", cache=False)
    assert mixed.images.shape == (7, 3, 5, 6)
    gray = np.asarray(Image.open(tmp_path / "m" / "train" / "ant" / "000.png"))
    assert torch.equal(mixed.images[0], torch.from_numpy(np.stack([gray] * 3)))  # gray repeated over RGB


def test_test_split_falls_back_to_val(tmp_path):
    make_folder(tmp_path / "v", splits=("train", "val"))
    assert load_dataset(str(tmp_path / "v"), "test", cache=False).split == "test"
    with pytest.raises(FileNotFoundError, match="no 'test/' or 'val/'"):
        make_folder(tmp_path / "t", splits=("train",))
        load_dataset(str(tmp_path / "t"), "test", cache=False)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "absent"), "train")
    (tmp_path / "e" / "train").mkdir(parents=True)
    (tmp_path / "e" / "test").mkdir()
    with pytest.raises(ValueError, match="no class subdirectories"):
        load_dataset(str(tmp_path / "e"), "train")
    (tmp_path / "e" / "train" / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(str(tmp_path / "e"), "train")


def test_unknown_class_in_test_split(tmp_path):
    make_folder(tmp_path / "c")
    (tmp_path / "c" / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        load_dataset(str(tmp_path / "c"), "test", cache=False)


def test_unreadable_file_named_or_skipped(tmp_path):
    make_folder(tmp_path / "b")
    bad = tmp_path / "b" / "train" / "cat" / "001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*cat/001\.png.*skip_bad"):
        load_dataset(str(tmp_path / "b"), "train", cache=False)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_dataset(str(tmp_path / "b"), "train", cache=False, skip_bad=True)
    assert len(ds) == 5 and ds.skipped == 1


def test_sizes_must_agree_unless_resized(tmp_path):
    make_folder(tmp_path / "s")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "s" / "train" / "cat" / "big.png")
    with pytest.raises(ValueError, match=r"differ in size.*big\.png.*image_size"):
        load_dataset(str(tmp_path / "s"), "train", cache=False)
    ds = load_dataset(str(tmp_path / "s"), "train", cache=False, image_size=4)
    assert ds.images.shape == (7, 3, 4, 4)


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    make_folder(tmp_path / "k")
    cache = tmp_path / "cache"
    x1, y1, c1, _ = read_image_folder(tmp_path / "k", "train", cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def fail(*a, **k):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(folder, "_decode_all", fail)
    x2, y2, c2, _ = read_image_folder(tmp_path / "k", "train", cache_dir=cache)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and c1 == c2
    # changing a file changes the key: decoded again
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "k" / "train" / "ant" / "000.png")
    with pytest.raises(AssertionError, match="decoded again"):
        read_image_folder(tmp_path / "k", "train", cache_dir=cache)


def test_process_pool_matches_serial(tmp_path, monkeypatch):
    make_folder(tmp_path / "p", n=6)
    serial = read_image_folder(tmp_path / "p", "train", cache=False, workers=1)
    monkeypatch.setattr(folder, "POOL_MIN_FILES", 2)
    pooled = read_image_folder(tmp_path / "p", "train", cache=False, workers=2)
    assert np.array_equal(serial[0], pooled[0]) and np.array_equal(serial[1], pooled[1])


# The team's shared/ folder sits beside the checkout (and beside CI's clone).
SHARED_CIFAR10 = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "cifar10"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_CIFAR10 / "test").is_dir(), reason="shared CIFAR-10 folder absent")
def test_shared_cifar10_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTMOE_CACHE_DIR", str(tmp_path))
    ds = load_dataset("cifar10", "test", root=str(SHARED_CIFAR10))
    assert ds.images.shape == (10000, 3, 32, 32) and ds.classes[0] == "airplane"
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))
