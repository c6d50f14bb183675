"""Batched augmentation against per-image references, value ranges, determinism."""
import numpy as np
import pytest
import torch

from softmoe.data import augment, inception_crop, random_crop_flip, to_model_input
from softmoe.data.transforms import inception_crop_params


def images(b=5, c=3, h=8, w=8, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_to_model_input_range_and_resize():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 1, 1, 3).expand(2, 3, 3, 3).contiguous()
    y = to_model_input(x, 3)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 3, 3)
    assert y[0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1], abs=1e-6)
    big = to_model_input(images(), 16)
    assert big.shape == (5, 3, 16, 16) and big.min() >= -1 and big.max() <= 1
    # a constant image stays constant after resizing
    const = torch.full((1, 1, 8, 8), 200, dtype=torch.uint8)
    assert torch.allclose(to_model_input(const, 5), torch.full((1, 1, 5, 5), 200 / 127.5 - 1), atol=1e-6)


def test_to_model_input_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(torch.zeros(1, 1, 4, 4), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        to_model_input(torch.zeros(4, 4, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="img_size"):
        to_model_input(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 0)


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_random_crop_flip_matches_per_image_reference(padding):
    x = images(b=16, c=2, h=6, w=7)
    out = random_crop_flip(x, padding, torch.Generator().manual_seed(123))
    # same draws, in the same order, applied one image at a time with numpy
    g = torch.Generator().manual_seed(123)
    oy = torch.randint(0, 2 * padding + 1, (16,), generator=g)
    ox = torch.randint(0, 2 * padding + 1, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert 0 < int(flip.sum()) < 16  # the check below covers both cases
    for i in range(16):
        padded = np.pad(x[i].numpy(), ((0, 0), (padding, padding), (padding, padding)))
        crop = padded[:, oy[i]:oy[i] + 6, ox[i]:ox[i] + 7]
        if flip[i]:
            crop = crop[:, :, ::-1]
        assert np.array_equal(out[i].numpy(), crop), i


def test_crop_without_flip_and_zero_padding_is_identity():
    x = images()
    assert torch.equal(random_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=False), x)


def test_inception_crop_full_area_is_image_or_mirror():
    x = images(b=32, c=1, h=8, w=8)
    g = torch.Generator().manual_seed(0)
    # area 1 and ratio 1 make the crop the whole image; only the flip is random
    theta = inception_crop_params(32, g, area_min=1.0, ratio=(1.0, 1.0))
    assert torch.allclose(theta[:, :, 2], torch.zeros(32, 2), atol=1e-6)
    assert torch.allclose(theta[:, 0, 0].abs(), torch.ones(32)) and torch.allclose(theta[:, 1, 1], torch.ones(32))
    out = inception_crop(x, 8, torch.Generator().manual_seed(1), area_min=1.0, ratio=(1.0, 1.0))
    ref = to_model_input(x, 8)
    flipped = to_model_input(x.flip(-1), 8)
    same = [torch.allclose(o, r, atol=1e-5) for o, r in zip(out, ref)]
    mirrored = [torch.allclose(o, f, atol=1e-5) for o, f in zip(out, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(same) < 32


def test_inception_crop_range_shape_determinism():
    x = images(b=8, h=12, w=10)
    a = inception_crop(x, 16, torch.Generator().manual_seed(5))
    b = inception_crop(x, 16, torch.Generator().manual_seed(5))
    c = inception_crop(x, 16, torch.Generator().manual_seed(6))
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6


def test_inception_crop_box_statistics():
    theta = inception_crop_params(20000, torch.Generator().manual_seed(0), area_min=0.05)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area = w * h
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 1 + 1e-6
    # box inside the image: |centre| + half-size <= 1 in normalised coordinates
    assert (theta[:, 0, 2].abs() + w <= 1 + 1e-5).all() and (theta[:, 1, 2].abs() + h <= 1 + 1e-5).all()
    assert 0.45 < (theta[:, 0, 0] < 0).float().mean() < 0.55  # half flipped


def test_augment_presets():
    x = images()

    def g():
        return torch.Generator().manual_seed(0)

    assert torch.equal(augment(x, "none", 8, g()), to_model_input(x, 8))
    assert augment(x, "crop_flip", 8, g()).shape == (5, 3, 8, 8)
    assert augment(x, "inception_crop", 4, g()).shape == (5, 3, 4, 4)
    with pytest.raises(ValueError, match="augment must be one of"):
        augment(x, "mixup", 8, g())
