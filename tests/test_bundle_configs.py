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
