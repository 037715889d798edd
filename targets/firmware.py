"""Firmware outputs: the model as plain build inputs for CMake/Make/Yocto projects.

``edgecomp build ... --emit firmware`` writes ``firmware/`` into the bundle:

    include/NAME.h              C API: NAME_create / _create_from_memory / _create_linked, NAME_run,
                                NAME_destroy, NAME_last_error; input/output names, shapes, dtypes
    lib/libNAME.a               one object: the model compiled as a TVM *system library*
                                (``relax.build(..., system_lib=True)``) + the C++ glue that drives
                                the Relax VM through tvm-ffi
    lib/libNAME_weights.a       the weights blob linked in, with NAME_create_linked
    weights/NAME.weights        the same blob as a file (zstd-compressed when the bundle's weights
                                are entropy-coded), for updating weights without relinking
    lib/cmake/NAME/             CMake package: find_package(NAME) → NAME::model, NAME::model_linked
    NAME.mk                     Makefile fragment
    runtime/lib, runtime/licenses   libtvm_runtime.so + libtvm_ffi.so for the target, their licenses
    src/                        the generated glue and weights sources, for inspection

Reproducible: objects are compiled without debug info, archives are written in deterministic mode
and every generated file is a pure function of the model, the config and the tool versions, so
the same inputs give byte-identical files (tests/test_firmware.py rebuilds and compares).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgecomp.errors import InputError, UnsupportedModelError
from edgecomp.targets.base import Target, host_arch
from edgecomp.threads import user_tvm_threads

__all__ = [
    "FirmwareResult", "emit_firmware", "c_name", "weights_blob", "runtime_site", "toolchain", "FIRMWARE_DIR",
    "runner_command", "build_example", "run_example", "firmware_runner", "find_library",
]

log = logging.getLogger(__name__)

FIRMWARE_DIR = "firmware"
_TEMPLATES = Path(__file__).parent / "firmware"
_MAGIC = b"EDGEFW01"
_ALIGN = 64
_MAX_DIMS = 8
# DLPack type codes (dlpack.h): kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6
_DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}
_ARCH_REGEX = {"x86_64": "x86_64|AMD64|amd64", "aarch64": "aarch64|arm64|ARM64"}
# Runtime shared objects a program links: (package folder, library file).
_RUNTIME_LIBS = (("tvm", "libtvm_runtime.so"), ("tvm_ffi", "libtvm_ffi.so"))


@dataclasses.dataclass(frozen=True)
class FirmwareResult:
    """What :func:`emit_firmware` wrote (paths relative to the bundle), for the manifest."""

    name: str
    files: dict[str, str]  # role → path
    weights_coding: str  # "raw" | "zstd"
    weights_bytes: int
    runtime: dict[str, str]  # package → version of the runtime libraries shipped

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def c_name(model_name: str) -> str:
    """A C identifier from a model name (``digits-cnn.v2`` → ``digits_cnn_v2``)."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", model_name).strip("_").lower() or "model"
    return name if not name[0].isdigit() else f"m_{name}"


# ------------------------------------------------------------------------------------------------
# the weights blob (layout mirrored by BlobHeader/BlobEntry in model.cc.in)


def _dl_dtype(dt: np.dtype) -> tuple[int, int, int]:
    dt = np.dtype(dt)
    if dt.name == "bfloat16":
        return 4, 16, 1
    if dt.kind not in _DL_CODES:
        raise UnsupportedModelError(f"firmware: weights of dtype {dt.name} have no DLPack type code")
    return _DL_CODES[dt.kind], (8 if dt.kind == "b" else dt.itemsize * 8), 1


def weights_blob(params: Sequence[np.ndarray]) -> bytes:
    """The weights in main()'s parameter order, as the C glue reads them (raw, uncompressed)."""
    entries, chunks, offset = [], [], 0
    for i, p in enumerate(params):
        a = np.asarray(p, order="C")
        if a.ndim > _MAX_DIMS:
            raise UnsupportedModelError(f"firmware: weight {i} has {a.ndim} dims (at most {_MAX_DIMS})")
        code, bits, lanes = _dl_dtype(a.dtype)
        raw = a.tobytes()
        shape = list(a.shape) + [0] * (_MAX_DIMS - a.ndim)
        entries.append(struct.pack("<BBHi8qQQ", code, bits, lanes, a.ndim, *shape, offset, len(raw)))
        pad = (-len(raw)) % _ALIGN
        chunks.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    data = b"".join(chunks)
    head_len = 40 + 88 * len(entries)
    data_offset = head_len + (-head_len) % _ALIGN
    header = struct.pack("<8sIIQQQ", _MAGIC, 1, len(entries), data_offset, len(data), _checksum(data))
    table = header + b"".join(entries)
    return table + b"\0" * (data_offset - len(table)) + data


def _checksum(data: bytes) -> int:
    """CRC-32 (zlib's, the polynomial the C glue computes) of the data region."""
    return zlib.crc32(data)


# ------------------------------------------------------------------------------------------------
# toolchains and runtime libraries


@dataclasses.dataclass(frozen=True)
class Toolchain:
    cc: str
    cxx: str
    ld: str
    ar: str
    strip: str


def toolchain(target: Target) -> Toolchain:
    """The C/C++ compiler, linker, archiver and strip for ``target`` (checked to exist)."""
    if target.cross_compiler is None:
        tools = Toolchain("gcc", "g++", "ld", "ar", "strip")
        apt = "g++ binutils"
    else:
        prefix = target.cross_compiler[: -len("gcc")] if target.cross_compiler.endswith("gcc") else target.cross_compiler + "-"
        tools = Toolchain(prefix + "gcc", prefix + "g++", prefix + "ld", prefix + "ar", prefix + "strip")
        apt = f"g++-{prefix.rstrip('-').replace('_', '-')} " + " ".join(target.apt_packages)
    for tool in dataclasses.astuple(tools):
        if shutil.which(tool) is None:
            raise InputError(f"firmware for target {target.name} needs {tool}, which is not installed (Debian: apt-get install {apt})")
    return tools


def find_library(target: Target, lib: str) -> bool:
    """Whether the target's linker finds ``lib`` (e.g. ``zstd`` for zstd-coded weights)."""
    cc = toolchain(target).cc
    out = subprocess.run([cc, f"-print-file-name=lib{lib}.so"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.exists(out)


def runtime_site(arch: str) -> Path:
    """The site-packages folder holding TVM runtime libraries for ``arch``.

    The host's own apache-tvm / apache-tvm-ffi for the host architecture; for aarch64 the aarch64
    wheels that ``tools/setup_emu_arm64.sh`` unpacks (the same versions as the host's).
    """
    if arch == host_arch():
        import tvm

        return Path(tvm.__file__).resolve().parent.parent
    if arch == "aarch64":
        from edgecomp.targets.devices import SETUP_HINT, emu_home

        site = emu_home() / "site"
        if all((site / pkg / "lib" / lib).is_file() for pkg, lib in _RUNTIME_LIBS):
            return site
        raise InputError(f"firmware for aarch64 needs the aarch64 TVM runtime libraries (not found under {site}): {SETUP_HINT}")
    raise InputError(f"firmware: no TVM runtime libraries known for {arch}")


def _runtime_versions(site: Path) -> dict[str, str]:
    out = {}
    for dist in ("apache_tvm", "apache_tvm_ffi"):
        found = sorted(site.glob(f"{dist}-*.dist-info"))
        if found:
            out[dist.replace("_", "-")] = found[-1].name[len(dist) + 1 : -len(".dist-info")]
    return out


def _copy_runtime(site: Path, dest: Path) -> list[str]:
    (dest / "lib").mkdir(parents=True)
    (dest / "licenses").mkdir()
    for pkg, lib in _RUNTIME_LIBS:
        shutil.copyfile(site / pkg / "lib" / lib, dest / "lib" / lib)
    licenses = [
        (site / "tvm" / "LICENSE", "apache-tvm.LICENSE"),
        (site / "tvm" / "NOTICE", "apache-tvm.NOTICE"),
        (site / "tvm_ffi" / "3rdparty" / "libbacktrace" / "LICENSE", "libbacktrace.LICENSE"),
    ]
    for info in sorted(site.glob("apache_tvm_ffi-*.dist-info")):
        licenses += [(info / "licenses" / "LICENSE", "apache-tvm-ffi.LICENSE"), (info / "licenses" / "NOTICE", "apache-tvm-ffi.NOTICE")]
    missing = []
    for src, name in licenses:
        if src.is_file():
            shutil.copyfile(src, dest / "licenses" / name)
        else:
            missing.append(str(src))
    return missing


def _include_dirs() -> list[str]:
    import tvm_ffi

    root = Path(tvm_ffi.__file__).resolve().parent
    return [str(root / "include"), str(root / "3rdparty" / "dlpack" / "include")]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "LC_ALL": "C", "SOURCE_DATE_EPOCH": "0", "ZERO_AR_DATE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        first = [ln for ln in lines if re.search(r"error|cannot find|undefined reference", ln, re.I) and "collect2" not in ln]
        err = first[0] if first else (lines[-1] if lines else f"exit code {proc.returncode}")
        raise UnsupportedModelError(f"firmware: {what} failed ({cmd[0]}): {err.strip()[:300]}")


# ------------------------------------------------------------------------------------------------
# generated sources


def _fill(template: str, values: dict[str, str]) -> str:
    text = (_TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise AssertionError(f"{template}: unfilled {sorted(set(left))}")
    return text


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _io_parts(name: str, specs: dict[str, list[tuple[str, tuple[int, ...], str]]]) -> tuple[str, str]:
    """Header macros and the C tables of the inputs/outputs."""
    uname = name.upper()
    macros, tables = [], []
    for kind, items in specs.items():
        rows = []
        for i, (tname, shape, dtype) in enumerate(items):
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            key = f"{uname}_{kind.upper()[:-1]}{i}"
            dims = ", ".join(str(int(d)) for d in shape) or "0"
            macros += [
                f"#define {key}_NAME {_c_string(tname)}",
                f"#define {key}_DTYPE {_c_string(dtype)}",
                f"#define {key}_NDIM {len(shape)}",
                f"#define {key}_SHAPE {{{dims}}}",
                f"#define {key}_NBYTES {nbytes}",
            ]
            tables.append(f"static const int64_t {name}_{kind}{i}_shape[] = {{{dims}}};")
            rows.append(f"  {{{_c_string(tname)}, {_c_string(dtype)}, {len(shape)}, {name}_{kind}{i}_shape, {nbytes}}},")
        tables.append(f"const edgecomp_tensor_info {name}_{kind}[] = {{\n" + "\n".join(rows) + "\n};")
    return "\n".join(macros), "\n".join(tables)


def _param_table(params: Sequence[np.ndarray]) -> str:
    rows = []
    for p in params:
        a = np.asarray(p)
        code, bits, lanes = _dl_dtype(a.dtype)
        dims = ", ".join(str(int(d)) for d in a.shape)
        rows.append(f"    {{{code}, {bits}, {lanes}, {a.ndim}, {{{dims}}}}},")
    return "\n".join(rows) if rows else "    {0, 0, 0, 0, {0}},  // no weights"


# ------------------------------------------------------------------------------------------------


def emit_firmware(
    relax_model: Any,
    target: Target,
    dest: Path,
    *,
    name: str,
    model_name: str,
    inputs: Sequence[tuple[str, tuple[int, ...], str]],
    outputs: Sequence[tuple[str, tuple[int, ...], str]],
    int8_arith: bool = False,
    compress: bool = False,
    versions: dict[str, str] | None = None,
    db: str | os.PathLike | None = None,
) -> FirmwareResult:
    """Write the firmware folder ``dest`` (which must not exist) for ``relax_model`` on ``target``.

    ``inputs``/``outputs``: (name, shape, dtype) of the model's tensors. ``compress``: store the
    weights blob zstd-compressed (the glue then links libzstd and decompresses at load).
    """
    import zstandard

    from edgecomp.targets.lowering import compile_relax

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise InputError(f"firmware name {name!r} is not a C identifier (letters, digits, _)")
    dest = Path(dest).resolve()
    tools = toolchain(target)
    site = runtime_site(target.arch)
    versions = dict(versions or {})
    prefix = f"edgecomp_{name}_"  # the system-library prefix: several models can share one program
    uname = name.upper()
    io_macros, io_tables = _io_parts(name, {"inputs": list(inputs), "outputs": list(outputs)})
    tvm_target = target.target_dict()
    values = {
        "NAME": name, "UNAME": uname, "MODEL": model_name, "PREFIX": prefix, "TARGET": target.name, "ARCH": target.arch,
        "ARCH_REGEX": _ARCH_REGEX.get(target.arch, target.arch),
        "TVM_TARGET": " ".join(f"{k}={v}" for k, v in sorted(tvm_target.items())),
        "EDGECOMP_VERSION": versions.get("edgecomp", "?"), "TVM_VERSION": versions.get("apache-tvm", "?"),
        "NUM_INPUTS": str(len(inputs)), "NUM_OUTPUTS": str(len(outputs)), "IO_MACROS": io_macros, "IO_TABLES": io_tables,
        "NUM_PARAMS": str(len(relax_model.params)), "PARAM_TABLE": _param_table(relax_model.params),
        "ZSTD_LINK_NOTE": ", libzstd" if compress else "",
        "EXTRA_LIBS": "zstd;" if compress else "", "EXTRA_LDLIBS": "-lzstd " if compress else "",
        "VERSION": "1.0",
    }

    executable = compile_relax(relax_model, target, int8_arith=int8_arith, system_lib_prefix=prefix, db=db)
    dest.mkdir(parents=True)
    for sub in ("include", "lib", "weights", "src", f"lib/cmake/{name}"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    (dest / "include" / f"{name}.h").write_text(_fill("model.h.in", values))
    (dest / "src" / f"{name}.cc").write_text(_fill("model.cc.in", values))
    (dest / "src" / f"{name}_weights.c").write_text(_fill("weights.c.in", values))

    raw = weights_blob(relax_model.params)
    blob = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=True).compress(raw) if compress else raw
    (dest / "weights" / f"{name}.weights").write_bytes(blob)

    with tempfile.TemporaryDirectory(prefix="edgecomp-fw-") as tmp_s:
        tmp = Path(tmp_s)
        executable.export_library(str(tmp / "model.tar"))
        with tarfile.open(tmp / "model.tar") as tar:
            members = sorted(m.name for m in tar.getmembers() if m.name.endswith(".o"))
            tar.extractall(tmp / "tvm", filter="data")
        if not members:
            raise UnsupportedModelError("firmware: TVM exported no object files for the system library")
        cflags = ["-O2", "-g0", "-fPIC", "-ffunction-sections", "-fdata-sections", f"-ffile-prefix-map={tmp}=."]
        defines = ["-DEDGECOMP_WITH_ZSTD"] if compress else []
        includes = [f"-I{dest / 'include'}"] + [f"-I{d}" for d in _include_dirs()]
        _run([tools.cxx, "-std=c++17", *cflags, *defines, *includes, "-c", str(dest / "src" / f"{name}.cc"), "-o", str(tmp / "glue.o")],
             f"compiling the glue {name}.cc")
        # One relocatable object: the glue and TVM's objects, whose static constructors register the
        # model in the system library, so linking any API symbol brings the whole model along.
        obj = tmp / f"{name}.o"
        _run([tools.ld, "-r", "-o", str(obj), str(tmp / "glue.o"), *[str(tmp / "tvm" / m) for m in members]], "partial linking")
        _run([tools.strip, "--strip-debug", "--enable-deterministic-archives", str(obj)], "stripping debug info")
        _run([tools.ar, "rcsD", str(dest / "lib" / f"lib{name}.a"), obj.name], "archiving", cwd=tmp)

        shutil.copyfile(dest / "weights" / f"{name}.weights", tmp / "blob.bin")
        (tmp / "weights.S").write_text(_fill("weights.S.in", {**values, "BLOB": "blob.bin"}))
        _run([tools.cc, *cflags, "-c", "weights.S", "-o", "weights_s.o"], "assembling the weights", cwd=tmp)
        _run([tools.cc, "-std=c99", *cflags, *includes, "-c", str(dest / "src" / f"{name}_weights.c"), "-o", str(tmp / "weights_c.o")],
             "compiling the weights loader")
        wobj = f"{name}_weights.o"
        _run([tools.ld, "-r", "-o", wobj, "weights_c.o", "weights_s.o"], "partial linking the weights", cwd=tmp)
        _run([tools.strip, "--strip-debug", wobj], "stripping debug info", cwd=tmp)
        _run([tools.ar, "rcsD", str(dest / "lib" / f"lib{name}_weights.a"), wobj], "archiving the weights", cwd=tmp)
    (dest / "src" / f"{name}_weights.S").write_text(_fill("weights.S.in", {**values, "BLOB": f"../weights/{name}.weights"}))

    (dest / "lib" / "cmake" / name / f"{name}Config.cmake").write_text(_fill("Config.cmake.in", values))
    (dest / "lib" / "cmake" / name / f"{name}ConfigVersion.cmake").write_text(_fill("ConfigVersion.cmake.in", values))
    (dest / f"{name}.mk").write_text(_fill("model.mk.in", values))
    missing = _copy_runtime(site, dest / "runtime")
    if missing:
        log.warning("firmware: license files not found: %s", ", ".join(missing))

    files = {
        "header": f"include/{name}.h",
        "library": f"lib/lib{name}.a",
        "weights_library": f"lib/lib{name}_weights.a",
        "weights": f"weights/{name}.weights",
        "cmake": f"lib/cmake/{name}/{name}Config.cmake",
        "make": f"{name}.mk",
        "runtime": "runtime/lib",
    }
    return FirmwareResult(
        name=name, files=files, weights_coding="zstd" if compress else "raw", weights_bytes=len(blob),
        runtime=_runtime_versions(site),
    )


# ------------------------------------------------------------------------------------------------
# verification: the C example program, built against the firmware folder and run on samples

CROSS_ROOTS = {"aarch64": Path("/usr/aarch64-linux-gnu")}  # Debian's cross libc/libstdc++ (qemu -L)


def _example_dir() -> Path:
    from edgecomp import examples

    return Path(examples.__file__).resolve().parent / "firmware"


def runner_command(arch: str) -> tuple[list[str] | None, str | None]:
    """How to execute a program built for ``arch`` here: (prefix, None) or (None, why not)."""
    if arch == host_arch():
        return [], None
    qemu = shutil.which(f"qemu-{arch}")
    root = CROSS_ROOTS.get(arch)
    if qemu is None:
        return None, f"qemu-{arch} is not installed (Debian: apt-get install qemu-user)"
    if root is None or not (root / "lib").is_dir():
        return None, f"no {arch} C library to run it with ({root})"
    return [qemu, "-L", str(root)], None


def build_example(dest: Path, name: str, target: Target, out_dir: Path, linked: bool) -> Path:
    """Compile the C example (edgecomp/examples/firmware/main.c) against the firmware folder with
    the flags of its Makefile fragment; returns the program."""
    tools = toolchain(target)
    exe = out_dir / ("run_model_linked" if linked else "run_model")
    libs = [str(dest / "lib" / f"lib{name}_weights.a")] if linked else []
    libs += [str(dest / "lib" / f"lib{name}.a"), f"-L{dest / 'runtime' / 'lib'}", f"-Wl,-rpath,{dest / 'runtime' / 'lib'}",
             "-ltvm_runtime", "-ltvm_ffi"]
    if (dest / "weights" / f"{name}.weights").read_bytes()[:4] == b"\x28\xb5\x2f\xfd":
        libs.append("-lzstd")
    libs += ["-lstdc++", "-lm", "-lpthread", "-ldl"]
    defines = [f"-DEDGECOMP_MODEL={name}", f'-DEDGECOMP_MODEL_HEADER="{name}.h"'] + (["-DEDGECOMP_LINKED=1"] if linked else [])
    _run([tools.cc, "-O2", "-std=c99", "-D_POSIX_C_SOURCE=200809L", *defines, f"-I{dest / 'include'}",
          str(_example_dir() / "main.c"), "-o", str(exe), *libs], "building the C example against the firmware")
    return exe


def run_example(exe: Path, arch: str, inputs: bytes, weights: Path | None, timeout: float = 300) -> bytes:
    """Run the example program on raw input samples; returns the raw outputs."""
    prefix, why = runner_command(arch)
    if prefix is None:
        raise UnsupportedModelError(f"firmware: cannot run {arch} code here: {why}")
    with tempfile.TemporaryDirectory(prefix="edgecomp-fwrun-") as d:
        src, out = Path(d) / "inputs.bin", Path(d) / "outputs.bin"
        src.write_bytes(inputs)
        cmd = [*prefix, str(exe), str(src), str(out)] + ([str(weights)] if weights is not None else [])
        env = dict(os.environ)
        if prefix:  # emulated (qemu-user): one TVM thread, as the emulated device runs. Measured: the
            # parallel loops of the default schedules, on TVM's thread pool, did not finish in 300 s
            # under qemu-aarch64 (digits; natively they run in microseconds).
            env["TVM_NUM_THREADS"] = user_tvm_threads() or "1"
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise UnsupportedModelError(f"firmware: the C example failed on {arch}: {msg[:300]}")
        return out.read_bytes()


def firmware_runner(dest: Path, name: str, target: Target, inputs: Sequence[tuple[str, tuple[int, ...], str]],
                    outputs: Sequence[tuple[str, tuple[int, ...], str]], work: Path, linked: bool):
    """A ``run(samples) -> [[outputs]]`` over the C example built against ``dest`` (see ``_verify``)."""
    exe = build_example(dest, name, target, work, linked)
    weights = None if linked else dest / "weights" / f"{name}.weights"

    def run(samples) -> list[list[np.ndarray]]:
        raw = b"".join(np.ascontiguousarray(np.asarray(feed[n], dtype=dt).reshape(shape)).tobytes()
                       for feed in samples for n, shape, dt in inputs)
        data = run_example(exe, target.arch, raw, weights)
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, shape, dt in outputs]
        per = sum(sizes)
        if len(data) != per * len(samples):
            raise UnsupportedModelError(f"firmware: the C example wrote {len(data)} bytes, expected {per * len(samples)}")
        results, off = [], 0
        for _ in samples:
            row = []
            for (_, shape, dt), n in zip(outputs, sizes):
                row.append(np.frombuffer(data[off:off + n], dtype=dt).reshape(shape).copy())
                off += n
            results.append(row)
        return results

    return run
