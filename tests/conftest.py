import os

# Two torch processes on two cores oversubscribe threads badly; keep each test process lean.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUNNYBROOK = ROOT.parent / "shared" / "data" / "sunnybrook-scd"


@pytest.fixture(scope="session")
def sunnybrook():
    if not (SUNNYBROOK / "SCD0000401" / "dicom").is_dir():
        pytest.skip(f"Sunnybrook data not found at {SUNNYBROOK} (../shared/data/sunnybrook-scd from the repository)")
    return SUNNYBROOK


@pytest.fixture(scope="session")
def phantom_subject():
    from bundle.phantom import make_subject

    return make_subject(seed=3, size=48, num_slices=6, num_phases=3, pixel_spacing=3.0)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    from bundle.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(
        out, subjects=3, seed=1, progress=False, size=32, num_slices=5, num_phases=3, pixel_spacing=4.0
    )
    return out


def write_tiny_weights(folder, spatial_dims=2, seed=0, prediction="epsilon", perturb=True):
    """Randomly initialised tiny-preset weights in the layout training exports (and models/
    ships): model.pt + model.json. The denoiser's zero-initialised convs are perturbed so that
    the conditioning and the noise prediction are not identically zero."""
    import tempfile

    import torch

    from bundle.networks import build_networks, preset
    from bundle.weights import ModelInfo, export_model, save_weights

    torch.manual_seed(seed)
    net = preset("tiny")
    vae, denoiser = build_networks(spatial_dims, net)
    with torch.no_grad():
        for p in denoiser.parameters():
            if perturb and p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(std=0.05)
    info = ModelInfo("autoencoder", spatial_dims, net, preset="tiny", trained_on=["synthetic"])
    with tempfile.TemporaryDirectory() as run:
        save_weights(vae, Path(run) / "autoencoder.pt", info)
        save_weights(
            denoiser,
            Path(run) / "diffusion.pt",
            info.updated(stage="diffusion", latent_scale=1.5, prediction=prediction),
        )
        return export_model(Path(run) / "autoencoder.pt", Path(run) / "diffusion.pt", folder, half=False)


@pytest.fixture(scope="session")
def tiny_weights_2d(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("weights2d"), spatial_dims=2)


@pytest.fixture(scope="session")
def tiny_weights_2dt(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("weights2dt"), spatial_dims=3)


def write_contoured_study(folder, subject, contoured_phases=(0, 1)):
    """A Sunnybrook-like study folder (dicom/ + contours/) from a phantom subject: the sparse
    stack as an axial DICOM series, and endocardial/epicardial contours traced on the labels
    of ``contoured_phases`` (the epicardium on the first of them only, as in Sunnybrook)."""
    import numpy as np
    from dicom_factory import write_series
    from skimage.measure import find_contours

    folder = Path(folder)
    sparse = subject.sparse
    factor = (subject.labels.shape[2] - 1) // (sparse.shape[2] - 1)
    labels = subject.labels.array[:, :, ::factor]
    x, y, slices, phases = sparse.shape
    scale = 1000.0 / max(float(sparse.array.max()), 1e-6)
    written = write_series(
        folder / "dicom",
        rows=y,
        cols=x,
        slices=slices,
        phases=phases,
        gap=sparse.slice_spacing,
        pixel_spacing=tuple(sparse.pixel_spacing[::-1]),
        orient=np.eye(3),
        pixels=lambda k, t: (sparse.array[:, :, k, t].T * scale).round(),
    )
    for path, k, t, _ in written:
        if t not in contoured_phases:
            continue
        number = int(path.stem[3:]) + 1  # the factory's InstanceNumber
        kinds = {"i": labels[:, :, k, t] == 1}
        if t == contoured_phases[0]:
            kinds["o"] = np.isin(labels[:, :, k, t], (1, 2))
        for kind, mask in kinds.items():
            if mask.sum() < 4:
                continue
            outline = max(find_contours(mask.astype(float), 0.5), key=len)  # (x, y) points
            out = folder / "contours" / f"{kind}-contours" / f"IM-0001-{number:04d}-{kind}contour-manual.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(out, outline, fmt="%.2f")
    return folder
