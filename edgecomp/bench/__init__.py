"""Benchmark models: real ONNX models with evaluation and calibration data, made offline.

See :mod:`edgecomp.bench.models` (``BENCH_MODELS``, ``fetch``) and ``tools/models.py``.
"""

__all__: list[str] = []
