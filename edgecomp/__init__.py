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

__version__ = "0.1.0"

__all__ = [
    "build",
    "inspect_model",
    "run_bundle",
    "check",
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
