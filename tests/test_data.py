"""Neighbour-triplet datasets: shapes, the middle slice between its neighbours, seeds, splits."""

import json

import numpy as np
import pytest
import torch

from bundle.data import load_volumes, triplet_dataset
from bundle.studies import list_studies, load_datalist, split_studies, study_name


def index_volume(z=7, t=3, x=6, y=5):
    """Slice n holds the value n everywhere: a triplet's values reveal its slice indices."""
    return torch.arange(z, dtype=torch.float32)[:, None, None, None].expand(z, t, x, y).contiguous()


@pytest.mark.parametrize("temporal", [False, True])
def test_middle_slice_between_its_neighbours(temporal):
    ds = triplet_dataset([index_volume()], [8.0], gaps=(1, 2), temporal=temporal, seed=0)
    assert len(ds) == ((7 - 2) + (7 - 4)) * (1 if temporal else 3)
    for i in range(len(ds)):
        item = ds[i]
        spatial = (6, 5, 3) if temporal else (6, 5)
        assert item["image"].shape == (1, *spatial)
        assert item["neighbours"].shape == (2, *spatial)
        n, g = item["slice"], item["gap"]
        assert float(item["image"].mean()) == n
        assert sorted(float(v.mean()) for v in item["neighbours"]) == [n - g, n + g]
        assert item["gap_mm"] == 8.0 * g


def test_real_anatomy_middle_is_closer_to_truth_than_far_slices(phantom_subject):
    from bundle.transforms import IntensityScaler

    truth = phantom_subject.truth.array.astype(np.float32)
    vol = torch.from_numpy(IntensityScaler.fit(truth)(truth).transpose(2, 3, 0, 1).copy())
    ds = triplet_dataset([vol], [1.0], gaps=(4,), augment=False)
    item = ds[len(ds) // 2]
    middle = item["image"][0]
    blend = item["neighbours"].mean(0)
    far = vol[item["slice"] + 12, item["phase"]]
    assert torch.mean((blend - middle) ** 2) < torch.mean((far - middle) ** 2)


def test_seeded_augmentation_is_deterministic():
    rng = torch.Generator().manual_seed(0)
    vol = torch.rand(6, 2, 8, 8, generator=rng)
    a = [triplet_dataset([vol], [8.0], seed=1)[i]["neighbours"] for i in range(8)]
    b = [triplet_dataset([vol], [8.0], seed=1)[i]["neighbours"] for i in range(8)]
    c = [triplet_dataset([vol], [8.0], seed=2)[i]["neighbours"] for i in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_spatial_size_pads_and_crops():
    ds = triplet_dataset([torch.rand(5, 2, 10, 7)], [8.0], spatial_size=(8, 8), augment=False)
    assert ds[0]["image"].shape == (1, 8, 8)
    ds = triplet_dataset([torch.rand(5, 4, 10, 7)], [8.0], temporal=True, spatial_size=(8, 8), augment=False)
    assert ds[0]["neighbours"].shape == (2, 8, 8, 4)


def test_folder_datalist_and_patient_level_split(phantom_dir, tmp_path):
    studies = list_studies(phantom_dir)
    assert [study_name(s) for s in studies] == ["phantom_000", "phantom_001", "phantom_002"]
    train, val = split_studies(studies, val_fraction=0.34, seed=0)
    assert len(val) == 1 and not set(train) & set(val) and set(train) | set(val) == set(studies)
    train, val = split_studies(studies, val_names=["phantom_001"])
    assert [study_name(s) for s in val] == ["phantom_001"]
    datalist = tmp_path / "datalist.json"
    rel = [{"image": str(s.relative_to(tmp_path.parent)).replace("\\", "/")} for s in studies]
    datalist.write_text(json.dumps({"training": [{"image": "../" + r["image"]} for r in rel]}))
    assert load_datalist(datalist) == [s.resolve() for s in studies]
    volumes, spacings = load_volumes(studies[:1], model_spacing=8.0)
    assert volumes[0].shape == (5, 3, 16, 16)  # 32 px at 4 mm -> 16 px at 8 mm
    assert spacings[0] == pytest.approx(8.0)
