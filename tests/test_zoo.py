"""Model-zoo readiness, offline: the zoo's checks, the zip, and loading it the way users do."""

import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT

from bundle.package import BUNDLE_NAME, md5, package, read_large_files, zoo_checks

SCHEMA = ROOT.parent / "shared" / "model-zoo" / "meta_schema_20240725.json"


def test_large_files_hashes_match_the_shipped_weights():
    entries = read_large_files(ROOT)
    assert [e["path"] for e in entries] == ["models/model.pt"]
    for entry in entries:
        assert entry["hash_type"] == "md5" and md5(ROOT / entry["path"]) == entry["hash_val"]


def test_metadata_data_formats_match_the_networks():
    """Every <net>_data_format block validates against the zoo schema's network_io and
    describes what the shipped networks really take and return."""
    import jsonschema

    from bundle.weights import load_model

    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    if SCHEMA.exists():
        schema = json.loads(SCHEMA.read_text())
        io_schema = {**schema["$defs"]["network_io"], "$defs": schema["$defs"]}
        for key in ("network_data_format", "autoencoder_data_format", "diffusion_data_format"):
            jsonschema.validate(meta[key], io_schema)
    model = load_model(ROOT / "models")
    size = model.size_multiple * 2  # "16*n" with n = 2 for the cpu preset
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [f"{model.size_multiple}*n"] * 2
    ae, ldm = meta["autoencoder_data_format"], meta["diffusion_data_format"]
    with torch.no_grad():
        image = torch.rand(1, ae["inputs"]["image"]["num_channels"], size, size)
        recon, mu, _ = model.network.autoencoder(image)
        assert recon.shape[1] == ae["outputs"]["reconstruction"]["num_channels"] and recon.shape[2:] == image.shape[2:]
        assert mu.shape[1] == ae["outputs"]["latent"]["num_channels"] and mu.shape[2] == size // 4
        neighbours = torch.rand(1, ldm["inputs"]["neighbours"]["num_channels"], size, size)
        latent = torch.randn(1, ldm["inputs"]["latent"]["num_channels"], size // 4, size // 4)
        latents = torch.randn(1, ldm["inputs"]["latents"]["num_channels"], size // 4, size // 4)
        out = model.network.denoiser(latent, torch.tensor([500]), neighbours, latents=latents)
        assert out.shape == (1, ldm["outputs"]["pred"]["num_channels"], size // 4, size // 4)


@pytest.fixture(scope="module")
def zoo_zip(tmp_path_factory):
    out, report = package(tmp_path_factory.mktemp("zoo"))
    return out, report


def test_package_builds_the_zoo_zip(zoo_zip, tmp_path):
    out, report = zoo_zip
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert out.name == f"{BUNDLE_NAME}_v{meta['version']}.zip"
    assert set(report["checks"].values()) == {"ok"}
    names = zipfile.ZipFile(out).namelist()
    assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
    for required in ("configs/metadata.json", "configs/inference.json", "LICENSE", "models/model.pt", "bundle/cli.py"):
        assert f"{BUNDLE_NAME}/{required}" in names
    assert not any("__pycache__" in n or n.startswith(f"{BUNDLE_NAME}/tests/") for n in names)
    assert not any("/logs/" in n for n in names)  # a local MONAI Label server's log stays out
    with pytest.raises(Exception, match="exists"):  # never overwritten silently
        package(out.parent)


def test_package_refuses_a_bundle_that_fails_the_checks(tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(ROOT / "configs", broken / "configs")
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    checks = zoo_checks(broken)
    assert checks["required files"] == "missing LICENSE, models/model.pt"
    assert "9.9.9" in checks["version in changelog"]
    with pytest.raises(Exception, match="fails the zoo's checks"):
        package(tmp_path / "out", root=broken)


LOAD_SCRIPT = """
import json, sys, torch, monai.bundle
from pathlib import Path
name, bundle_dir, zip_path = sys.argv[1:4]
monai.bundle.download(name, url="file://" + zip_path, bundle_dir=bundle_dir, progress=False)
# as on a machine without this checkout: no editable install, and another project's `bundle`
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
decoy = Path(bundle_dir) / "decoy"
(decoy / "bundle").mkdir(parents=True)
(decoy / "bundle" / "__init__.py").write_text("raise ImportError('the decoy was imported')")
sys.path.append(str(decoy))
sys.path.insert(0, str(Path(bundle_dir) / name))  # the configs import the bundle's own package
import bundle
net = monai.bundle.load(name, bundle_dir=bundle_dir, workflow_type="inference", device="cpu").eval()
torch.manual_seed(0)
meta = json.loads((Path(bundle_dir) / name / "configs" / "metadata.json").read_text())
neighbours = torch.rand(2, meta["network_data_format"]["inputs"]["image"]["num_channels"], 32, 32)
z = torch.randn(2, 4, 8, 8)
with torch.no_grad():
    pred = net(neighbours, num_steps=1, z_start=z)
torch.save({"pred": pred, "neighbours": neighbours, "z": z}, Path(bundle_dir) / "pred.pt")
print(json.dumps({"bundle_package": bundle.__file__, "type": type(net).__name__}))
"""


def test_download_and_load_like_a_zoo_user(zoo_zip, tmp_path):
    """monai.bundle.download(url=file://...) then monai.bundle.load(workflow_type="inference"),
    in a fresh process without this checkout's editable install and with another project's
    `bundle` package on sys.path: the bundle folder goes first on sys.path (as for any zoo
    bundle with code, and as `monai.bundle run` does itself), and its own package is used."""
    from bundle.weights import load_model

    out, _ = zoo_zip
    bundle_dir = tmp_path / "zoo"
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, BUNDLE_NAME, str(bundle_dir), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["type"] == "CaLIDNetwork"
    assert info["bundle_package"].startswith(str(bundle_dir / BUNDLE_NAME))
    saved = torch.load(bundle_dir / "pred.pt", weights_only=True)
    model = load_model(ROOT / "models")  # the same weights through the bundle's own loader
    sampler = model.sampler(1)
    expected = sampler(saved["neighbours"], z_start=saved["z"])
    assert saved["pred"].shape == (2, 1, 32, 32)
    torch.testing.assert_close(saved["pred"], expected, rtol=0, atol=0)  # same weights, same code: exact


def test_zoo_checks_on_the_unpacked_bundle(zoo_zip, tmp_path, phantom_dir):
    """Required files, version, metadata schema, workflow properties, and the inference and
    training workflows run end to end on tiny synthetic NIfTI data (the zoo's unit-test pattern)."""
    from monai.bundle import ConfigWorkflow, verify_metadata

    from bundle.io import read_sax

    out, _ = zoo_zip
    zipfile.ZipFile(out).extractall(tmp_path)
    root = tmp_path / BUNDLE_NAME
    assert set(zoo_checks(root).values()) == {"ok"}
    if SCHEMA.exists():
        shutil.copy(SCHEMA, tmp_path / "schema.json")
        verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(tmp_path / "schema.json"))
    configs = root / "configs"
    meta = str(configs / "metadata.json")
    inference = ConfigWorkflow(
        config_file=str(configs / "inference.json"), meta_file=meta, workflow_type="inference", bundle_root=str(root)
    )
    inference.initialize()
    assert inference.check_properties() == []
    study = sorted(p for p in phantom_dir.glob("phantom_???.nii.gz"))[0]
    output = tmp_path / "dense.nii.gz"
    run = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        meta_file=meta,
        workflow_type="inference",
        bundle_root=str(root),
        input_path=str(study),
        output_path=str(output),
        factor=2,
        device="cpu",
    )
    run.initialize()
    run.run()
    dense, sparse = read_sax(output), read_sax(study)
    assert dense.shape[2] == 2 * sparse.shape[2] - 1
    np.testing.assert_allclose(dense.array[:, :, ::2], sparse.array, atol=1e-3)  # acquired slices kept
    np.testing.assert_allclose(dense.affine[:3, 2] * 2, sparse.affine[:3, 2], atol=1e-6)

    ae_out = tmp_path / "ae"
    common = dict(meta_file=meta, workflow_type="train", bundle_root=str(root), dataset_dir=str(phantom_dir))
    smoke = ConfigWorkflow(
        config_file=str(configs / "train_autoencoder.json"),
        output_dir=str(ae_out),
        preset="tiny",
        max_epochs=1,
        **common,
    )
    smoke.initialize()
    assert smoke.check_properties() == []
    smoke.run()
    smoke.finalize()
    assert (ae_out / "autoencoder.pt").is_file()
    diffusion = ConfigWorkflow(
        config_file=[str(configs / "train_autoencoder.json"), str(configs / "train_diffusion.json")],
        autoencoder_dir=str(ae_out),
        output_dir=str(tmp_path / "ldm"),
        preset="tiny",
        **common,
    )
    diffusion.initialize()
    assert diffusion.check_properties() == []


def test_the_zoo_ci_verifies_the_network_input_and_output():
    """The model zoo's CI runs `verify_net_in_out network_def`: the input must be named `image`."""
    import os

    command = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
    command += ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "verified with no error" in done.stdout + done.stderr, done.stderr[-2000:]


def test_the_version_is_written_once():
    """configs/metadata.json holds the version; setup.cfg repeats it (checked here) and the MONAI
    Label app reads it from there."""
    import configparser

    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == meta["version"] and meta["version"] in meta["changelog"]
    app = (ROOT / "monailabel" / "apps" / "calid" / "main.py").read_text()
    assert 'version=json.loads(Path(BUNDLE_ROOT, "configs", "metadata.json")' in app
