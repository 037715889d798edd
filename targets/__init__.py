"""Deployment targets: a registry of declarative records, one file per family.

Importing this package registers every family; look targets up with :func:`get_target`.
"""

from edgecomp.targets import arm_cpu, host  # noqa: F401  (registration side effect)
from edgecomp.targets.base import ELF_MACHINES, Target, get_target, list_targets

__all__ = ["Target", "get_target", "list_targets", "ELF_MACHINES"]
