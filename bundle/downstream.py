"""Downstream check, as the paper's table II: would a segmentation network see the same left
ventricle in a generated slice as in the acquired one?

A small MONAI 2D U-Net (background, LV cavity, LV myocardium) is trained on the expert contours
of the training studies (Sunnybrook: endocardium at end-diastole and end-systole, epicardium at
end-diastole). On every leave-one-out slice that has an expert contour, the segmentation of the
acquired slice (the upper bound) and of each method's prediction is compared with the contour:
Dice and average surface distance (mm), per class where that class was drawn.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .stack import SaxStack
from .transforms import IntensityScaler

logger = logging.getLogger(__name__)

CLASSES = {1: "lv_cavity", 2: "lv_myocardium"}
CROP = 128  # pixels around the LV centre (about 170 mm at Sunnybrook's 1.3 mm pixels)


def contour_labels(study_dir, stack: SaxStack):
    """{(slice, phase): (labels (X, Y) uint8, drawn classes)} from a Sunnybrook ``contours/``
    folder, placed through the DICOM InstanceNumbers that :func:`bundle.io.read_sax` records."""
    from skimage.draw import polygon

    where = {n: (k, t) for k, row in enumerate(stack.meta.get("instance_numbers", [])) for t, n in enumerate(row)}
    found = {}
    for kind in ("i", "o"):
        for path in sorted(Path(study_dir).glob(f"contours/{kind}-contours/IM-*-*-{kind}contour-manual.txt")):
            number = int(path.name.split("-")[2])
            if number not in where:
                logger.warning("contour %s names InstanceNumber %d, which is not in the stack", path.name, number)
                continue
            points = np.loadtxt(path, ndmin=2)  # (column, row) = (x, y)
            mask = np.zeros(stack.shape[:2], dtype=bool)
            mask[polygon(points[:, 0], points[:, 1], shape=mask.shape)] = True
            found.setdefault(where[number], {})[kind] = mask
    labels = {}
    for key, masks in found.items():
        if "i" not in masks:  # an epicardium alone names no class we can score
            continue
        label = np.zeros(stack.shape[:2], dtype=np.uint8)
        drawn = (1,)
        if "o" in masks:
            label[masks["o"]] = 2
            drawn = (1, 2)
        label[masks["i"]] = 1
        labels[key] = (label, drawn)
    return labels


def lv_crop_box(labels, shape, size=CROP):
    """(x0, y0) of a ``size`` square around the mean centre of the cavity contours."""
    centre = np.mean([np.argwhere(lab == 1).mean(0) for lab, _ in labels.values()], axis=0)
    return tuple(int(np.clip(round(c) - size // 2, 0, max(0, s - size))) for c, s in zip(centre, shape))


def _crop(image, box, size=CROP):
    x0, y0 = box
    return image[..., x0 : x0 + size, y0 : y0 + size]


def build_segmenter(channels=(16, 32, 64, 128)):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=channels, strides=(2,) * (len(channels) - 1))


def segmentation_examples(studies):
    """Fully annotated (cavity and myocardium) slices of ``[(study_dir, SaxStack)]`` as scaled
    crops (N, 1, CROP, CROP) and labels (N, 1, CROP, CROP)."""
    images, targets = [], []
    for study_dir, stack in studies:
        labels = contour_labels(study_dir, stack)
        if not labels:
            logger.warning("no contours in %s: not used to train the segmenter", study_dir)
            continue
        scaler = IntensityScaler.fit(stack.array)
        box = lv_crop_box(labels, stack.shape[:2])
        for (k, t), (label, drawn) in labels.items():
            if drawn == (1, 2):
                images.append(_crop(scaler(stack.array[:, :, k, t]), box))
                targets.append(_crop(label, box))
    if not images:
        raise ValueError("no fully annotated slices (endocardium and epicardium) to train the segmenter on")
    return (
        torch.from_numpy(np.stack(images)[:, None]).float(),
        torch.from_numpy(np.stack(targets)[:, None]).long(),
    )


def train_segmenter(images, targets, iterations=600, batch_size=8, seed=0, device="cpu", channels=(16, 32, 64, 128)):
    """Dice + cross-entropy with flips, quarter turns and intensity jitter; returns the network (eval)."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = build_segmenter(channels).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    for _ in range(int(iterations)):
        pick = torch.randint(0, len(images), (batch_size,), generator=generator)
        x, y = images[pick].clone(), targets[pick].clone()
        turns = int(torch.randint(0, 4, (1,), generator=generator))
        x, y = torch.rot90(x, turns, (2, 3)), torch.rot90(y, turns, (2, 3))
        if torch.rand(1, generator=generator) < 0.5:
            x, y = x.flip(2), y.flip(2)
        x = x * (0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, generator=generator))
        optimizer.zero_grad()
        loss = loss_fn(net(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
    logger.info("segmenter: %d iterations on %d slices, last loss %.4f", iterations, len(images), loss.item())
    return net.eval()


@torch.no_grad()
def segment(net, images, device="cpu"):
    """(N, X, Y) scaled crops -> (N, X, Y) labels."""
    return net(torch.as_tensor(images, dtype=torch.float32)[:, None].to(device)).argmax(1).cpu()


def segmentation_scores(net, stack, labels, slices_by_method: dict, spacing, device="cpu"):
    """Dice and ASD per class for each method's slices against the contours.

    ``slices_by_method``: name -> {(slice, phase): image (X, Y) in scanner intensities}; only
    keys with a contour are scored. Returns name -> {class: {dice, asd_mm, n, failed}}.
    """
    from monai.metrics import compute_average_surface_distance, compute_dice
    from monai.networks.utils import one_hot

    scaler = IntensityScaler.fit(stack.array)
    box = lv_crop_box(labels, stack.shape[:2])
    result = {}
    for name, slices in slices_by_method.items():
        keys = [key for key in slices if key in labels]
        if not keys:
            continue
        pred = segment(net, np.stack([_crop(scaler(slices[key]), box) for key in keys]), device)
        truth = torch.from_numpy(np.stack([_crop(labels[key][0], box) for key in keys])).long()
        p1, t1 = one_hot(pred[:, None], 3), one_hot(truth[:, None], 3)
        dice = compute_dice(p1, t1, include_background=False, ignore_empty=True)
        asd = compute_average_surface_distance(p1, t1, include_background=False, symmetric=True, spacing=spacing)
        result[name] = {}
        for c, cname in CLASSES.items():
            drawn = torch.tensor([c in labels[key][1] for key in keys])
            d, a = dice[drawn, c - 1], asd[drawn, c - 1]
            ok = torch.isfinite(a)
            result[name][cname] = {
                "dice": float(d.nanmean()) if drawn.any() else None,
                "asd_mm": float(a[ok].mean()) if ok.any() else None,
                "n": int(drawn.sum()),
                "failed": int((~ok).sum()),  # an empty segmentation has no surface distance
            }
    return result
