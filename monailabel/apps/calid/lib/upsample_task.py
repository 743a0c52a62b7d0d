"""MONAI Label infer task: a dense short-axis stack from a sparse one, with its true geometry.

MONAI Label's stock bundle task restores every prediction to the input's grid, which would undo
the upsampling; this task returns the bundle's output file as it is: (X, Y, (Z - 1) * factor + 1
[, T]) with the slice step divided by the factor and the same origin and in-plane axes.
"""

import logging
import os
import tempfile

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from bundle.options import UpsampleOptions
from bundle.pipeline import upsample_file

logger = logging.getLogger(__name__)

# what a client may set per request: the bundle's own option names and defaults (the server
# chooses the weights and the device; samples would write a second file no one fetches)
REQUEST_OPTIONS = ("factor", "method", "phase_fusion", "steps", "refine", "adapt", "seed", "precision", "chunk_size")


class UpsampleTask(InferTask):
    def __init__(self, weights_dir=None, device="auto"):
        defaults = UpsampleOptions()
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="Dense short-axis cine stack by bisection: calid (the default), flow or linear midpoints",
            config={name: getattr(defaults, name) for name in REQUEST_OPTIONS},
        )
        self.weights_dir = weights_dir
        self.device = device

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        values = {name: request[name] for name in REQUEST_OPTIONS if request.get(name) is not None}
        if values.get("method", UpsampleOptions.method) == "calid":
            values["weights"] = self.weights_dir
        options = UpsampleOptions.of(**values, device=request.get("device") or self.device)
        handle, output = tempfile.mkstemp(suffix=".nii.gz", prefix="calid_")
        os.close(handle)
        os.remove(output)  # the bundle never writes over an existing file
        image = request["image"]  # a NIfTI file, or a folder of DICOM files (read per TriggerTime)
        stack, dense, seconds = upsample_file(image, output, options, progress=False)
        logger.info("upsampled %s x%d in %.1f s: %s -> %s", image, options.factor, seconds, stack.shape, dense.shape)
        return output, {
            **{name: getattr(options, name) for name in REQUEST_OPTIONS},
            "input_shape": list(stack.shape),
            "shape": list(dense.shape),
            "affine": dense.affine.tolist(),
            "seconds": round(seconds, 3),
        }
