"""Every bad input is refused with a clear message, exit code 2, and nothing written."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_series

from bundle.cli import main


def run_cli(*args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def assert_refused(capsys, tmp_path, input_path, message, method_args=("--factor", "2")):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    code = run_cli("upsample", str(input_path), str(out_dir / "dense.nii.gz"), *method_args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert sorted(p for p in tmp_path.rglob("*")) == before, "nothing may be written on refusal"


def save_nifti(path, data, affine=np.diag([1.3, 1.3, 8.0, 1.0])):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)
    return path


def test_single_slice_nifti(tmp_path, capsys):
    path = save_nifti(tmp_path / "one.nii.gz", np.ones((8, 8, 1, 4)))
    assert_refused(capsys, tmp_path, path, "single 2D slice")


def test_two_d_nifti(tmp_path, capsys):
    path = save_nifti(tmp_path / "flat.nii.gz", np.ones((8, 8)))
    assert_refused(capsys, tmp_path, path, "single 2D slice")


def test_single_slice_dicom(tmp_path, capsys):
    write_series(tmp_path / "d", slices=1)
    assert_refused(capsys, tmp_path, tmp_path / "d", "at one slice position")


def test_non_finite_values(tmp_path, capsys):
    data = np.ones((8, 8, 3, 2))
    data[2, 3, 1, 1] = np.nan
    path = save_nifti(tmp_path / "nan.nii.gz", data)
    assert_refused(capsys, tmp_path, path, "non-finite intensity (NaN or inf) in the input, first at voxel")


def test_slices_not_parallel(tmp_path, capsys):
    write_series(tmp_path / "d", tilt=(2, np.radians(10)))
    assert_refused(capsys, tmp_path, tmp_path / "d", "slices are not parallel")


def test_missing_slice_is_uneven_spacing(tmp_path, capsys):
    write_series(tmp_path / "d", slices=6, drop=[(3, None)])
    assert_refused(
        capsys, tmp_path, tmp_path / "d", "uneven slice spacing: the gap between slice 2 and slice 3 is 16.00 mm"
    )


def test_different_phase_counts(tmp_path, capsys):
    write_series(tmp_path / "d", drop=[(1, 2)])
    assert_refused(capsys, tmp_path, tmp_path / "d", "slices have different numbers of phases")


def test_unreadable_dicom(tmp_path, capsys):
    write_series(tmp_path / "d")
    (tmp_path / "d" / "junk.dcm").write_bytes(b"this is not DICOM at all" * 10)
    assert_refused(capsys, tmp_path, tmp_path / "d", "junk.dcm")


def test_truncated_dicom(tmp_path, capsys):
    files = write_series(tmp_path / "d")
    path = files[4][0]
    content = path.read_bytes()
    path.write_bytes(content[: len(content) - 100])
    assert_refused(capsys, tmp_path, tmp_path / "d", path.name)


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_refused(capsys, tmp_path, tmp_path / "empty", "no DICOM files in")


def test_missing_input(tmp_path, capsys):
    assert_refused(capsys, tmp_path, tmp_path / "nowhere.nii.gz", "input not found")


def test_two_cine_series_listed(tmp_path, capsys):
    write_series(tmp_path / "d" / "a", series_number=5)
    write_series(tmp_path / "d" / "b", series_number=7)
    assert_refused(capsys, tmp_path, tmp_path / "d", "SeriesNumber=7")


def test_samples_need_the_learned_model(tmp_path, capsys):
    path = save_nifti(tmp_path / "ok.nii.gz", np.ones((8, 8, 3)))
    assert_refused(capsys, tmp_path, path, "samples is for method calid", ("--method", "linear", "--samples", "3"))


@pytest.mark.parametrize("factor", ["3", "6", "0", "-2", "1.5"])
def test_factor_not_power_of_two(tmp_path, capsys, factor):
    path = save_nifti(tmp_path / "ok.nii.gz", np.ones((8, 8, 3)))
    assert_refused(capsys, tmp_path, path, "factor must be a power of two", ("--factor", factor))


def test_refuses_existing_output_and_input_overwrite(tmp_path, capsys):
    path = save_nifti(tmp_path / "ok.nii.gz", np.ones((8, 8, 3)))
    existing = tmp_path / "exists.nii.gz"
    existing.write_bytes(b"keep me")
    assert run_cli("upsample", str(path), str(existing)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert run_cli("upsample", str(path), str(path), "--overwrite") == 2
    assert "over (or inside) the input" in capsys.readouterr().err
    assert nib.load(path).shape == (8, 8, 3)
    main(["upsample", str(path), str(existing), "--overwrite", "--method", "linear"])
    assert nib.load(existing).shape == (8, 8, 9)  # the default factor: 4


def test_cli_exit_code_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "bundle.cli", "upsample", str(tmp_path / "none.nii.gz"), str(tmp_path / "o.nii.gz")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "calid: error: input not found" in proc.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_misspelt_option_is_refused_before_anything_runs(tmp_path, capsys):
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    assert_refused(
        capsys, tmp_path, path, "calid upsample has no option --factr; its options: --input", ("--factr", "4")
    )


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "NO"])
def test_false_is_false(tmp_path, capsys, value):
    """`--overwrite false` must not overwrite; `--refine false` is no refine."""
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / "dense.nii.gz"
    existing.write_bytes(b"keep me")
    code = run_cli("upsample", str(path), str(existing), "--method", "linear", "--overwrite", value)
    assert code == 2 and "exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"


def test_flag_values_that_are_neither_true_nor_false_are_refused(tmp_path, capsys):
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    assert_refused(capsys, tmp_path, path, "overwrite must be true or false", ("--overwrite", "maybe"))


def test_bundle_override_false_is_false(tmp_path):
    from monai.bundle import ConfigWorkflow

    from bundle.options import as_flag

    assert [as_flag(v, "x") for v in ("true", "YES", "1", 1, True, "off", "0", 0, False)] == [True] * 5 + [False] * 4
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    existing = tmp_path / "dense.nii.gz"
    existing.write_bytes(b"keep me")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wf = ConfigWorkflow(
        config_file=os.path.join(root, "configs", "inference.json"),
        workflow_type=None,
        bundle_root=root,
        input_path=str(path),
        output_path=str(existing),
        method="linear",
        overwrite="false",
    )
    wf.initialize()
    with pytest.raises(Exception) as raised:
        wf.run()
    chain, error = [], raised.value
    while error is not None:  # MONAI wraps the refusal in a config-evaluation error
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("exists; pass --overwrite" in message for message in chain), chain
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "args,message",
    [
        (("--method", "calid", "--steps", "0"), "steps must be a whole number from 1 to 1000"),
        (("--method", "calid", "--steps", "-1"), "steps must be a whole number from 1 to 1000"),
        (("--method", "calid", "--steps", "5000"), "steps must be a whole number from 1 to 1000"),
        (("--method", "calid", "--chunk-size", "0"), "chunk size must be a whole number of at least 1"),
        (("--precision", "fp8"), "precision must be one of auto, fp32, bf16, fp16"),
        (("--device", "tpu9"), "unknown device 'tpu9'"),
        (("--factor", str(2**30)), "the output would take"),
    ],
)
def test_options_that_would_be_ignored_or_fail_late_are_refused_first(tmp_path, capsys, args, message):
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    assert_refused(capsys, tmp_path, path, message, args)


def test_output_paths_that_cannot_be_written_are_refused_before_work(tmp_path, capsys):
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    (tmp_path / "out" / "folder.nii.gz").mkdir(parents=True)
    assert run_cli("upsample", str(path), str(tmp_path / "out" / "folder.nii.gz")) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert run_cli("upsample", str(path), str(tmp_path / "blocker" / "o.nii.gz")) == 2
    assert "blocker is a file" in capsys.readouterr().err
    out = tmp_path / "fine.nii.gz"
    assert run_cli("upsample", str(path), str(out), "--preview", str(tmp_path / "blocker" / "p.png")) == 2
    assert "cannot write into" in capsys.readouterr().err and not out.exists()  # all or nothing
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert run_cli("upsample", str(path), str(locked / "o.nii.gz")) == 2
        assert "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda w: (w / "model.pt").write_bytes(b"not a torch file"), "cannot be read as weights"),
        (lambda w: (w / "model.json").write_text("{broken"), "is not valid JSON"),
        (
            lambda w: (w / "model.json").write_text(
                '{"latent_scale": 1.0, "spatial_dims": 2, "net": {}, "preset": "x"}'
            ),
            "names preset 'x', which does not exist",
        ),
    ],
    ids=["corrupt-weights", "malformed-json", "unknown-preset"],
)
def test_damaged_weights_are_refused_without_a_traceback(tmp_path, capsys, tiny_weights_2d, damage, message):
    import shutil

    weights = tmp_path / "w"
    shutil.copytree(tiny_weights_2d, weights)
    damage(weights)
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    assert (
        run_cli("upsample", str(path), str(tmp_path / "o.nii.gz"), "--method", "calid", "--weights", str(weights)) == 2
    )
    err = capsys.readouterr().err
    assert message in err and "weights_only=False" not in err and "Traceback" not in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_killed_writes_leftover_is_removed_by_the_next_run(tmp_path):
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    stale = tmp_path / ".dense.nii.gz.x1y2z3.part.nii.gz"  # what SIGKILL during the write leaves
    stale.write_bytes(b"half a file")
    other = tmp_path / ".other.nii.gz.x1y2z3.part.nii.gz"  # another output's: not ours to touch
    other.write_bytes(b"half a file")
    main(["upsample", str(path), str(tmp_path / "dense.nii.gz"), "--method", "linear"])
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.nii.gz.x1y2z3.part.nii.gz", "dense.nii.gz", "ok.nii.gz"]
    )


def test_values_that_do_not_fit_the_float32_output_are_refused(tmp_path, capsys):
    data = np.ones((8, 8, 3, 2))
    data[1, 1, 1, 0] = 1e39
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.3, 1.3, 8.0, 1.0])), path)  # float64 on disk
    assert_refused(capsys, tmp_path, path, "intensities up to 1e+39 do not fit the float32 output")


def test_help_lists_every_command_in_one_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("upsample ", "upsample-batch ", "convert ", "evaluate ", "phantom ", "package ", "benchmark "):
        assert f"\n  {command}" in out
    assert all(len(line) <= 120 for line in out.splitlines())


def test_short_options_are_refused_not_guessed(tmp_path, capsys):
    """fire would read `-o out.nii.gz` as --overwrite: refuse single-dash options outright."""
    path = save_nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).random((16, 16, 3, 2)))
    assert_refused(capsys, tmp_path, path, "short options such as -o are not supported", ("-o", "x.nii.gz"))


def test_attaching_a_flow_correction_head_refuses_what_it_cannot_use(tmp_path, capsys):
    import torch
    from conftest import write_tiny_weights

    from bundle.networks import FlowCorrection

    over_linear = write_tiny_weights(tmp_path / "linear", prediction="residual")
    torch.save(FlowCorrection().state_dict(), tmp_path / "head.pt")
    (tmp_path / "record.json").write_text("{not json")
    before = sorted(tmp_path.rglob("*"))
    cases = [
        ((over_linear, tmp_path / "head.pt"), "a flow-correction head needs a model over flow"),
        ((over_linear, tmp_path / "missing.pt"), "no head weights at"),
        ((over_linear, tmp_path / "head.pt", "--record", tmp_path / "record.json"), "cannot be read as JSON"),
    ]
    for (model, head, *record), message in cases:
        assert run_cli("attach-flow-correction", str(model), str(head), str(tmp_path / "out"), *map(str, record)) == 2
        assert message in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before, "nothing may be written on refusal"
