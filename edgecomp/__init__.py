"""edgecomp: an edge-deployment compiler for compressed neural networks.

ONNX in; graph passes checked against ONNX Runtime; Apache TVM (Relax) code for the target; a
verified, checksummed bundle out. One call does the main job::

    import edgecomp
    edgecomp.build("model.onnx", target="arm64", input_shapes={"input": (1, 3, 224, 224)})
"""

from edgecomp.api import BuildResult, build, check, inspect_model, run_bundle
from edgecomp.bundle import Bundle, load_bundle
from edgecomp.errors import BundleError, DeviceError, EdgecompError, InputError, NumericsError, UnsupportedModelError
from edgecomp.numerics import Tolerance
from edgecomp.threads import default_tvm_threads

# TVM sizes its thread pool at the first parallel kernel; its own default is half the cores on x86.
default_tvm_threads()

__version__ = "0.1.0"


def finetune(compressed, teacher, data, **kwargs):
    """Distil a compressed ONNX model from the original on unlabelled inputs (needs torch: the
    ``train`` extra). See :func:`edgecomp.train.distill.finetune`."""
    from edgecomp.train.distill import finetune as _finetune

    return _finetune(compressed, teacher, data, **kwargs)


__all__ = [
    "build",
    "inspect_model",
    "run_bundle",
    "check",
    "finetune",
    "load_bundle",
    "Bundle",
    "BuildResult",
    "Tolerance",
    "EdgecompError",
    "InputError",
    "UnsupportedModelError",
    "NumericsError",
    "BundleError",
    "DeviceError",
    "__version__",
]
