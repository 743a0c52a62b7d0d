"""Triplets for the learned model over flow: many hearts, many gaps, flow computed once.

An item is a triplet (s(n - g), s(n), s(n + g)) seen as the model over flow sees it:
``neighbours`` (4, H, W) = the two neighbours warped half way along their flow, the flow
midpoint and its weight against the linear blend (:func:`bundle.motion.flow_conditioning`), or,
for a model over a flow-correction head, what that head makes of them (its re-warped neighbours
and corrected midpoint, as :meth:`bundle.networks.CaLIDNetwork.over_flow` at inference);
``base`` (1, H, W) = the (corrected) midpoint, the slice the model corrects; ``image`` (1, H, W) = s(n);
``gap_mm`` = the distance between the neighbours. Intensities are network scale (about [0, 1]).

Sources, each read once and its flow computed on whole slices (cropping first would cut the
motion at the border):
- cine studies (NIfTI or DICOM): every phase, neighbours one and two acquisitions either side
  (gaps of 2x and 4x the slice spacing: 16-40 mm for Sunnybrook), scaled per study;
- labelled stacks (the Sunnybrook ED/ES layout: ``NAME.nii.gz`` + ``NAME_labels.nii.gz``), each
  slice normalised on its own (their export windowed every image separately);
- phantom subjects' dense truth: neighbours 2-8 mm apart, the small gaps of x4 and x8.
Items are cropped to ``size`` around the LV centre (jittered, flipped, turned and swapped when
training; fixed for validation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import evenly_spread
from .motion import flow_conditioning
from .transforms import IntensityScaler

logger = logging.getLogger(__name__)

# the ED/ES patients held out for choosing checkpoints: every fifth in sorted order
HELD_OUT_PATIENTS = ("SCD0001401", "SCD0002301", "SCD0002801", "SCD0003701", "SCD0004501")


@dataclass
class Triplets:
    """Whole-slice triplets of one source: (N, 1, X, Y) tensors, the gap per item (mm), the LV
    centre per item (pixels, or the image centre) and the name of the source."""

    left: torch.Tensor
    middle: torch.Tensor
    right: torch.Tensor
    gap_mm: torch.Tensor
    centre: torch.Tensor
    name: str


def stack_triplets(slices: np.ndarray, spacing_mm: float, name: str, centre=None, gaps=(1, 2)) -> Triplets:
    """Triplets of a scaled stack ``slices`` (Z, T, X, Y): every slice with neighbours ``g``
    slices either side, for each ``g`` in ``gaps``, every phase."""
    z, t, x, y = slices.shape
    rows = [(n - g, n, n + g, 2 * g * spacing_mm) for g in gaps for n in range(g, z - g)]
    if not rows:
        return None
    index = torch.tensor([r[:3] for r in rows])
    data = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    pick = lambda k: data[index[:, k]].reshape(-1, 1, x, y)  # noqa: E731  (rows x phases)
    gap = torch.tensor([r[3] for r in rows], dtype=torch.float32).repeat_interleave(t)
    middle_xy = (x / 2, y / 2) if centre is None else centre
    return Triplets(pick(0), pick(1), pick(2), gap, torch.tensor(middle_xy).expand(len(gap), 2).clone(), name)


def study_triplets(path, gaps=(1, 2)) -> Triplets:
    """A cine study (scaled to its robust [0, 1] range), LV centre from Sunnybrook contours."""
    from .io import read_sax
    from .studies import dicom_folder, lv_centre_from_contours, study_name

    stack = read_sax(dicom_folder(path))
    scaled = IntensityScaler.fit(stack.array)(stack.array.astype(np.float32))
    return stack_triplets(
        scaled.transpose(2, 3, 0, 1), stack.slice_spacing, study_name(path), lv_centre_from_contours(path), gaps
    )


def labelled_stack_triplets(path, gaps=(1, 2)) -> Triplets:
    """A per-slice-normalised labelled stack (ED/ES layout), LV centre from its labels."""
    from .studies import per_slice_normalised_stack, study_name

    stack, centre = per_slice_normalised_stack(path)
    return stack_triplets(
        stack.array.astype(np.float32).transpose(2, 3, 0, 1), stack.slice_spacing, study_name(path), centre, gaps
    )


def phantom_triplets(seed, half_gaps=(1, 2, 3, 4), phases=4, size=160, every=4) -> Triplets:
    """Dense-truth triplets of a phantom subject (1 mm between truth slices): neighbours
    ``2 h`` mm apart for each ``h`` in ``half_gaps``, every ``every``-th truth slice in the middle
    (neighbouring triplets would share most of their pixels)."""
    from .phantom import make_subject

    subject = make_subject(seed=seed, size=size, num_slices=9, num_phases=phases)
    truth = subject.truth
    scaled = torch.from_numpy(IntensityScaler.fit(truth.array)(truth.array.astype(np.float32)).transpose(2, 3, 0, 1))
    x, y = scaled.shape[2:]
    parts = {"left": [], "middle": [], "right": [], "gap": []}
    for h in half_gaps:
        middles = torch.arange(h, scaled.shape[0] - h, every)
        for key, index in (("left", middles - h), ("middle", middles), ("right", middles + h)):
            parts[key].append(scaled[index].reshape(-1, 1, x, y))
        parts["gap"].append(torch.full((len(middles) * scaled.shape[1],), 2.0 * h * truth.slice_spacing))
    lv = np.argwhere(subject.labels.array[..., 0] > 0)
    centre = tuple(lv[:, :2].mean(0)) if len(lv) else (x / 2, y / 2)
    gap = torch.cat(parts["gap"])
    return Triplets(
        torch.cat(parts["left"]),
        torch.cat(parts["middle"]),
        torch.cat(parts["right"]),
        gap,
        torch.tensor(centre, dtype=torch.float32).expand(len(gap), 2).clone(),
        f"phantom {seed}",
    )


@torch.no_grad()
def with_flow(triplets: Triplets, chunk=32, correction=None) -> dict:
    """Compute the flow conditioning of every triplet once (float16 to halve the memory), on
    whole slices, through the frozen flow-correction head ``correction`` if one is given."""
    conditioning = []
    for start in range(0, len(triplets.gap_mm), chunk):
        sl = slice(start, start + chunk)
        planes = flow_conditioning(triplets.left[sl], triplets.right[sl])
        if correction is not None:
            planes = correction(planes, triplets.gap_mm[sl])
        conditioning.append(planes.half())
    return {
        "neighbours": torch.cat(conditioning),
        "image": triplets.middle.half(),
        "gap_mm": triplets.gap_mm,
        "centre": triplets.centre,
    }


def collect(parts: list[Triplets], correction=None) -> dict:
    """Flow conditioning (through ``correction``, see :func:`with_flow`) for a list of sources,
    concatenated (sources must share a slice size; others are centre-cropped or padded to the
    first's)."""
    parts = [p for p in parts if p is not None]
    size = parts[0].middle.shape[-2:]
    computed = []
    for part in parts:
        logger.info("flow for %d triplets of %s", len(part.gap_mm), part.name)
        item = with_flow(part, correction=correction)
        if item["image"].shape[-2:] != size:
            item = _fit(item, size)
        computed.append(item)
    return {key: torch.cat([c[key] for c in computed]) for key in computed[0]}


def _fit(item, size):
    """Centre-crop or zero-pad the planes of ``item`` to ``size`` (moving the LV centre along)."""
    h, w = item["image"].shape[-2:]
    out = dict(item)
    dy, dx = (size[0] - h) // 2, (size[1] - w) // 2
    for key in ("neighbours", "image"):
        planes = item[key]
        canvas = planes.new_zeros((*planes.shape[:-2], *size))
        src = planes[..., max(0, -dy) : max(0, -dy) + min(h, size[0]), max(0, -dx) : max(0, -dx) + min(w, size[1])]
        canvas[..., max(0, dy) : max(0, dy) + src.shape[-2], max(0, dx) : max(0, dx) + src.shape[-1]] = src
        out[key] = canvas
    out["centre"] = item["centre"] + torch.tensor([dy, dx], dtype=torch.float32)
    return out


def crop_origin(centre, size, shape):
    """The first row and column of a ``size`` crop centred on ``centre`` (pixels), moved inside an
    image of ``shape`` (rows, columns)."""
    return tuple(int(np.clip(round(c - n / 2), 0, max(0, m - n))) for c, n, m in zip(centre, size, shape))


class FlowTriplets(Dataset):
    """Items cropped to ``size`` around the LV centre: jittered by up to ``jitter`` pixels and
    randomly flipped, turned and swapped (neighbours exchanged: the warped pair swaps, the
    midpoint and its weight do not) when ``augment``; fixed otherwise."""

    def __init__(self, data: dict, size=(128, 128), augment=True, jitter=24, seed=0):
        self.data, self.size, self.augment, self.jitter = data, tuple(size), augment, jitter
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.data["gap_mm"])

    def __getitem__(self, i):
        planes = torch.cat([self.data["neighbours"][i], self.data["image"][i]]).float()  # 5, X, Y
        cx, cy = self.data["centre"][i].tolist()
        if self.augment:
            cx, cy = cx + self.rng.integers(-self.jitter, self.jitter + 1), cy + self.rng.integers(
                -self.jitter, self.jitter + 1
            )
        x0, y0 = crop_origin((cx, cy), self.size, planes.shape[1:])
        crop = planes[:, x0 : x0 + self.size[0], y0 : y0 + self.size[1]]
        if self.augment:
            if self.rng.random() < 0.5:
                crop = crop.flip(1)
            if self.rng.random() < 0.5:
                crop = crop.flip(2)
            if self.size[0] == self.size[1]:
                crop = torch.rot90(crop, int(self.rng.integers(4)), (1, 2))
            if self.rng.random() < 0.5:
                crop = crop[[1, 0, 2, 3, 4]]
        crop = crop.contiguous()
        return {
            "neighbours": crop[:4],
            "base": crop[2:3],
            "image": crop[4:],
            "gap_mm": self.data["gap_mm"][i].float(),
        }


def flow_datasets(train_parts, val_parts, size=(128, 128), seed=0, max_val=64, correction=None):
    """The training dataset (augmented) and a fixed, evenly spread validation subset; with a
    flow-correction head ``correction``, both condition on its output."""
    from torch.utils.data import Subset

    train = FlowTriplets(collect(train_parts, correction), size=size, augment=True, seed=seed)
    full_val = FlowTriplets(collect(val_parts, correction), size=size, augment=False)
    val = Subset(full_val, evenly_spread(len(full_val), max_val))
    return train, val
