"""NVIDIA GPUs through CUDA, x86-64 Linux host.

``--arch sm_XX`` picks the GPU generation (default ``sm_80``, A100; ``sm_86`` RTX 30xx, ``sm_89``
L4/RTX 40xx, ``sm_90`` H100). Kernels are scheduled by TVM's CUDA Relax pipeline (the
``tvm.s_tir.dlight`` GPU rules) and travel as CUDA C source inside ``model.so``: TVM 0.27's CUDA
codegen does not compile them; its runtime does, when the module is loaded on the GPU machine
(NVRTC through the ``cuda-bindings`` package, or nvcc, via ``tvm_callback_cuda_compile``). The
build compiles ``kernels.cu`` with nvcc for the chosen arch, so kernels that would not compile, or
an arch the toolkit does not support, fail here and not on the GPU machine. For an aarch64 host
(Jetson), write a target file with ``host = {kind = "llvm", mtriple = "aarch64-linux-gnu"}``.
"""

from __future__ import annotations

from edgecomp.targets.base import Target, register

__all__ = ["CUDA", "DEFAULT_ARCH"]

DEFAULT_ARCH = "sm_80"

CUDA = register(
    Target(
        name="cuda",
        description=f"NVIDIA GPU via CUDA (--arch sm_XX, default {DEFAULT_ARCH}), x86-64 Linux host",
        family="cuda",
        arch="x86_64",
        tvm_target={"kind": "cuda", "arch": DEFAULT_ARCH, "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}},
        default_pipeline="target",
        device_key="cuda",
        device="cuda",
        options=(("arch", r"sm_\d{2,3}[af]?"),),
    )
)
