"""Training side of edgecomp (issue 9): factorized layers, compression-aware training, distillation,
subspace training. Needs PyTorch, an optional extra: ``pip install -e '.[train]'`` (pins the CPU
build ``torch==2.13.0``; plain ``torch`` pulls a multi-GB CUDA build).

Modules import torch at the top; :func:`edgecomp.train.common.require_torch` turns a missing torch
into a one-line :class:`~edgecomp.errors.InputError` for the CLI.
"""
