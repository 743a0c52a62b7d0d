"""Preprocessing for the networks is invertible and lands on the input's grid."""

import numpy as np
import pytest
import torch

from bundle.stack import SaxStack
from bundle.transforms import IntensityScaler, SlicePreprocessor, center_crop_or_pad, crop_box, pad_to_multiple


def test_intensity_scaler_inverse_is_exact():
    x = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 20))
    scaler = IntensityScaler.fit(x)
    assert np.percentile(scaler(x), 0.5) == pytest.approx(0.0, abs=1e-9)
    assert np.percentile(scaler(x), 99.5) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(scaler.inverse(scaler(x)), x, rtol=1e-12)
    flat = IntensityScaler.fit(np.full((4, 4), 7.0))
    assert np.isfinite(flat(np.full((4, 4), 7.0))).all()


@pytest.mark.parametrize("size", [(30, 17), (32, 32), (1, 9)])
def test_pad_and_crop_back(size):
    x = torch.rand(2, 1, *size)
    padded, box = pad_to_multiple(x, 8)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    torch.testing.assert_close(crop_box(padded, box), x, rtol=0, atol=0)


def test_center_crop_or_pad():
    x = torch.rand(1, 10, 6)
    y = center_crop_or_pad(x, (8, 8))
    assert y.shape == (1, 8, 8)
    torch.testing.assert_close(y[:, :, 1:7], x[:, 1:9, :])


def test_slice_preprocessor_round_trip_on_input_grid():
    # a smooth image at 1.37 mm, resampled to a 1.0 mm model grid, padded to 8, and back
    xs, ys = np.meshgrid(np.linspace(0, 3, 37), np.linspace(0, 2, 45), indexing="ij")
    image = (200 + 100 * np.sin(xs) * np.cos(ys)).astype(np.float32)
    stack = SaxStack(np.stack([image, image], axis=2)[..., None], np.diag([1.37, 1.37, 8.0, 1.0]))
    pre = SlicePreprocessor.for_stack(stack, model_spacing=1.0, multiple=8)
    assert pre.model_size == (51, 62)
    net = pre.forward(torch.from_numpy(image)[None, None])
    assert net.shape[-2:] == (56, 64)
    back = pre.inverse(net)[0, 0].numpy()
    assert back.shape == image.shape
    np.testing.assert_allclose(back[2:-2, 2:-2], image[2:-2, 2:-2], rtol=0, atol=3.0)  # < 1% of the range
