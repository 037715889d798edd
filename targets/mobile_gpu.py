"""Mobile GPUs through OpenCL: Qualcomm Adreno (Android phones) and Arm Mali (Linux boards, Android).

The model's kernels are OpenCL C, scheduled by TVM's per-target Relax pipeline
(``relax.get_default_pipeline``): for ``-device=mali`` the generic GPU pipeline with the
``tvm.s_tir.dlight`` GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback), for
``-device=adreno`` TVM's Adreno pipeline (dlight Reduction, GeneralReduction, Fallback; the Adreno
conv2d/texture rules need the ``texture`` key, which needs TVM's texture-memory runtime, not used
here). The host part (``model.so``: the Relax VM's code that launches the kernels) is aarch64.

The kernels travel as source inside ``model.so``, compiled by the phone's or board's OpenCL
driver when the module is loaded; ``kernels.cl`` in the bundle is the same source, for reading.
The device needs a TVM runtime built with OpenCL (``USE_OPENCL=ON``; the apache-tvm wheels are
built without it).

Adreno's host code targets Android (``mtriple=aarch64-linux-android``). There is no Android NDK in
Debian's main archive, so it is linked by Debian's ``aarch64-linux-gnu-gcc`` with ``-nostdlib``:
no glibc start files and no ``libc.so.6`` dependency, which Android's bionic could not satisfy;
the C symbols the code needs (``memcpy``, tvm-ffi's error hook) resolve at load time from
the process, as they do on Linux. Mali boards mostly run Linux with glibc: plain
``aarch64-linux-gnu``.
"""

from __future__ import annotations

from edgecomp.targets.base import Target, register

__all__ = ["ADRENO", "MALI"]

_AARCH64_APT = ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")

ADRENO = register(
    Target(
        name="adreno",
        description="Qualcomm Adreno GPU via OpenCL, Android aarch64 host (Snapdragon phones and boards)",
        family="mobile_gpu",
        arch="aarch64",
        tvm_target={
            "kind": "opencl",
            "device": "adreno",
            "host": {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
        },
        cross_compiler="aarch64-linux-gnu-gcc",
        apt_packages=_AARCH64_APT,
        default_pipeline="target",
        device_key="adreno",
        device="opencl",
        link_options=("-nostdlib",),
    )
)

MALI = register(
    Target(
        name="mali",
        description="Arm Mali GPU via OpenCL, aarch64 Linux host (RK3588, Amlogic, i.MX 8 boards)",
        family="mobile_gpu",
        arch="aarch64",
        tvm_target={
            "kind": "opencl",
            "device": "mali",
            "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        },
        cross_compiler="aarch64-linux-gnu-gcc",
        apt_packages=_AARCH64_APT,
        default_pipeline="target",
        device_key="mali",
        device="opencl",
    )
)
