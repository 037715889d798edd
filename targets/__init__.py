"""Deployment targets: a registry of declarative records, one file per family.

Importing this package registers every family; look targets up with :func:`get_target`, or
:func:`resolve_target` for what a build was asked for (a name, a target file, per-build options).
"""

from __future__ import annotations

import os

from edgecomp.targets import arm_cpu, cuda, host, mobile_gpu  # noqa: F401  (registration side effect)
from edgecomp.targets.base import DEVICES, ELF_MACHINES, Target, get_target, list_targets

__all__ = ["Target", "get_target", "list_targets", "resolve_target", "ELF_MACHINES", "DEVICES"]


def resolve_target(
    target: str | Target = "host", *, target_file: str | os.PathLike | None = None, arch: str | None = None
) -> Target:
    """The target a build uses: a registered name or record, or a target file; ``arch`` set.

    ``arch`` (``--arch``) applies only to records that declare it as an option (``cuda``), and is
    checked against the kernel compiler here before any work is done.
    """
    from edgecomp.errors import InputError
    from edgecomp.targets.kernels import check_options
    from edgecomp.targets.target_file import load_target_file

    if target_file is not None:
        if target not in (None, "host"):
            raise InputError("give either --target or --target-file, not both")
        tgt = load_target_file(target_file)
    elif isinstance(target, Target):
        tgt = target
    else:
        tgt = get_target(target or "host")
    if arch is not None:
        tgt = tgt.with_option("arch", arch)
    check_options(tgt)
    return tgt
