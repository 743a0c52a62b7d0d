"""The short-axis stack every reader returns and every writer takes: an array indexed
(x, y, slice, phase) and a RAS affine whose third column is the measured slice step."""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import InputRefused


@dataclasses.dataclass
class SaxStack:
    """A short-axis (cine) stack: ``array[x, y, slice, phase]`` and its RAS ``affine``.

    ``affine[:3, 2]`` is the step from one slice to the next in world millimetres, so
    ``np.linalg.norm(affine[:3, 2])`` is the measured slice spacing. ``meta`` holds what a
    writer needs: ``trigger_times`` (ms, per phase), ``source``, ``was_3d`` (a 3D input is
    written back as 3D) and free-form header fields.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 4:
            raise InputRefused(f"expected an array (x, y, slice, phase), got shape {self.array.shape}")

    @property
    def shape(self):
        return self.array.shape

    @property
    def pixel_spacing(self):
        """In-plane spacing (x, y) in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(2))

    @property
    def slice_spacing(self):
        """Distance between the slice planes (mm), along their normal: the slice step's length
        when the slices are orthogonal to it, shorter when the affine is sheared."""
        step = self.affine[:3, 2]
        length = float(np.linalg.norm(step))
        normal = np.cross(self.affine[:3, 0], self.affine[:3, 1])
        if not np.linalg.norm(normal):
            return length
        along = float(abs(step @ normal) / np.linalg.norm(normal))
        return length if abs(along - length) <= 1e-9 * length else along  # exact when not sheared

    def validate(self):
        """Refuse stacks no method can upsample; returns self."""
        x, y, z, t = self.array.shape
        if x < 2 or y < 2:
            raise InputRefused(f"expected 2D slices, got in-plane size {x}x{y}")
        if z < 2:
            raise InputRefused(
                f"a stack needs at least two slices to interpolate between, got {z} slice(s) "
                f"(shape {self.array.shape})"
            )
        if not np.all(np.isfinite(self.array)):
            bad = np.argwhere(~np.isfinite(self.array))[0]
            raise InputRefused(
                f"non-finite intensity (NaN or inf) in the input, first at voxel (x, y, slice, phase) = {tuple(bad)}"
            )
        largest, limit = float(np.max(np.abs(self.array))), float(np.finfo(np.float32).max)
        if largest > limit:  # outputs are float32: this would be written as inf
            raise InputRefused(
                f"intensities up to {largest:.3g} do not fit the float32 output (largest {limit:.3g}); "
                "rescale the input"
            )
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise InputRefused(f"the affine is degenerate or non-finite:\n{self.affine}")
        return self


def voxel_to_world(affine, ijk):
    """World (RAS) coordinates of voxel indices ``ijk`` (..., 3)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def crop_inplane(stack: SaxStack, x0, x1, y0, y1, phases=None) -> SaxStack:
    """Crop ``[x0:x1, y0:y1]`` (and optionally a phase selection), moving the origin so that
    every kept voxel keeps its world position."""
    array = stack.array[x0:x1, y0:y1]
    meta = dict(stack.meta)
    if phases is not None:
        array = array[..., phases]
        meta["trigger_times"] = [stack.meta["trigger_times"][p] for p in phases]
        if "instance_numbers" in meta:
            meta["instance_numbers"] = [[row[p] for p in phases] for row in meta["instance_numbers"]]
    affine = stack.affine.copy()
    affine[:3, 3] = voxel_to_world(stack.affine, [x0, y0, 0])
    return SaxStack(np.ascontiguousarray(array), affine, meta)


def every_nth_slice(stack: SaxStack, start: int, step: int) -> SaxStack:
    """Slices ``start::step``, the slice step ``step`` times longer, every kept slice where it was."""
    meta = dict(stack.meta)
    if "instance_numbers" in meta:
        meta["instance_numbers"] = meta["instance_numbers"][start::step]
    affine = stack.affine.copy()
    affine[:3, 3] = voxel_to_world(stack.affine, [0, 0, start])
    affine[:3, 2] *= step
    return SaxStack(np.ascontiguousarray(stack.array[:, :, start::step]), affine, meta)
