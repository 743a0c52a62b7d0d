"""Downstream segmentation check: contours placed on the right images, a segmenter that learns."""

import numpy as np
import pytest
import torch

from bundle.downstream import contour_labels, segment, segmentation_scores, train_segmenter
from bundle.io import read_sax


def test_sunnybrook_contours_land_on_their_images(sunnybrook):
    study = sunnybrook / "SCD0000401"
    stack = read_sax(study / "dicom")
    labels = contour_labels(study, stack)
    assert len(labels) == 18  # one per endocardial contour file
    full = [key for key, (_, drawn) in labels.items() if drawn == (1, 2)]
    assert len(full) == len(list((study / "contours" / "o-contours").glob("*.txt")))
    assert len({t for _, t in labels}) == 2  # end-diastole and end-systole
    for label, drawn in labels.values():
        cavity_mm2 = (label == 1).sum() * np.prod(stack.pixel_spacing)
        assert 100 < cavity_mm2 < 15000  # a dilated LV, never a whole image or a speck
        if drawn == (1, 2):  # the myocardium surrounds the cavity: its centre lies inside the ring's box
            ring = np.argwhere(label == 2)
            centre = np.argwhere(label == 1).mean(0)
            assert np.all(ring.min(0) < centre) and np.all(centre < ring.max(0))


def test_segmenter_learns_the_phantom_ventricle():
    from bundle.phantom import make_subject

    def examples(seed):
        s = make_subject(seed=seed, size=64, num_slices=5, num_phases=2, pixel_spacing=2.0)
        factor = (s.labels.shape[2] - 1) // (s.sparse.shape[2] - 1)
        labels = s.labels.array[:, :, ::factor].transpose(2, 3, 0, 1).reshape(-1, 64, 64)
        images = s.sparse.array.transpose(2, 3, 0, 1).reshape(-1, 64, 64)
        labels = np.where(labels == 3, 0, labels)  # no RV class
        keep = (labels == 1).reshape(len(labels), -1).any(1)
        scale = np.percentile(images, 99.5)
        return torch.from_numpy(images[keep] / scale).float()[:, None], torch.from_numpy(labels[keep]).long()[:, None]

    images, targets = examples(1)
    net = train_segmenter(images, targets, iterations=400, batch_size=4, channels=(8, 16, 32))
    test_images, test_targets = examples(2)  # another subject
    pred, truth = segment(net, test_images[:, 0]), test_targets[:, 0]
    dice = [float(2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum())) for c in (1, 2)]
    assert dice[0] > 0.5 and dice[1] > 0.7  # the phantom's cavity is small: a few dozen pixels


def test_scores_of_a_perfect_segmentation():
    from bundle.stack import SaxStack

    label = np.zeros((32, 32), np.uint8)
    label[8:24, 8:24] = 2
    label[12:20, 12:20] = 1
    stack = SaxStack(np.repeat(label[:, :, None, None], 3, 2).astype(float), np.eye(4))

    class Oracle(torch.nn.Module):  # segments by intensity: the image is the label map
        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0] * 2).round().long().clamp(0, 2), 3).permute(0, 3, 1, 2).float()

    labels = {(1, 0): (label, (1, 2))}
    scores = segmentation_scores(Oracle(), stack, labels, {"exact": {(1, 0): label.astype(float)}}, (1.0, 1.0))
    assert scores["exact"]["lv_cavity"] == {"dice": pytest.approx(1.0), "asd_mm": 0.0, "n": 1, "failed": 0}
    assert scores["exact"]["lv_myocardium"]["dice"] == pytest.approx(1.0)
