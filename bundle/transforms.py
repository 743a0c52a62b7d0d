"""Invertible preprocessing between a scanner's stack and what the networks see.

Each step has an exact inverse so that results always land back on the input's in-plane grid
and intensity scale: robust intensity scaling, in-plane resampling to the model's pixel
spacing, padding to the network's size multiple.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass
class IntensityScaler:
    """Map the ``lower``/``upper`` percentiles of a study to 0 and 1 (values outside are kept)."""

    low: float
    high: float

    @classmethod
    def fit(cls, array, lower=0.5, upper=99.5):
        low, high = np.percentile(np.asarray(array, dtype=np.float64), [lower, upper])
        if high - low < 1e-6:  # a flat image: keep its scale rather than divide by zero
            high = low + 1.0
        return cls(float(low), float(high))

    def __call__(self, x):
        return (x - self.low) / (self.high - self.low)

    def inverse(self, x):
        return x * (self.high - self.low) + self.low


def central_square(images: torch.Tensor, side=None) -> torch.Tensor:
    """The central ``side`` x ``side`` pixels of ``(N, C, X, Y)`` images (all of them for None):
    training and validation items are centred on the LV, so this is the heart region."""
    if side is None:
        return images
    x0, y0 = [max(0, (size - int(side)) // 2) for size in images.shape[2:4]]
    return images[:, :, x0 : x0 + int(side), y0 : y0 + int(side)]


def resample_inplane(images: torch.Tensor, size) -> torch.Tensor:
    """Resample the last two axes of ``(N, C, X, Y)`` images to ``size`` (bilinear, antialiased)."""
    size = tuple(int(s) for s in size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def model_grid_size(shape_xy, spacing_xy, model_spacing):
    """In-plane size after resampling from ``spacing_xy`` to ``model_spacing`` (mm), same field of view."""
    if model_spacing is None:
        return tuple(int(s) for s in shape_xy)
    return tuple(max(1, int(round(n * s / model_spacing))) for n, s in zip(shape_xy, spacing_xy))


def padding_box(size_xy, multiple: int):
    """Where an image of ``size_xy`` sits after symmetric padding to ``multiple``: (x0, x1, y0, y1)."""
    x, y = size_xy
    px, py = (-x) % multiple, (-y) % multiple
    return (px // 2, px // 2 + x, py // 2, py // 2 + y)


def pad_to_multiple(images: torch.Tensor, multiple: int):
    """Pad the last two axes symmetrically (edge values) to a multiple; returns (padded, crop box)."""
    x, y = images.shape[-2:]
    box = padding_box((x, y), multiple)
    px, py = (-x) % multiple, (-y) % multiple
    if px == 0 and py == 0:
        return images, box
    padded = F.pad(images, (box[2], py - box[2], box[0], px - box[0]), mode="replicate")
    return padded, box


def crop_box(images: torch.Tensor, box):
    x0, x1, y0, y1 = box
    return images[..., x0:x1, y0:y1]


def center_crop_or_pad(images: torch.Tensor, size):
    """Crop or zero-pad the last two axes around the centre to ``size`` (for training patches)."""
    out = images
    for axis, target in zip((-2, -1), size):
        n = out.shape[axis]
        if n > target:
            start = (n - target) // 2
            out = out.narrow(axis, start, target)
        elif n < target:
            before = (target - n) // 2
            pad = [0, 0, 0, 0]
            idx = 0 if axis == -1 else 2
            pad[idx], pad[idx + 1] = before, target - n - before
            out = F.pad(out, pad)
    return out


@dataclasses.dataclass
class SlicePreprocessor:
    """Scanner slices <-> network slices for one study, invertible.

    ``forward`` takes ``(N, C, X, Y)`` images in scanner intensities on the input grid and
    returns scaled, resampled, padded images; ``inverse`` undoes all three, landing exactly on
    the input's ``(X, Y)`` grid.
    """

    scaler: IntensityScaler
    input_size: tuple
    model_size: tuple
    multiple: int = 8
    slice_spacing: float | None = None  # mm between acquired slices (tells the bisection gaps)

    @classmethod
    def for_stack(cls, stack, model_spacing=None, multiple=8):
        size_xy = stack.array.shape[:2]
        return cls(
            IntensityScaler.fit(stack.array),
            tuple(size_xy),
            model_grid_size(size_xy, stack.pixel_spacing, model_spacing),
            multiple,
            stack.slice_spacing,
        )

    def forward(self, images: torch.Tensor):
        out = resample_inplane(self.scaler(images.float()), self.model_size)
        return pad_to_multiple(out, self.multiple)[0]

    def inverse(self, images: torch.Tensor):
        out = resample_inplane(crop_box(images, padding_box(self.model_size, self.multiple)), self.input_size)
        return self.scaler.inverse(out)


def cyclic_frames(cine: torch.Tensor, num_frames: int | None) -> torch.Tensor:
    """Cine (..., T) to (..., num_frames): a cardiac cycle is periodic, so pad by wrapping
    around it, or keep the first ``num_frames``."""
    if num_frames is None or cine.shape[-1] == num_frames:
        return cine
    index = torch.arange(num_frames, device=cine.device) % cine.shape[-1]
    return cine.index_select(-1, index)
