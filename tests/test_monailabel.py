"""MONAI Label integration: start the app's server on 127.0.0.1, send one study through
/infer/calid_upsample, check the returned NIfTI's shape and affine, stop the server.

Needs the MONAI Label environment (`bash monailabel/setup_env.sh`, about 6 minutes; tests/run.sh
creates it unless CALID_SKIP_MONAILABEL=1); skipped, saying so, where it is absent."""

import json
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT

from bundle.io import read_sax

VENV = ROOT / ".venv-monailabel"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_multipart(url, fields, timeout):
    boundary = "calidboundary"
    body = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()
    )
    body = (body + f"--{boundary}--\r\n").encode()
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="no MONAI Label environment (.venv-monailabel)")
def test_server_returns_the_dense_volume_with_its_geometry(phantom_dir, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    source = sorted(phantom_dir.glob("phantom_???.nii.gz"))[0]
    (studies / "study01.nii.gz").write_bytes(source.read_bytes())
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        ["bash", str(ROOT / "monailabel" / "start_server.sh"), str(studies), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                info = json.loads(urllib.request.urlopen(f"{base}/info/", timeout=5).read())
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.time() < deadline, "server did not start in 180 s"
                time.sleep(1)
        assert info["models"]["calid_upsample"]["config"] == {  # the bundle's own names and defaults
            "factor": 4,
            "method": "calid",
            "phase_fusion": 0.15,
            "steps": None,
            "refine": False,
            "adapt": 0,
            "seed": 0,
            "precision": "auto",
            "chunk_size": None,
        }
        params = json.dumps({"factor": 2, "refine": False})
        data = _post_multipart(f"{base}/infer/calid_upsample?image=study01&output=image", {"params": params}, 600)
        (tmp_path / "dense.nii.gz").write_bytes(data)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    dense, sparse = read_sax(tmp_path / "dense.nii.gz"), read_sax(source)
    assert dense.shape == (sparse.shape[0], sparse.shape[1], 2 * sparse.shape[2] - 1, sparse.shape[3])
    np.testing.assert_allclose(dense.affine[:3, 2] * 2, sparse.affine[:3, 2], atol=1e-5)  # half the slice step
    np.testing.assert_allclose(dense.affine[:3, [0, 1, 3]], sparse.affine[:3, [0, 1, 3]], atol=1e-5)
    np.testing.assert_allclose(dense.array[:, :, ::2], sparse.array, atol=1e-3)  # acquired slices kept
