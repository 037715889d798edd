"""The target record and the registry it lives in.

A target is data, not code: the TVM target dict, the machine the code runs on, how to link it.
Each family file (``host.py``, ``arm_cpu.py``, ...) declares its records with :func:`register`;
nothing elsewhere branches on target names.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from typing import Any, Callable

from edgecomp.errors import InputError

__all__ = [
    "Target", "DeviceKind", "KernelCompiler", "DEVICES", "register", "get_target", "list_targets", "host_arch",
    "ELF_MACHINES",
]

# e_machine values of the ELF header, to check what a linked .so really is.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm": 40, "riscv": 243}


@dataclasses.dataclass(frozen=True)
class KernelCompiler:
    """A compiler that turns a device's kernel source into device code on the build machine.

    TVM 0.27 ships GPU kernels as *source* inside ``model.so`` (CUDA is compiled by NVRTC/nvcc
    when the module is loaded on the device, OpenCL by the device's driver), so nothing in
    ``tvm.compile`` proves that the kernels compile. Running this compiler at build time does.

    Attributes:
        program: the executable (looked up on PATH).
        args: its arguments; ``{src}``, ``{out}`` and ``{arch}`` (the TVM target's ``arch``) are
            filled in.
        output: suffix of the file it writes (its size is recorded, the file is not kept).
        install: how to get ``program``, for the message when it is missing.
        what: one line for the manifest: what a successful run proves.
        list_archs: a command that prints the ``arch`` values the compiler supports, one a line.
    """

    program: str
    args: tuple[str, ...]
    output: str
    install: str
    what: str
    list_archs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """Where a target's kernels run (``Target.device``) and what follows for building them.

    Attributes:
        name: ``cpu``, ``cuda`` or ``opencl``.
        tvm_kind: the TVM target kind whose code runs there (``llvm`` for the CPU).
        pipeline: the Relax pipeline: ``cpu`` (edgecomp's: TVM's CPU pipeline plus the default
            schedules of ``targets/cpu_schedules.py``), ``default`` (TVM's generic build
            pipeline, no schedules) or ``target`` (``relax.get_default_pipeline(target)``: for GPUs it applies the
            ``tvm.s_tir.dlight`` GPU rules; without them kernels have no thread binding).
        kernel_file: the bundle file that holds the kernel source (None: code is in ``model.so``).
        kernel_pattern: regex whose group 1 is a kernel's name in that source (to count kernels).
        compiler: what compiles the kernel source here (None: nothing to compile).
    """

    name: str
    tvm_kind: str
    pipeline: str = "default"
    kernel_file: str | None = None
    kernel_pattern: str | None = None
    compiler: KernelCompiler | None = None


DEVICES: dict[str, DeviceKind] = {
    "cpu": DeviceKind("cpu", "llvm", pipeline="cpu"),
    "cuda": DeviceKind(
        "cuda", "cuda", pipeline="target", kernel_file="kernels.cu",
        kernel_pattern=r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;]*?\) \{',
        compiler=KernelCompiler(
            "nvcc", ("--cubin", "-O3", "-arch={arch}", "--use_fast_math", "-o", "{out}", "{src}"), ".cubin",
            "install NVIDIA's CUDA toolkit and put nvcc on PATH",
            "nvcc compiled the kernels to a cubin for {arch}; TVM's runtime compiles them again on the device",
            list_archs=("nvcc", "--list-gpu-code"),
        ),
    ),
    "opencl": DeviceKind(
        "opencl", "opencl", pipeline="target", kernel_file="kernels.cl",
        kernel_pattern=r"__kernel void (\w+)\([^;]*?\) \{",
        compiler=KernelCompiler(
            "clang-14",
            ("-x", "cl", "-cl-std=CL1.2", "-Xclang", "-finclude-default-header", "-target", "spir64", "-O2",
             "-c", "-emit-llvm", "-o", "{out}", "{src}"),
            ".bc", "apt-get install clang-14",
            "clang's OpenCL C 1.2 front end compiled the kernels (to SPIR); the device's driver compiles them again",
        ),
    ),
}


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
        default_pipeline: the Relax pipeline: ``cpu``, ``default`` or ``target`` (see :class:`DeviceKind`).
        device_key: RPC key of devices of this kind (for tracker-based checks).
        device: where the kernels run, a key of :data:`DEVICES`. ``arch`` is then the CPU of the
            machine that hosts that device (it runs ``model.so`` and launches the kernels).
        link_options: extra options for the linker (e.g. no glibc start files for Android).
        options: ``(key, regex)`` pairs: TVM target keys a user may set per build (``--arch``).
        source: the target file this record was read from (None: built in).
    """

    name: str
    description: str
    family: str
    arch: str
    tvm_target: dict[str, Any] | Callable[[], dict[str, Any]]
    cross_compiler: str | None = None
    apt_packages: tuple[str, ...] = ()
    default_pipeline: str = "cpu"
    device_key: str | None = None
    device: str = "cpu"
    link_options: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    source: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"target {self.name!r}: unknown device {self.device!r}")

    @property
    def device_kind(self) -> DeviceKind:
        return DEVICES[self.device]

    @property
    def code_description(self) -> str:
        """The target's code as the subject of a sentence ("... not executed here")."""
        if self.device == "cpu":
            return f"the {self.arch} code itself was"
        return f"the {self.device} kernels and their {self.arch} host code were"

    def with_option(self, key: str, value: str) -> "Target":
        """A copy with TVM target key ``key`` set to ``value`` (only keys the record allows)."""
        patterns = dict(self.options)
        if key not in patterns:
            allowed = ", ".join(f"--{k}" for k in patterns) or "none"
            raise InputError(f"--{key} does not apply to target {self.name} (its options: {allowed})")
        if not re.fullmatch(patterns[key], value):
            raise InputError(f"--{key} {value!r} is not valid for target {self.name} (expected {patterns[key]})")
        return dataclasses.replace(self, tvm_target={**self.target_dict(), key: value})

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
        """True when code for this target can be loaded and run by this Python process.

        Only CPU code: a GPU target's kernels need their device even when its host CPU is this one.
        """
        return self.arch == host_arch() and self.device == "cpu"


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
