"""User targets from a TOML file (``--target-file board.toml``), validated strictly.

A board that none of the built-in records fits is described in a file, not in code::

    [target]
    name = "rk3588"                                # what bundles and reports call it
    description = "Rockchip RK3588, Cortex-A76 big cores"
    arch = "aarch64"                               # CPU of the machine that runs model.so
    cross_compiler = "aarch64-linux-gnu-gcc"       # links model.so (omit: this machine's cc)
    apt_packages = ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"]
    device_key = "rk3588"                          # RPC key its devices register under
    link_options = []                              # extra linker options (optional)

    [target.tvm]                                   # the TVM target dict, as tvm.target.Target takes it
    kind = "llvm"
    mtriple = "aarch64-linux-gnu"
    mcpu = "cortex-a76"
    mattr = ["+neon", "+dotprod"]

A GPU board names ``kind = "opencl"`` or ``"cuda"`` with a ``[target.tvm.host]`` table; where the
kernels run (``Target.device``) follows from ``kind``. Every mistake (bad TOML, an unknown or
missing key, a wrong type, a TVM target TVM rejects) is one :class:`InputError` naming the file and
the key: a typo must not silently build for the wrong machine.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from edgecomp.errors import InputError
from edgecomp.targets.base import DEVICES, ELF_MACHINES, Target, host_arch, list_targets

__all__ = ["load_target_file", "KEYS", "REQUIRED"]

# key → (type, what it is); tvm is a table, the rest strings or lists of strings
KEYS: dict[str, tuple[type, str]] = {
    "name": (str, "target name"),
    "description": (str, "one line for listings"),
    "arch": (str, f"CPU architecture of the machine that runs model.so ({', '.join(ELF_MACHINES)})"),
    "tvm": (dict, "the TVM target dict"),
    "cross_compiler": (str, "C compiler that links model.so"),
    "apt_packages": (list, "Debian packages that provide the cross compiler"),
    "device_key": (str, "RPC key of devices of this kind"),
    "link_options": (list, "extra linker options"),
}
REQUIRED = ("name", "arch", "tvm")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_target_file(path: str | os.PathLike) -> Target:
    """Read and validate a target file; the :class:`Target` record it describes."""
    path = Path(path)
    where = f"target file {path}"
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{where} not found") from None
    except IsADirectoryError:
        raise InputError(f"{where} is a directory, not a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{where} is not valid TOML: {err}") from None
    except OSError as err:
        raise InputError(f"{where} cannot be read: {err.strerror}") from None
    extra = sorted(set(doc) - {"target"})
    if extra:
        raise InputError(f"{where}: unknown key {extra[0]!r} (the file holds one [target] table)")
    table = doc.get("target")
    if not isinstance(table, dict):
        raise InputError(f"{where}: missing [target] table")
    for key in sorted(table):
        if key not in KEYS:
            raise InputError(f"{where}: unknown key 'target.{key}' (known: {', '.join(KEYS)})")
    for key in REQUIRED:
        if key not in table:
            raise InputError(f"{where}: missing key 'target.{key}' ({KEYS[key][1]})")
    for key, value in table.items():
        _check_type(where, key, value)
    return _record(where, path, table)


def _check_type(where: str, key: str, value: Any) -> None:
    kind, what = KEYS[key]
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}: 'target.{key}' must be a list of strings ({what})")
    elif not isinstance(value, kind):
        noun = "a table" if kind is dict else "a string"
        raise InputError(f"{where}: 'target.{key}' must be {noun} ({what})")
    elif kind is str and not value.strip():
        raise InputError(f"{where}: 'target.{key}' is empty ({what})")


def _record(where: str, path: Path, t: dict[str, Any]) -> Target:
    name = t["name"]
    if not _NAME.fullmatch(name):
        raise InputError(f"{where}: 'target.name' {name!r} must be letters, digits, '_', '.', '-' (it names files)")
    builtin = {x.name for x in list_targets()}
    if name in builtin:
        raise InputError(f"{where}: 'target.name' {name!r} is a built-in target; choose another name")
    arch = t["arch"]
    if arch not in ELF_MACHINES:
        raise InputError(f"{where}: 'target.arch' {arch!r} is not one of {', '.join(ELF_MACHINES)}")
    tvm_dict = t["tvm"]
    kind = tvm_dict.get("kind")
    if not isinstance(kind, str):
        raise InputError(f"{where}: missing key 'target.tvm.kind' (llvm, cuda or opencl)")
    devices = {d.tvm_kind: d for d in DEVICES.values()}
    if kind not in devices:
        raise InputError(f"{where}: 'target.tvm.kind' {kind!r} is not supported (llvm, cuda or opencl)")
    device = devices[kind]
    if device.name != "cpu" and not isinstance(tvm_dict.get("host"), dict):
        raise InputError(f"{where}: missing table 'target.tvm.host' (the {kind} target's host CPU, e.g. kind = \"llvm\")")
    _check_tvm(where, tvm_dict)
    cross = t.get("cross_compiler")
    if cross is None and arch != host_arch():
        raise InputError(f"{where}: missing key 'target.cross_compiler' ({arch} code cannot be linked by this "
                         f"{host_arch()} machine's cc)")
    return Target(
        name=name,
        description=t.get("description") or f"user target from {path.name}",
        family="file",
        arch=arch,
        tvm_target=tvm_dict,
        cross_compiler=cross,
        apt_packages=tuple(t.get("apt_packages", ())),
        default_pipeline=device.pipeline,
        device_key=t.get("device_key"),
        device=device.name,
        link_options=tuple(t.get("link_options", ())),
        source=str(path),
    )


def _check_tvm(where: str, tvm_dict: dict[str, Any]) -> None:
    """Let TVM parse the dict (it knows every kind's options) and LLVM check each ``mcpu``.

    LLVM takes an unknown ``mcpu`` with a logged error and builds generic code: a typo would
    silently give code for another machine, so it is refused here, before TVM parses the dict
    (which would print LLVM's complaint). ``mattr`` typos LLVM only warns about, and TVM has no
    list of valid features to check them against.
    """
    import tvm

    for key, spec in (("target.tvm", tvm_dict), ("target.tvm.host", tvm_dict.get("host"))):
        if isinstance(spec, dict) and spec.get("kind") == "llvm" and spec.get("mcpu"):
            triple = spec.get("mtriple") or tvm.target.codegen.llvm_get_system_triple()
            if not tvm.target.codegen.llvm_is_valid_cpu(str(spec["mcpu"]), str(triple)):
                raise InputError(f"{where}: '{key}.mcpu' {spec['mcpu']!r} is not a CPU LLVM knows for {triple}")
    try:
        tvm.target.Target(tvm_dict)
    except Exception as err:  # noqa: BLE001  (TVM raises its own error types; any is a bad dict)
        text = " ".join(str(err).split())
        unknown = re.search(r"Unknown config option '([^']+)'", text)
        if unknown:
            raise InputError(f"{where}: unknown key 'target.tvm.{unknown.group(1)}' "
                             f"(TVM's {tvm_dict.get('kind')} target has no such option)") from None
        msg = re.sub(r"\s*Target creation from config dict failed:.*$", "", text)
        raise InputError(f"{where}: 'target.tvm' is not a valid TVM target: {msg[:300]}") from None
