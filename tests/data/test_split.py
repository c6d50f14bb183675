"""The validation split: deterministic, class-stratified, a partition of the training set."""
import pytest
import torch

from softmoe.data import load_dataset, split_train_val, stratified_split


def test_split_is_a_stratified_deterministic_partition():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    tr, va = stratified_split(labels, 0.2)
    assert sorted(tr.tolist() + va.tolist()) == list(range(35))  # a partition
    counts = torch.bincount(labels[va], minlength=3).tolist()
    assert counts == [2, 4, 1]  # round(0.2 * n_c) per class, by hand
    tr2, va2 = stratified_split(labels, 0.2)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)  # no dependence on global RNG state
    torch.manual_seed(123)
    assert torch.equal(stratified_split(labels, 0.2)[1], va)


def test_every_class_keeps_a_training_image_and_bad_fractions_fail():
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    tr, va = stratified_split(labels, 0.9)
    assert set(labels[tr].tolist()) == {0, 1}
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="val_split"):
            stratified_split(labels, bad)


def test_split_of_digits_is_held_out_of_train():
    ds = load_dataset("digits", "train")
    train, val = split_train_val(ds, 0.1)
    assert len(train) + len(val) == len(ds) and val.split == "val"
    tr, va = stratified_split(ds.labels, 0.1)
    assert torch.equal(val.images, ds.images[va]) and torch.equal(train.labels, ds.labels[tr])
    assert torch.equal(torch.bincount(train.labels) + torch.bincount(val.labels), torch.bincount(ds.labels))


def test_a_missing_val_folder_is_an_error_not_the_test_set(tmp_path):
    from PIL import Image
    import numpy as np

    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "0.png")
    with pytest.raises(FileNotFoundError, match="no 'val/'"):
        load_dataset(str(tmp_path), "val", cache=False)
