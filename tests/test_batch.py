"""Cohort upsampling: torchrun sharding, fault isolation, resume after SIGKILL, memory bound."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

from bundle.batch import distributed_batch
from bundle.cli import main
from bundle.studies import batch_inputs

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six phantom studies (with their truth and label files), one of them corrupt."""
    from bundle.phantom import write_phantom_dataset

    folder = tmp_path_factory.mktemp("cohort")
    write_phantom_dataset(
        folder, subjects=6, seed=4, progress=False, size=32, num_slices=4, num_phases=2, pixel_spacing=4.0
    )
    (folder / "phantom_003.nii.gz").write_bytes(b"not a nifti")
    return folder


def read_manifest(out_dir):
    (path,) = out_dir.glob("manifest-*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_inputs_skip_truth_and_labels(cohort, tmp_path):
    names = [p.name for p in batch_inputs(cohort)]
    assert names == [f"phantom_00{i}.nii.gz" for i in range(6)]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(cohort / "phantom_001.nii.gz")}]}))
    assert [p.name for p in batch_inputs(datalist)] == ["phantom_001.nii.gz"]


def test_torchrun_two_ranks_match_single_process(cohort, tmp_path, tiny_weights_2d):
    options = ["--factor", "2", "--method", "calid", "--weights", str(tiny_weights_2d), "--steps", "2"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    with pytest.raises(SystemExit) as exit_info:
        main(["upsample-batch", str(cohort), str(single), *options])
    assert exit_info.value.code == 1
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
        "-m", "bundle.cli", "upsample-batch", str(cohort), str(multi), *options,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=str(ROOT))
    assert proc.returncode != 0, "a failed study must make the run fail"
    for i in (0, 1, 2, 4, 5):
        name = f"phantom_00{i}_x2.nii.gz"
        np.testing.assert_array_equal(nib.load(single / name).get_fdata(), nib.load(multi / name).get_fdata())
    assert not (multi / "phantom_003_x2.nii.gz").exists()
    records = read_manifest(multi)
    assert sorted(r["status"] for r in records) == ["done"] * 5 + ["failed"]
    assert {r["rank"] for r in records} == {0, 1}
    assert all(
        r["shape"] == [32, 32, 7, 2] and r["spacing"] == [4.0, 4.0, 4.0] for r in records if r["status"] == "done"
    )
    (failures,) = multi.glob("failures-*.jsonl")
    (failed,) = [json.loads(line) for line in failures.read_text().splitlines()]
    assert failed["input"].endswith("phantom_003.nii.gz") and "cannot read NIfTI" in failed["error"]


def test_sigkill_then_rerun_resumes(cohort, tmp_path, tiny_weights_2d):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bundle.cli", "upsample-batch", str(cohort), str(out),
        "--factor", "8", "--method", "calid", "--weights", str(tiny_weights_2d), "--steps", "40",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=str(ROOT))
    try:
        deadline = time.time() + 120
        while not (out / "phantom_001_x8.nii.gz").exists() and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {p.name for p in out.glob("phantom_*_x8.nii.gz")}
    assert "phantom_000_x8.nii.gz" in finished and "phantom_005_x8.nii.gz" not in finished
    for name in finished:  # whatever exists is complete: atomic writes
        assert nib.load(out / name).shape == (32, 32, 25, 2)
    failed, counts = distributed_batch(cohort, out, factor=8, method="calid", weights=str(tiny_weights_2d), steps=40)
    assert failed == 1 and counts["skipped"] == len(finished) and counts["done"] == 5 - len(finished)
    assert sorted(p.name for p in out.glob("phantom_*_x8.nii.gz")) == [
        f"phantom_00{i}_x8.nii.gz" for i in (0, 1, 2, 4, 5)
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no partial file may be left behind"


def test_memory_budget_bounds_peak_memory(tmp_path):
    """x8 of 12 slices x 20 phases x 256x256: peak RSS of a process with and without a budget."""
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image((rng.random((256, 256, 12, 20)) * 1000).astype(np.int16), np.eye(4)), tmp_path / "big.nii")
    script = (
        "import resource, sys\n"
        "from bundle.pipeline import upsample_file\n"
        "budget = None if sys.argv[3] == 'none' else float(sys.argv[3])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "upsample_file(sys.argv[1], sys.argv[2], factor=8, method='linear', memory_budget_mb=budget, progress=False)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    growth = {}
    for budget in ("none", "200"):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "big.nii"), str(tmp_path / f"out_{budget}.nii"), budget],
            capture_output=True, text=True, env=ENV, cwd=str(ROOT), timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[budget] = float(proc.stdout.split()[-1])
    # measured here: 1531 MB more without a budget, 329 MB with 200 MB (the output, 467 MB as
    # float32, is then memory-mapped beside it)
    assert growth["200"] < 600 and growth["200"] < 0.4 * growth["none"], growth
    a, b = nib.load(tmp_path / "out_none.nii"), nib.load(tmp_path / "out_200.nii")
    assert a.shape == b.shape == (256, 256, 89, 20)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bundle_batch_config_fails_on_a_failed_study(cohort, tmp_path):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "batch_inference.json"),
        workflow_type=None,
        bundle_root=str(ROOT),
        source=str(cohort),
        output_dir=str(tmp_path),
        method="linear",
        factor=2,
    )
    wf.initialize()
    with pytest.raises(SystemExit, match="1 study failed"):
        wf.run()
    assert len(list(tmp_path.glob("phantom_*_x2.nii.gz"))) == 5


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "lineer"], "unknown method 'lineer'"),
        (["--step", "3"], "calid upsample-batch has no option --step"),
        (["--factor", "3"], "factor must be a power of two"),
        (["--method", "calid", "--weights", "/nowhere"], "no CaLID weights in /nowhere"),
        (["--weights", "/nowhere"], "no CaLID weights in /nowhere"),  # the default method is calid
        (["--method", "flow", "--weights", "models"], "weights is for method calid"),
    ],
)
def test_refuses_before_touching_any_study(cohort, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["upsample-batch", str(cohort), str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", [".", "out"])
def test_refuses_an_output_folder_inside_the_source(cohort, tmp_path, capsys, inside):
    before = sorted(p.name for p in cohort.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["upsample-batch", str(cohort), str(cohort / inside), "--method", "linear"])
    assert exit_info.value.code == 2 and "inside) the source folder" in capsys.readouterr().err
    assert sorted(p.name for p in cohort.rglob("*")) == before
