"""MONAI Label infer task: a dense short-axis stack from a sparse one, with its true geometry.

MONAI Label's stock bundle task restores every prediction to the input's grid, which would undo
the upsampling; this task returns the bundle's output file as it is: (X, Y, (Z - 1) * factor + 1
[, T]) with the slice step divided by the factor and the same origin and in-plane axes.
"""

import logging
import os
import tempfile

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.options import as_flag
from bundle.upsample import upsample_file

logger = logging.getLogger(__name__)

DEFAULTS = {"factor": 4, "steps": 1, "refine": False, "method": "flow"}


class UpsampleTask(InferTask):
    def __init__(self, weights_dir=None, device="auto"):
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="Dense short-axis cine stack by bisection: flow (default), calid or linear midpoints",
            config=dict(DEFAULTS),
        )
        self.weights_dir = weights_dir
        self.device = device

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        options = {key: request.get(key, default) for key, default in DEFAULTS.items()}
        factor, steps, refine = int(options["factor"]), int(options["steps"]), as_flag(options["refine"], "refine")
        handle, output = tempfile.mkstemp(suffix=".nii.gz", prefix="calid_")
        os.close(handle)
        os.remove(output)  # the bundle never writes over an existing file
        image = request["image"]  # a NIfTI file, or a folder of DICOM files (read per TriggerTime)
        stack, dense, seconds = upsample_file(
            image,
            output,
            factor=factor,
            method=options["method"],
            num_inference_steps=steps,
            refine=refine,
            device=request.get("device", self.device) or self.device,
            weights_dir=self.weights_dir,
            progress=False,
        )
        logger.info("upsampled %s x%d in %.1f s: %s -> %s", image, factor, seconds, stack.shape, dense.shape)
        return output, {
            "factor": factor,
            "steps": steps,
            "refine": refine,
            "method": options["method"],
            "input_shape": list(stack.shape),
            "shape": list(dense.shape),
            "affine": dense.affine.tolist(),
            "seconds": round(seconds, 3),
        }
