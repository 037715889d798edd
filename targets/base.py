"""The target record and the registry it lives in.

A target is data, not code: the TVM target dict, the machine the code runs on, how to link it.
Each family file (``host.py``, ``arm_cpu.py``, ...) declares its records with :func:`register`;
nothing elsewhere branches on target names.
"""

from __future__ import annotations

import dataclasses
import platform
from typing import Any, Callable

from edgecomp.errors import InputError

__all__ = ["Target", "register", "get_target", "list_targets", "host_arch", "ELF_MACHINES"]

# e_machine values of the ELF header, to check what a linked .so really is.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm": 40, "riscv": 243}


@dataclasses.dataclass(frozen=True)
class Target:
    """One deployment target.

    Attributes:
        name: what users type after ``--target``.
        description: one line for ``edgecomp targets``.
        family: the file that declared it (``host``, ``arm_cpu``, ...).
        arch: CPU architecture of the machine the code runs on (a key of ``ELF_MACHINES``).
        tvm_target: the TVM target dict (``tvm.target.Target(dict)``); a callable is resolved
            lazily, so that e.g. host CPU detection runs only when the target is used.
        cross_compiler: the C compiler that links the ``.so`` (``None``: the host's ``cc``).
        apt_packages: Debian packages that provide ``cross_compiler``, for error messages.
        default_pipeline: the Relax pipeline ``tvm.compile`` uses.
        device_key: RPC key of devices of this kind (for tracker-based checks).
    """

    name: str
    description: str
    family: str
    arch: str
    tvm_target: dict[str, Any] | Callable[[], dict[str, Any]]
    cross_compiler: str | None = None
    apt_packages: tuple[str, ...] = ()
    default_pipeline: str = "default"
    device_key: str | None = None

    def target_dict(self) -> dict[str, Any]:
        """The TVM target as a plain dict (resolving host detection if needed)."""
        spec = self.tvm_target() if callable(self.tvm_target) else self.tvm_target
        return dict(spec)

    def tvm(self):
        """The ``tvm.target.Target`` object."""
        import tvm

        return tvm.target.Target(self.target_dict())

    @property
    def runs_on_this_machine(self) -> bool:
        """True when code for this target can be loaded and run by this Python process."""
        return self.arch == host_arch()


def host_arch() -> str:
    """This machine's CPU architecture, named as in ``ELF_MACHINES``."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target to the registry (names are unique)."""
    if target.name in _REGISTRY:
        raise ValueError(f"target {target.name!r} registered twice")
    _REGISTRY[target.name] = target
    return target


def get_target(name: str) -> Target:
    """Look a target up by name; an unknown name is a one-line :class:`InputError`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InputError(f"unknown target {name!r} (known targets: {known})") from None


def list_targets() -> list[Target]:
    """All registered targets, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
