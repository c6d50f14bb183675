"""Deterministic batching: a batch is a pure function of (seed, step)."""
import pytest
import torch

from softmoe.data import ImageDataset, TrainBatches, eval_batches, to_model_input


def dataset(n=50):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    return ImageDataset(imgs, torch.arange(n) % 3, ["a", "b", "c"], "toy")


def test_batch_is_pure_function_of_seed_and_step():
    ds = dataset()
    a = TrainBatches(ds, 8, seed=1, img_size=4, augment="crop_flip")
    b = TrainBatches(ds, 8, seed=1, img_size=4, augment="crop_flip")
    first = [a.batch(s) for s in (0, 7, 3, 13)]
    later = [b.batch(s) for s in (13, 3, 7, 0)][::-1]  # other order, other object
    for (x1, y1), (x2, y2) in zip(first, later):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    c = TrainBatches(ds, 8, seed=2, img_size=4, augment="crop_flip")
    assert not torch.equal(c.batch(0)[0], first[0][0])


def test_epochs_are_permutations_without_repeats():
    ds = dataset(50)
    tb = TrainBatches(ds, 8, seed=0, img_size=4)
    assert tb.steps_per_epoch == 6  # 50 // 8, last partial batch dropped
    epoch0 = torch.cat([tb.indices(s) for s in range(6)])
    epoch1 = torch.cat([tb.indices(s) for s in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)
    x, y = tb.batch(2)
    idx = tb.indices(2)
    assert torch.equal(x, to_model_input(ds.images[idx], 4)) and torch.equal(y, ds.labels[idx])


def test_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="batch_size=51 is larger than.*50 images"):
        TrainBatches(dataset(50), 51, seed=0, img_size=4)


def test_eval_batches_cover_dataset_in_order():
    ds = dataset(10)
    ys = torch.cat([y for _, y in eval_batches(ds, 4, 4)])
    assert torch.equal(ys, ds.labels)


def test_image_dataset_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a"], "x")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a"], "x")


class _RecordingImages:
    """Stands in for dataset.images: records every index tensor it is read with."""

    def __init__(self, images):
        self.images, self.reads = images, []

    def __getitem__(self, idx):
        self.reads.append(idx.clone())
        return self.images[idx]

    def __len__(self):
        return len(self.images)


@pytest.mark.parametrize("preset,img_size", [("crop_flip", 8), ("inception_crop", 6), ("none", 8)])
@pytest.mark.parametrize("world", [2, 4])
def test_per_rank_rows_equal_the_whole_batch_bitwise(preset, img_size, world):
    """Per-rank data: rank r's batch(step, rows) is bitwise rows r*b .. (r+1)*b - 1 of the
    single-process batch, and the rank reads only the images of its rows."""
    ds = ImageDataset(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50) % 3,
                      ["a", "b", "c"], "toy")
    tb = TrainBatches(ds, 8, seed=3, img_size=img_size, augment=preset)
    for step in (0, 7):
        x, y = tb.batch(step)
        b = 8 // world
        for r in range(world):
            recorder = ds.images = _RecordingImages(ds.images)
            xr, yr = tb.batch(step, rows=(r * b, (r + 1) * b))
            ds.images = recorder.images
            assert torch.equal(xr, x[r * b:(r + 1) * b]) and torch.equal(yr, y[r * b:(r + 1) * b])
            assert [idx.tolist() for idx in recorder.reads] == [tb.indices(step)[r * b:(r + 1) * b].tolist()]


def test_bad_rows():
    tb = TrainBatches(dataset(), 8, seed=0, img_size=4)
    for rows in [(0, 9), (3, 3), (-1, 2), [0, 4]]:
        with pytest.raises(ValueError, match="rows must be"):
            tb.batch(0, rows=rows)
