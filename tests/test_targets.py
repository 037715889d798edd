"""Targets: every new record compiles the digits example; GPU bundles carry compiled-here kernel
source; ``--arch``; user targets from a TOML file, good and bad.

GPU code cannot run here: their builds verify the same Relax module compiled for the host, and
their kernels are compiled here (nvcc, clang's OpenCL C front end) to prove they compile. Checks
that need a tool this machine may lack (a cross compiler, nvcc, clang-14, the emulated arm64
device) skip with the reason; ``tools/setup.sh`` installs all of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import edgecomp
from edgecomp.errors import BundleError, DeviceError, InputError
from edgecomp.targets import get_target, list_targets, resolve_target
from edgecomp.targets.devices import qemu_cpu_for
from edgecomp.targets.lowering import elf_arch

from helpers import assert_bad_input

PRESETS = {  # name -> (mcpu, has dotprod, the qemu CPU that emulates it)
    "arm64-a53": ("cortex-a53", False, "cortex-a53"),
    "arm64-a55": ("cortex-a55", True, "cortex-a76"),  # qemu 7.2 has no A55: the v8.2 core with dotprod
    "arm64-a72": ("cortex-a72", False, "cortex-a72"),
    "arm64-a76": ("cortex-a76", True, "cortex-a76"),
}
GPU = {  # name -> (kernel file, a word every kernel definition has, a word only scheduled (thread-bound) code has)
    "mali": ("kernels.cl", "__kernel", "get_local_id"),
    "adreno": ("kernels.cl", "__kernel", "get_local_id"),
    "cuda": ("kernels.cu", "__global__", "threadIdx"),
}
COMPILER = {"kernels.cl": "clang-14", "kernels.cu": "nvcc"}


def _need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (tools/setup.sh installs it)")


@pytest.fixture(scope="module")
def gpu_bundles(tmp_path_factory):
    """The digits example built once for each GPU target."""
    _need("aarch64-linux-gnu-gcc")
    root = tmp_path_factory.mktemp("gpu")
    return {name: edgecomp.build(example="digits", target=name, output=root / name) for name in GPU}


def test_registry_lists_every_target(cli):
    names = {t.name for t in list_targets()}
    assert {"host", "arm64", "armv7", "adreno", "mali", "cuda", *PRESETS} <= names
    rc, out, _ = cli("targets", "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["cuda"]["device"] == "cuda" and rows["mali"]["device"] == rows["adreno"]["device"] == "opencl"
    assert rows["arm64-a76"]["tvm_target"]["mcpu"] == "cortex-a76"
    # GPU code never "runs here", even where its host CPU is this machine's (cuda: x86-64)
    assert not rows["cuda"]["runs_here"] and not get_target("cuda").runs_on_this_machine
    rc, out, _ = cli("targets")
    assert rc == 0 and all(n in out for n in names)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_arm64_preset(name, tmp_path):
    import tvm

    _need("aarch64-linux-gnu-gcc")
    mcpu, dotprod, qemu_cpu = PRESETS[name]
    spec = get_target(name).target_dict()
    assert spec["mcpu"] == mcpu and ("+dotprod" in spec["mattr"]) == dotprod
    # LLVM knows the core (an unknown -mcpu silently becomes "generic") and agrees on dot product
    assert tvm.target.codegen.llvm_is_valid_cpu(mcpu, spec["mtriple"])
    assert bool(tvm.target.Target(spec).attrs["feature.has_dotprod"]) == dotprod
    # `edgecomp check --device emu-arm64` emulates the core the bundle was built for
    assert qemu_cpu_for(spec) == qemu_cpu

    built = edgecomp.build(example="digits", target=name, output=tmp_path / name)
    assert elf_arch(built.path / "model.so") == "aarch64"
    m = built.manifest
    assert m["target"]["name"] == name and m["target"]["tvm_target"]["mcpu"] == mcpu
    assert m["target"]["device"] == "cpu" and m["target"]["kernels"] is None
    assert m["verification"]["numerics"]["ok"] and "not executed here" in m["verification"]["ran"]


def test_armv7(tmp_path):
    _need("arm-linux-gnueabihf-gcc")
    built = edgecomp.build(example="digits", target="armv7", output=tmp_path / "armv7")
    so = (built.path / "model.so").read_bytes()
    assert elf_arch(built.path / "model.so") == "arm" and so[4] == 1  # 32-bit ELF
    assert built.manifest["verification"]["numerics"]["ok"]


@pytest.mark.parametrize("name", sorted(GPU))
def test_gpu_bundle_has_compiled_kernel_source(gpu_bundles, name):
    kfile, keyword, scheduled = GPU[name]
    built = gpu_bundles[name]
    m = built.manifest
    src = (built.path / kfile).read_text()
    # real kernels, scheduled by TVM's GPU default rules (dlight): bound to threads
    assert src.count(keyword) >= 5 and scheduled in src
    k = m["target"]["kernels"]
    assert k["file"] == kfile and kfile in m["files"] and k["bytes"] == m["files"][kfile]["bytes"]
    assert k["kernels"] >= 5 and all(f" {n}(" in src for n in k["names"])
    # kernel parameters are C identifiers (ONNX's "0.weight" would be "0_weight": no compiler takes it)
    assert not re.search(r"[\s(,]\d\w*_ptr\b", src)
    if shutil.which(COMPILER[kfile]) is None:
        assert k["compiled"] is None and COMPILER[kfile] in k["compile"]["skipped"]
    else:
        assert k["compiled"] is True and k["compile"]["output_bytes"] > 0
    v = m["verification"]
    assert v["numerics"]["ok"] and "not executed here" in v["ran"] and m["target"]["device"] in v["ran"]
    assert elf_arch(built.path / "model.so") == get_target(name).arch
    # the bundle refuses to run on this machine's CPU, clearly
    with pytest.raises(BundleError, match="kernels"):
        edgecomp.run_bundle(built.path)


def test_adreno_links_without_glibc(gpu_bundles):
    """Android's bionic is not glibc: the Adreno host code has no glibc start files (crtstuff's
    ``__cxa_finalize`` hook), no ``libc.so.6`` and no GLIBC symbol versions; Mali's (Linux) has."""
    adreno = (gpu_bundles["adreno"].path / "model.so").read_bytes()
    mali = (gpu_bundles["mali"].path / "model.so").read_bytes()
    assert not any(s in adreno for s in (b"__cxa_finalize", b"libc.so.6", b"GLIBC_"))
    assert b"__cxa_finalize" in mali
    assert gpu_bundles["adreno"].manifest["target"]["tvm_target"]["host"]["mtriple"] == "aarch64-linux-android"


def test_gpu_bundle_refused_by_check(gpu_bundles):
    with pytest.raises(BundleError, match="cuda kernels"):
        edgecomp.check(gpu_bundles["cuda"].path, "local", repeats=3)


def test_safe_param_names_keep_behaviour():
    """The renamed module GPU targets compile computes what the original does (host build)."""
    import tvm
    from tvm import relax

    from edgecomp.examples import get_example
    from edgecomp.importer import fix_input_shapes, graph_inputs, load_onnx
    from edgecomp.targets.kernels import safe_param_names
    from edgecomp.targets.lowering import to_relax

    ex = get_example("digits")
    model = fix_input_shapes(load_onnx(ex.model_path), ex.input_shapes)
    specs = graph_inputs(model)
    rm = to_relax(model, {s.name: s.shape for s in specs}, {s.name: s.dtype for s in specs})
    renamed = safe_param_names(rm.mod)
    names = [str(p.name) for p in renamed["main"].params]
    assert all(re.fullmatch(r"p\d+_\w+", n) for n in names) and len(names) == len(rm.mod["main"].params)
    assert str(rm.mod["main"].params[1].name) == "0.weight"  # the caller's module is untouched
    x = tvm.runtime.tensor(ex.split("test")[0][:1, None].astype(np.float32).reshape(1, 1, 8, 8))
    params = [tvm.runtime.tensor(p) for p in rm.params]
    outs = []
    for mod in (rm.mod, renamed):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        outs.append(vm["main"](x, *params).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_cuda_arch_flag(cli, tmp_path):
    _need("nvcc")
    out = tmp_path / "digits-sm90"
    rc, stdout, err = cli("build", "--example", "digits", "--target", "cuda", "--arch", "sm_90", "-o", out, "--json")
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["tvm_target"]["arch"] == "sm_90"
    assert "-arch=sm_90" in m["target"]["kernels"]["compile"]["command"]
    # an arch CUDA 13's nvcc dropped fails before any work, as bad input
    with pytest.raises(InputError, match="sm_60"):
        resolve_target("cuda", arch="sm_60")


@pytest.mark.parametrize(
    "argv, mentions",
    [
        (["--target", "cuda", "--arch", "volta"], ["--arch", "volta"]),
        (["--target", "arm64", "--arch", "sm_80"], ["--arch", "arm64"]),
        (["--target", "arm64", "--target-file", "board.toml"], ["--target-file"]),
        (["--target", "cuda", "--emit", "firmware"], ["firmware", "cuda"]),
    ],
)
def test_target_flags_bad_input(cli, tmp_path, argv, mentions):
    out = tmp_path / "out"
    rc, _, err = cli("build", "--example", "digits", *argv, "-o", out)
    assert_bad_input(rc, err, mentions=mentions, output=out)


JETSON = """
[target]
name = "jetson-orin"
description = "Jetson Orin: CUDA sm_87, Cortex-A78AE host"
arch = "aarch64"
cross_compiler = "aarch64-linux-gnu-gcc"
apt_packages = ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"]
device_key = "orin"

[target.tvm]
kind = "cuda"
arch = "sm_87"
host = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a78" }
"""

BOARD = """
[target]
name = "rk3588"
arch = "aarch64"
cross_compiler = "aarch64-linux-gnu-gcc"
device_key = "rk3588"
link_options = []

[target.tvm]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mcpu = "cortex-a76"
mattr = ["+neon", "+dotprod"]
"""


def test_target_file_gpu_board_builds(cli, tmp_path):
    _need("aarch64-linux-gnu-gcc")
    path = tmp_path / "jetson.toml"
    path.write_text(JETSON)
    out = tmp_path / "digits-orin"
    rc, _, err = cli("build", "--example", "digits", "--target-file", path, "-o", out)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    t = m["target"]
    assert t["name"] == "jetson-orin" and t["family"] == "file" and t["target_file"] == str(path)
    assert t["device"] == "cuda" and t["device_key"] == "orin" and t["tvm_target"]["arch"] == "sm_87"
    assert elf_arch(out / "model.so") == "aarch64" and "__global__" in (out / "kernels.cu").read_text()
    assert m["verification"]["numerics"]["ok"]


def test_target_file_listed_by_targets(cli, tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(BOARD)
    rc, out, err = cli("targets", "--target-file", path, "--json")
    assert rc == 0, err
    row = {r["name"]: r for r in json.loads(out)}["rk3588"]
    assert row["device"] == "cpu" and row["tvm_target"]["mcpu"] == "cortex-a76" and row["target_file"] == str(path)
    assert qemu_cpu_for(row["tvm_target"]) == "cortex-a76"


_OK_HEAD = '[target]\nname = "b"\narch = "aarch64"\ncross_compiler = "aarch64-linux-gnu-gcc"\n'
BAD_FILES = {
    "not-toml": ("[target\nname = 'x'\n", ["not valid TOML"]),
    "binary": (b"\xff\xfe\x00", ["not valid TOML"]),
    "unknown-key": (_OK_HEAD + 'mcpu = "cortex-a76"\n[target.tvm]\nkind = "llvm"\n', ["'target.mcpu'", "unknown key"]),
    "unknown-table": ('[board]\nname = "b"\n', ["'board'", "unknown key"]),
    "no-target": ("", ["[target]"]),
    "missing-tvm": (_OK_HEAD, ["'target.tvm'", "missing"]),
    "missing-arch": ('[target]\nname = "b"\n[target.tvm]\nkind = "llvm"\n', ["'target.arch'", "missing"]),
    "wrong-type": (_OK_HEAD + 'apt_packages = "gcc"\n[target.tvm]\nkind = "llvm"\n', ["'target.apt_packages'", "list"]),
    "bad-arch": ('[target]\nname = "b"\narch = "sparc"\n[target.tvm]\nkind = "llvm"\n', ["'target.arch'", "sparc"]),
    "no-cross-compiler": ('[target]\nname = "b"\narch = "aarch64"\n[target.tvm]\nkind = "llvm"\n', ["'target.cross_compiler'"]),
    "builtin-name": (_OK_HEAD.replace('"b"', '"arm64"') + '[target.tvm]\nkind = "llvm"\n', ["'target.name'", "built-in"]),
    "bad-kind": (_OK_HEAD + '[target.tvm]\nkind = "vulkan"\n', ["'target.tvm.kind'", "vulkan"]),
    "gpu-without-host": (_OK_HEAD + '[target.tvm]\nkind = "opencl"\n', ["'target.tvm.host'"]),
    "unknown-tvm-option": (_OK_HEAD + '[target.tvm]\nkind = "llvm"\nmcpuu = "x"\n', ["'target.tvm.mcpuu'"]),
    "unknown-mcpu": (_OK_HEAD + '[target.tvm]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a99"\n',
                     ["'target.tvm.mcpu'", "cortex-a99"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_target_file_bad(cli, tmp_path, case):
    text, mentions = BAD_FILES[case]
    path = tmp_path / f"{case}.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    rc, _, err = cli("build", "--example", "digits", "--target-file", path, "-o", out)
    assert_bad_input(rc, err, mentions=[path.name, *mentions], output=out)


def test_target_file_missing_or_folder(cli, tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli("build", "--example", "digits", "--target-file", tmp_path / "nope.toml", "-o", out)
    assert_bad_input(rc, err, mentions=["nope.toml", "not found"], output=out)
    rc, _, err = cli("targets", "--target-file", tmp_path)
    assert_bad_input(rc, err, mentions=["directory"])


def test_dotprod_preset_runs_only_on_its_core(tmp_path):
    """int8 arithmetic for arm64-a76 uses SDOT/UDOT: it runs on the emulated A76 its manifest names,
    and dies of SIGILL on an emulated A53 (what ``arm64-a53`` exists for)."""
    from edgecomp.targets.devices import emu_info

    _need("aarch64-linux-gnu-objdump")
    try:
        emu_info()
    except DeviceError as err:
        if os.environ.get("EDGECOMP_REQUIRE_EMU") == "1":
            pytest.fail(f"EDGECOMP_REQUIRE_EMU=1 but {err}")
        pytest.skip(str(err))
    built = edgecomp.build(example="digits", target="arm64-a76", output=tmp_path / "a76", int8="minmax", int8_arith=True)
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(built.path / "model.so")], capture_output=True, text=True).stdout
    assert re.search(r"\t[su]dot\t", asm)
    report = edgecomp.check(built.path, "emu-arm64", repeats=3)
    assert report.exit_code == 0 and report.device["qemu_cpu"] == "cortex-a76"
    with pytest.raises(DeviceError, match="SIGILL"):
        edgecomp.check(built.path, "emu-arm64:cortex-a53", repeats=3)
