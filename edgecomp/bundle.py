"""The bundle: everything a device needs, written atomically, verified when loaded.

Layout (a directory, or the same packed into one ``.tar``)::

    manifest.json           format version, I/O signature, target, tools, pass log, sha256 of files
    model.so                compiled code for the target (weights are not in it)
    weights.npz             parameters of ``main``, in call order (names in the manifest), or
    weights.coded           the same entropy-coded (``--entropy zstd|ans``; passes/entropy_code.py)
    reference/inputs.npz    reference inputs, stacked along a leading sample axis
    reference/outputs.npz   ONNX Runtime's outputs of the *original* model on them
    report.md               the human report
    report.html             the same with figures (spectra and ranks, size waterfall)
    kernels.cu / kernels.cl GPU targets: the kernel source (also inside model.so), for reading

A bundle is staged in a hidden temporary sibling folder and renamed into place only when complete;
a failure removes the staging folder, so no half-written bundle is ever left. Loading checks every
file against the manifest's sha256 and refuses unknown, missing or modified files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgecomp.errors import BundleError, InputError
from edgecomp.importer import TensorSpec, sha256_file
from edgecomp.numerics import Samples

__all__ = ["FORMAT", "FORMAT_VERSION", "staged_output", "finalize_manifest", "Bundle", "load_bundle"]

FORMAT = "edgecomp-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CODE = "model.so"
WEIGHTS = "weights.npz"
WEIGHTS_CODED = "weights.coded"
REF_INPUTS = "reference/inputs.npz"
REF_OUTPUTS = "reference/outputs.npz"
REPORT = "report.md"
REPORT_HTML = "report.html"


def bundle_files(root: Path) -> list[str]:
    """Every file of a bundle folder except the manifest, as sorted relative paths."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def check_output_path(out: Path, force: bool, protect: list[Path] = ()) -> None:
    """Refuse an existing output (unless ``force``) and any output that would clobber an input."""
    out = Path(out)
    resolved = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise InputError(f"output {out} would overwrite the input {p}; choose another -o")
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"output {out} already exists (pass --force to replace it)")
        if not _is_bundle(out):
            kind = "a bundle .tar" if out.suffix == ".tar" else "a bundle directory"
            raise InputError(f"output {out} exists and is not {kind}; refusing to replace it even with --force")


def _is_bundle(path: Path) -> bool:
    """An edgecomp bundle (or an empty folder): the only things ``--force`` may replace."""
    if path.is_symlink():
        return False
    if path.suffix == ".tar":
        if not path.is_file() or not tarfile.is_tarfile(path):
            return False
        with tarfile.open(path) as tar:
            return MANIFEST in tar.getnames()
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, force: bool = False, protect: list[Path] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; on success move it (or its .tar) to ``out`` atomically.

    On any exception, including Ctrl-C, the staging folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_output_path(out, force, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield stage
        if out.suffix == ".tar":
            packed = stage.with_name(stage.name + ".tar")
            with tarfile.open(packed, "w") as tar:
                for rel in sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()):
                    tar.add(stage / rel, arcname=rel)
            shutil.rmtree(stage)
            stage = packed
            os.replace(packed, out)
        elif out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    except BaseException:
        if stage.is_dir():
            shutil.rmtree(stage, ignore_errors=True)
        elif stage.exists():
            stage.unlink()
        raise


def finalize_manifest(stage: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 and size of every staged file and write ``manifest.json``."""
    manifest = dict(manifest)
    manifest["files"] = {
        rel: {"sha256": sha256_file(stage / rel), "bytes": (stage / rel).stat().st_size} for rel in bundle_files(stage)
    }
    tmp = stage / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, stage / MANIFEST)
    return manifest


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


class Bundle:
    """A loaded, checksum-verified bundle (see :func:`load_bundle`)."""

    def __init__(self, root: Path, manifest: dict[str, Any], cleanup: tempfile.TemporaryDirectory | None = None):
        self.root = root
        self.manifest = manifest
        self._cleanup = cleanup
        self._vm = None
        self._params = None

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(o["name"], tuple(o["shape"]), o["dtype"]) for o in self.manifest["outputs"]]

    @property
    def target_arch(self) -> str:
        return self.manifest["target"]["arch"]

    def load_npz(self, rel: str) -> dict[str, np.ndarray]:
        with np.load(self.root / rel, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def weights(self) -> dict[str, np.ndarray]:
        """The parameters by key, decoded (and checked tensor by tensor) if entropy-coded."""
        rel = self.manifest["runtime"]["weights"]
        if rel.endswith(".npz"):
            return self.load_npz(rel)
        from edgecomp.passes.entropy_code import decode

        return decode((self.root / rel).read_bytes(), where=str(self.root / rel))

    def reference(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(stacked reference inputs, stacked ORT outputs of the original model)."""
        return self.load_npz(REF_INPUTS), self.load_npz(REF_OUTPUTS)

    def _runtime(self):
        from edgecomp.targets.base import host_arch

        device = self.manifest["target"].get("device", "cpu")
        if device != "cpu":  # GPU kernels need their GPU; this loader runs CPU code only
            raise BundleError(
                f"bundle {self.root} holds {device} kernels for target {self.manifest['target']['name']!r}; "
                f"edgecomp runs bundles on this machine's CPU only"
            )
        if self.target_arch != host_arch():
            raise BundleError(
                f"bundle {self.root} holds {self.target_arch} code for target "
                f"{self.manifest['target']['name']!r}; this machine is {host_arch()} and cannot run it"
            )
        if self._vm is None:
            import tvm
            from tvm import relax

            lib = tvm.runtime.load_module(str(self.root / self.manifest["runtime"]["code"]))
            self._vm = relax.VirtualMachine(lib, tvm.cpu())
            weights = self.weights()
            self._params = [tvm.runtime.tensor(weights[p["key"]]) for p in self.manifest["params"]]
        return self._vm, self._params

    def run(self, samples: Samples) -> list[list[np.ndarray]]:
        """Run each feed (exact input shapes) on this machine; returns outputs per sample."""
        import tvm

        vm, params = self._runtime()
        results = []
        for feed in samples:
            args = [tvm.runtime.tensor(np.asarray(feed[s.name], order="C")) for s in self.inputs]
            out = vm[self.manifest["runtime"]["entry"]](*args, *params)
            results.append(_flatten(out))
        return results

    def close(self) -> None:
        self._vm = None
        if self._cleanup is not None:
            self._cleanup.cleanup()
            self._cleanup = None


def _flatten(out: Any) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    flat: list[np.ndarray] = []
    for item in out:
        flat.extend(_flatten(item))
    return flat


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle directory or ``.tar`` and verify every file against its manifest."""
    path = Path(path)
    cleanup = None
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise BundleError(f"{path} is neither a bundle directory nor a bundle .tar")
        cleanup = tempfile.TemporaryDirectory(prefix="edgecomp-bundle-")
        with tarfile.open(path) as tar:
            tar.extractall(cleanup.name, filter="data")
        root = Path(cleanup.name)
    else:
        root = path
    try:
        manifest = _read_manifest(root, path)
        _verify_files(root, manifest, path)
    except BaseException:
        if cleanup is not None:
            cleanup.cleanup()
        raise
    return Bundle(root, manifest, cleanup)


def _read_manifest(root: Path, shown: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{shown} is not an edgecomp bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{shown}/{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{shown}/{MANIFEST} is not an edgecomp bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{shown}: bundle format version {manifest.get('format_version')} is not supported "
            f"(this edgecomp reads version {FORMAT_VERSION})"
        )
    return manifest


def _verify_files(root: Path, manifest: dict[str, Any], shown: Path) -> None:
    listed = manifest.get("files") or {}
    present = set(bundle_files(root))
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    if missing:
        raise BundleError(f"{shown}: file {missing[0]} listed in the manifest is missing")
    if extra:
        raise BundleError(f"{shown}: unexpected file {extra[0]} not listed in the manifest (tampered?)")
    for rel, info in listed.items():
        if sha256_file(root / rel) != info["sha256"]:
            raise BundleError(f"{shown}: checksum mismatch for {rel}: the bundle was modified after it was built")
