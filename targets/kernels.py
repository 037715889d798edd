"""GPU kernel source: C-safe names before compiling, the source into the bundle, a compile check.

TVM 0.27 keeps CUDA and OpenCL kernels as source in the compiled module (``inspect_source()``):
CUDA is compiled when ``model.so`` is loaded on the device (TVM's runtime calls NVRTC or nvcc),
OpenCL by the device's driver. Two things follow, both measured here on the digits example:

- kernel parameters are named after the Relax function's parameters, which are the ONNX
  initializer names: ``0.weight`` becomes the C identifier ``0_weight``, which no C compiler
  accepts. ``tvm.compile`` does not notice (nothing compiles the source); the device would fail
  at load time. :func:`safe_param_names` renames them before compiling.
- the only proof here that kernels compile is to compile them: :func:`emit_kernels` writes the
  source into the bundle and runs the device kind's :class:`~edgecomp.targets.base.KernelCompiler`
  on it (nvcc for CUDA, clang's OpenCL C front end for OpenCL).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from edgecomp.errors import InputError, UnsupportedModelError
from edgecomp.targets.base import Target

__all__ = ["safe_param_names", "kernel_source", "emit_kernels", "check_options", "KERNEL_COMPILE_TIMEOUT"]

KERNEL_COMPILE_TIMEOUT = 600.0  # s: nvcc on MiniLM's kernels takes seconds; a hang is a bug, not a wait

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def safe_param_names(mod: Any, func: str = "main") -> Any:
    """A copy of ``mod`` whose ``func`` parameters are all C identifiers (``p<i>_<name>``).

    Positions, types and behaviour are unchanged (calls pass arguments by position); only the names
    that flow into generated kernel source change. Every parameter is renamed, not only invalid
    ones, so that none can collide with a C/OpenCL keyword (an input called ``kernel``, ``half``).
    """
    from tvm import relax

    f = mod[func]
    new = [relax.Var(f"p{i}_" + re.sub(r"\W", "_", str(p.name)), p.ty) for i, p in enumerate(f.params)]
    bound = f.bind_params(dict(zip(f.params, new)))
    out = mod.clone()  # the caller's module is shared (the host build for verification uses it)
    out[func] = relax.Function(new, bound.body, bound.ret_ty, bound.is_pure, bound.attrs)
    return out


def kernel_source(executable: Any, tvm_kind: str) -> str:
    """The source of every ``tvm_kind`` module in the executable's import tree, concatenated."""
    found, seen = [], set()

    def walk(m: Any) -> None:
        for sub in m.imports:
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if sub.kind == tvm_kind:
                found.append(sub.inspect_source())
            walk(sub)

    walk(executable.mod)
    return "\n".join(found)


def check_options(target: Target) -> None:
    """Refuse a target option the kernel compiler here does not support, before any work.

    Only ``arch`` is checked (CUDA 13's nvcc dropped everything before sm_75): a compiler that is
    not installed is reported later, by :func:`emit_kernels`, which records it.
    """
    comp = target.device_kind.compiler
    arch = target.target_dict().get("arch")
    if comp is None or not comp.list_archs or not arch or shutil.which(comp.list_archs[0]) is None:
        return
    try:
        out = subprocess.run(list(comp.list_archs), capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return
    known = [ln.strip() for ln in out.split() if ln.strip()]
    base = re.sub(r"[af]$", "", str(arch))
    if known and base not in known:
        raise InputError(f"--arch {arch}: {comp.program} here does not support it (supported: {' '.join(known)})")


def emit_kernels(executable: Any, target: Target, dest: Path) -> dict[str, Any] | None:
    """Write the device kernel source into ``dest`` and compile it here; the manifest's record.

    Returns None for CPU targets. A compiler that is not installed is recorded (``compiled``:
    None, with the reason); kernels that do not compile are an :class:`UnsupportedModelError`.
    """
    kind = target.device_kind
    if kind.kernel_file is None:
        return None
    source = kernel_source(executable, kind.tvm_kind)
    if not source.strip():
        raise UnsupportedModelError(f"target {target.name}: the compiled module holds no {kind.name} kernels")
    path = dest / kind.kernel_file
    path.write_text(source)
    names = sorted(set(re.findall(kind.kernel_pattern, source))) if kind.kernel_pattern else []
    info: dict[str, Any] = {
        "file": kind.kernel_file,
        "language": kind.name,
        "bytes": path.stat().st_size,
        "kernels": len(names),
        "names": names,
        "compiled": None,
    }
    info["compile"] = _compile(path, target)
    info["compiled"] = info["compile"].get("ok")
    return info


def _compile(src: Path, target: Target) -> dict[str, Any]:
    """Run the device kind's compiler on ``src``; its record (never leaves files behind)."""
    comp = target.device_kind.compiler
    if comp is None:
        return {"ok": None, "skipped": f"no compiler for {target.device} kernels is configured"}
    if shutil.which(comp.program) is None:
        return {"ok": None, "skipped": f"{comp.program} is not installed ({comp.install})"}
    arch = str(target.target_dict().get("arch", ""))
    with tempfile.TemporaryDirectory(prefix="edgecomp-kernels-") as work:
        out = Path(work) / f"kernels{comp.output}"
        cmd = [comp.program] + [a.format(src=src.resolve(), out=out, arch=arch) for a in comp.args]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=KERNEL_COMPILE_TIMEOUT, cwd=work)
        except subprocess.TimeoutExpired:
            raise UnsupportedModelError(
                f"{comp.program} did not finish compiling {src.name} within {KERNEL_COMPILE_TIMEOUT:g} s"
            ) from None
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout or "").strip()
            if "Unsupported gpu architecture" in text:
                raise InputError(f"--arch {arch}: {comp.program} here does not support it ({_first_error(text)})")
            raise UnsupportedModelError(f"{src.name} does not compile with {comp.program}: {_first_error(text)}")
        size = out.stat().st_size if out.exists() else None
    return {
        "ok": True,
        "command": " ".join([comp.program] + [a.format(src=src.name, out=f"kernels{comp.output}", arch=arch) for a in comp.args]),
        "what": comp.what.format(arch=arch),
        "seconds": round(seconds, 3),
        "output_bytes": size,
        "compiler": _version(comp.program),
    }


def _first_error(text: str) -> str:
    """The first line that says 'error' (else the first line), shortened: messages stay one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no output")
    return pick[:300]


def _version(program: str) -> str:
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return next((ln for ln in lines if "release" in ln or "version" in ln), lines[0] if lines else "unknown")
