"""Versions of the installed distributions and the CPU model, for manifests and benchmark records."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Iterable

__all__ = ["package_versions", "cpu_model"]


def package_versions(dists: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}``, ``"not installed"`` for the missing ones."""
    out = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
