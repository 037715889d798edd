"""The build machine's own CPU.

Code is tuned to the detected CPU (``mcpu``), so a host bundle is meant for this machine (and CI
on the same kind of machine); use an explicit architecture target to ship to other machines.
"""

from __future__ import annotations

from typing import Any

from edgecomp.targets.base import Target, host_arch, register

__all__ = ["HOST"]


def _detect() -> dict[str, Any]:
    import tvm

    spec: dict[str, Any] = {"kind": "llvm"}
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if cpu and cpu != "generic":
        spec["mcpu"] = cpu
    return spec


HOST = register(
    Target(
        name="host",
        description="this machine's CPU (LLVM, detected -mcpu), runs in-process",
        family="host",
        arch=host_arch(),
        tvm_target=_detect,
    )
)
