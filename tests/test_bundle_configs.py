"""The bundle's configs: metadata valid against the zoo schema, inference workflow runs."""

import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from bundle.io import read_sax

SCHEMA = ROOT.parent / "shared" / "model-zoo" / "meta_schema_20240725.json"


def test_metadata_valid_against_zoo_schema(tmp_path):
    if not SCHEMA.exists():
        pytest.skip(f"zoo schema not found at {SCHEMA}")
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(schema))


def test_inference_workflow_runs_on_the_shipped_example(tmp_path):
    from monai.bundle import ConfigWorkflow

    out = tmp_path / "x2.nii.gz"
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        workflow_type=None,
        bundle_root=str(ROOT),
        output_path=str(out),
        factor=2,
        method="linear",
    )
    workflow.initialize()
    workflow.run()
    dense = read_sax(out)
    example = read_sax(Path(ROOT / "docs" / "example" / "SCD0000301_heart.nii.gz"))
    assert dense.shape == (96, 96, 19, 10) and example.shape == (96, 96, 10, 10)


def _workflow(tmp_path, **override):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        workflow_type="inference",
        bundle_root=str(ROOT),
        output_path=str(tmp_path / "dense.nii.gz"),
        **override,
    )


def test_initialize_and_the_properties_run_nothing(tmp_path):
    """A MONAI workflow: its components are built on demand, the inference runs only in run()."""
    from monai.inferers import Inferer

    workflow = _workflow(tmp_path, factor=2)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.inferer, Inferer) and workflow.inferer.options.factor == 2
    assert not (tmp_path / "dense.nii.gz").exists()
    workflow.run()
    assert read_sax(tmp_path / "dense.nii.gz").shape[2] == 19


def test_calid_runs_the_network_def_with_the_weights_loaded(tmp_path, tiny_weights_2d):
    """network_def is the network the learned midpoints use, its weights loaded by initialize."""
    import torch

    from bundle.weights import load_model

    workflow = _workflow(tmp_path, factor=2, method="calid", weights=str(tiny_weights_2d), steps=1)
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    model = workflow.parser.get_parsed_content("model")
    assert model.network is network
    expected = load_model(tiny_weights_2d).network.state_dict()
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    workflow.run()
    assert read_sax(tmp_path / "dense.nii.gz").meta.get("descrip") is not None


def _bundle_run(tmp_path, *override, run_id=()):
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        *run_id,
        "--config_file",
        str(ROOT / "configs" / "inference.json"),
    ]
    command += ["--meta_file", str(ROOT / "configs" / "metadata.json"), "--bundle_root", str(ROOT)]
    command += ["--output_path", str(tmp_path / "dense.nii.gz"), *override]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize(
    "override,message",
    [
        (("--factor", "3"), "factor must be a power of two"),
        (("--method", "linear", "--steps", "4"), "steps is for method calid"),
        (("--overwrite", "maybe"), "overwrite must be true or false"),
        (("--input_path", "/nowhere/x.nii.gz"), "input not found"),
    ],
    ids=["factor", "model-option", "flag", "input"],
)
def test_a_refused_bundle_run_says_why_in_one_line(tmp_path, override, message):
    run = _bundle_run(tmp_path, *override)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("calid: error: ") and message in run.stderr
    assert not (tmp_path / "dense.nii.gz").exists()


def test_a_bundle_run_says_what_it_wrote(tmp_path):
    """As the README writes it: ``python -m monai.bundle run inference --config_file ...``."""
    run = _bundle_run(tmp_path, "--factor", "2", "--method", "linear", run_id=("inference",))
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {tmp_path / 'dense.nii.gz'} (linear, x2" in run.stdout


def test_one_option_list_for_cli_configs_batch_and_monailabel():
    """Same names and defaults everywhere: the configs list every option of UpsampleOptions
    with its default, the CLI commands take them as flags, MONAI Label offers a subset."""
    import inspect
    import json

    from bundle.cli import Commands
    from bundle.options import UpsampleOptions

    defaults = UpsampleOptions().as_dict()
    for name in ("inference.json", "batch_inference.json"):
        config = json.loads((ROOT / "configs" / name).read_text())
        assert {k: config[k] for k in defaults} == defaults, name
        assert config["options"] == {"_target_": "bundle.options.UpsampleOptions", **{k: f"@{k}" for k in defaults}}
    for command in (Commands.upsample, Commands.upsample_batch):
        parameters = inspect.signature(command).parameters
        assert {k: parameters[k].default for k in defaults} == defaults
    task = (ROOT / "monailabel" / "apps" / "calid" / "lib" / "upsample_task.py").read_text()
    assert "UpsampleOptions" in task and "DEFAULTS" not in task


def test_every_option_of_every_command_is_described():
    import inspect

    from fire import docstrings

    from bundle.cli import Commands

    for name, command in inspect.getmembers(Commands, inspect.isfunction):
        if name.startswith("_"):
            continue
        described = {a.name.lstrip("*") for a in docstrings.parse(command.__doc__).args or [] if a.description}
        missing = [p for p in inspect.signature(command).parameters if p != "self" and p not in described]
        assert not missing, (name, missing)
