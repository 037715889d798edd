"""Train a tiny CNN on scikit-learn's 8x8 digits and export it to ONNX.

Why: edgecomp needs a small, real, reproducible ONNX model (plus test and
calibration data) for its examples and tests, without downloading anything.
``sklearn.datasets.load_digits`` ships with scikit-learn, trains in seconds
on a CPU, and the resulting files are tiny enough to commit.

Splits (deterministic, stratified, seed 0): 20% test; from the remaining 80%,
256 samples are held out as the quantization calibration set and the rest is
used for training. Calibration is disjoint from both test and training.

Outputs (written atomically to --out-dir): digits_cnn.onnx (opset 17, input
"input" [batch,1,8,8] float32, output "logits" [batch,10], weights inline),
test.npz (x, y), calib.npz (x, y) and meta.json. The run is deterministic:
rerunning produces byte-identical files (npz entries use a fixed timestamp).

Only needed for regenerating the examples: requires torch (CPU build).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgecomp.train.data import N_CALIB, SPLIT_SEED, digits_model, load_digits_splits

REPO_ROOT = Path(__file__).resolve().parents[1]
OPSET = 17


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(32):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Like np.savez_compressed, but with a fixed zip timestamp (reproducible bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED  # ZipInfo defaults to STORED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def export_onnx(model: nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the classic exporter warns that it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(  # classic TorchScript exporter: no onnxscript needed
            model, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "edgecomp/examples/digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="torch seed (init + shuffling)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    splits = load_digits_splits()
    model = digits_model()
    train(model, *splits["train"], epochs=args.epochs, seed=args.seed)

    x_test, y_test = splits["test"]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_test})[0]
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    if ort_acc != torch_acc or max_diff > 1e-4:
        print(f"ERROR: ONNX/torch mismatch: acc torch={torch_acc:.4f} ort={ort_acc:.4f}, "
              f"max|dlogits|={max_diff:.3g} (limit 1e-4)", file=sys.stderr)
        return 1
    if torch_acc < 0.97:
        print(f"ERROR: test accuracy {torch_acc:.4f} < 0.97; try more --epochs", file=sys.stderr)
        return 1

    atomic_write(out / "test.npz", npz_bytes(x=x_test, y=y_test))
    atomic_write(out / "calib.npz", npz_bytes(x=splits["calib"][0], y=splits["calib"][1]))
    meta = {
        "model": "digits_cnn.onnx",
        "input_name": "input",
        "output_name": "logits",
        "shape": {"input": [1, 1, 8, 8]},
        "dtype": "float32",
        "labels": [str(i) for i in range(10)],
        "test_accuracy": ort_acc,
        "torch_version": torch.__version__,
        "seed": args.seed,
        "split_seed": SPLIT_SEED,
        "epochs": args.epochs,
        "opset": OPSET,
        "splits": {k: int(len(v[1])) for k, v in splits.items()},
    }
    atomic_write(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    print(f"digits_cnn: train={len(splits['train'][1])} calib={N_CALIB} test={len(y_test)} "
          f"acc torch={torch_acc:.4f} ort={ort_acc:.4f} max|dlogits|={max_diff:.2e} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
