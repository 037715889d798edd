"""Errors a user can act on.

Everything edgecomp raises on purpose is an :class:`EdgecompError` whose message is one line naming
the problem (file, node, op, input, shape). The CLI prints it as ``edgecomp: error: ...`` and exits
with the error's ``exit_code``; anything else is a bug and is reported as an internal error.
"""

from __future__ import annotations

__all__ = ["EdgecompError", "InputError", "UnsupportedModelError", "NumericsError", "BundleError", "DeviceError"]


class EdgecompError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = 2


class InputError(EdgecompError):
    """Bad input: a missing/invalid file, a bad shape, an unknown target or option."""


class UnsupportedModelError(EdgecompError):
    """A valid ONNX model that the toolchain (TVM's importer, a pass) cannot handle."""


class BundleError(EdgecompError):
    """A bundle that is missing, malformed, tampered with, or built for another machine."""


class DeviceError(EdgecompError):
    """A device that cannot be reached, did not answer in time, or failed while running a bundle."""


class NumericsError(EdgecompError):
    """Outputs drifted past the stated tolerance: the build refuses to go on (exit 1)."""

    exit_code = 1
