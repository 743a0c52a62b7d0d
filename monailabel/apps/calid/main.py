"""MONAI Label app serving this bundle's upsampling (one infer task, no trainer).

Conf (``--conf KEY VALUE``): ``weights`` (a folder with model.pt and model.json; default the
bundle's models/), ``device`` (auto, cpu, cuda).
"""

import json
import logging
import os
import sys
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp

BUNDLE_ROOT = Path(__file__).resolve().parents[3]
if str(BUNDLE_ROOT) not in sys.path:  # the bundle's package, also when it is not pip-installed
    sys.path.insert(0, str(BUNDLE_ROOT))

from lib.upsample_task import UpsampleTask  # noqa: E402

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.weights = conf.get("weights") or os.path.join(BUNDLE_ROOT, "models")
        self.device = conf.get("device", "auto")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CaLID cardiac slice interpolation",
            description="Dense short-axis cine MRI from a sparse stack (CaLID bundle)",
            version=json.loads(Path(BUNDLE_ROOT, "configs", "metadata.json").read_text())["version"],
        )

    def init_infers(self):
        return {"calid_upsample": UpsampleTask(self.weights, self.device)}

    def init_trainers(self):
        return {}
