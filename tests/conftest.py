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
