"""Run by torchrun in test_training: the autoencoder stage with the multi-GPU configs (gloo on
CPU; a third argument is the time box in minutes), then each rank saves its network parameters
and iteration for comparison."""

import os
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

ROOT = Path(__file__).resolve().parents[1]

dataset_dir, output_dir = sys.argv[1], sys.argv[2]
max_minutes = sys.argv[3] if len(sys.argv) > 3 else None
configs = [str(ROOT / "configs" / f) for f in ("train_autoencoder.json", "multi_gpu_train.json")]
configs.append(str(ROOT / "configs" / "multi_gpu_train_autoencoder.json"))
wf = ConfigWorkflow(
    config_file=configs,
    meta_file=str(ROOT / "configs" / "metadata.json"),
    workflow_type=None,
    bundle_root=str(ROOT),
    preset="tiny",
    dataset_dir=dataset_dir,
    output_dir=output_dir,
    max_epochs=2,
    max_minutes=max_minutes,
)
wf.initialize()
wf.run()
network = wf.parser.get_parsed_content("network").module
trainer = wf.parser.get_parsed_content("trainer")
rank = int(os.environ["RANK"])
torch.save({"network": network.state_dict(), "iteration": trainer.state.iteration}, Path(output_dir) / f"rank{rank}.pt")
wf.finalize()
