"""Training data: studies read into volumes, neighbour-triplet MONAI datasets (2D, 2D+T).

A *triplet* is (s(n - g), s(n), s(n + g)): the network sees the two neighbours and learns the
middle slice. Items are enumerated (study, slice, phase, gap) records, so a MONAI
``Dataset`` with a seeded ``Compose`` of random flips is deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    ResizeWithPadOrCropd,
    Transform,
)

from .errors import InputRefused
from .io import read_sax
from .transforms import IntensityScaler, cyclic_frames, model_grid_size, resample_inplane


def load_volumes(studies, model_spacing=None):
    """Read studies and scale each to its robust [0, 1] range; returns tensors (Z, T, X, Y)
    (optionally resampled in-plane to ``model_spacing`` mm) and the slice spacings in mm."""
    volumes, spacings = [], []
    for path in studies:
        stack = read_sax(path)
        scaled = IntensityScaler.fit(stack.array)(stack.array.astype(np.float32))
        slices = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 3, 0, 1)))
        size = model_grid_size(stack.shape[:2], stack.pixel_spacing, model_spacing)
        volumes.append(resample_inplane(slices, size).contiguous())
        spacings.append(stack.slice_spacing)
    return volumes, spacings


def triplet_records(volumes, spacings, gaps=(1,), temporal=False):
    """Every (study, slice, phase, gap) whose two neighbours exist; ``temporal`` drops the phase."""
    records = []
    for v, (vol, spacing) in enumerate(zip(volumes, spacings)):
        z, t = vol.shape[:2]
        for gap in gaps:
            for n in range(gap, z - gap):
                for phase in [None] if temporal else range(t):
                    records.append({"study": v, "slice": n, "phase": phase, "gap": gap, "gap_mm": gap * spacing})
    return records


class ExtractTripletd(Transform):
    """Record -> ``image`` (1, X, Y[, T]) = s(n) and ``neighbours`` (2, X, Y[, T]) = [s(n-g), s(n+g)].

    In the 2D+T case the time axis is made ``num_frames`` long with :func:`cyclic_frames`."""

    def __init__(self, volumes, num_frames=None):
        self.volumes = volumes
        self.num_frames = num_frames

    def __call__(self, record):
        vol = self.volumes[record["study"]]
        n, g, phase = record["slice"], record["gap"], record["phase"]
        if phase is None:  # 2D+T: the whole cine slice, time last
            pick = lambda k: cyclic_frames(vol[k].permute(1, 2, 0), self.num_frames)  # noqa: E731
        else:
            pick = lambda k: vol[k, phase]  # noqa: E731
        out = dict(record)
        out["image"] = pick(n)[None].clone()
        out["neighbours"] = torch.stack([pick(n - g), pick(n + g)])
        out["phase"] = -1 if phase is None else phase
        return out


class RandSwapNeighboursd(Randomizable, MapTransform):
    """Reverse the triplet (s(n+g) becomes the left neighbour): the middle slice is unchanged."""

    def __init__(self, prob=0.5):
        MapTransform.__init__(self, keys=["neighbours"])
        self.prob = prob

    def __call__(self, data):
        if self.R.rand() < self.prob:
            data = dict(data)
            data["neighbours"] = data["neighbours"].flip(0)
        return data


def triplet_dataset(
    volumes, spacings, gaps=(1,), temporal=False, spatial_size=None, augment=True, seed=0, num_frames=None
):
    """A MONAI ``Dataset`` of neighbour triplets; deterministic for a given ``seed``."""
    records = triplet_records(volumes, spacings, gaps=gaps, temporal=temporal)
    if not records:
        raise InputRefused(f"no triplets: every study needs at least {2 * min(gaps) + 1} slices for gaps {gaps}")
    keys = ["image", "neighbours"]
    transforms = [ExtractTripletd(volumes, num_frames=num_frames if temporal else None)]
    if spatial_size is not None:
        size = tuple(spatial_size) + ((-1,) if temporal else ())
        transforms.append(ResizeWithPadOrCropd(keys=keys, spatial_size=size))
    if augment:  # the paper's random flips (and here quarter turns), identical for all three slices
        transforms += [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandSwapNeighboursd(prob=0.5),
        ]
        if spatial_size is not None and spatial_size[0] == spatial_size[1]:  # rotations keep square crops batchable
            transforms.append(RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    chain = Compose(transforms)
    chain.set_random_state(seed=seed)
    return Dataset(data=records, transform=chain)


def evenly_spread(length, count) -> list[int]:
    """``count`` indices (at most ``length``) spread evenly over ``range(length)``, ends included."""
    return np.linspace(0, length - 1, min(int(count), length)).round().astype(int).tolist()


def validation_triplets(volumes, spacings, temporal=False, spatial_size=None, num_frames=None, max_triplets=64):
    """A fixed, evenly spread subset of gap-1 triplets without augmentation, for validation."""
    from torch.utils.data import Subset

    if not volumes:
        return []
    full = triplet_dataset(
        volumes, spacings, gaps=(1,), temporal=temporal, spatial_size=spatial_size, augment=False, num_frames=num_frames
    )
    return Subset(full, evenly_spread(len(full), max_triplets))
