"""Versions of the installed distributions, for manifests and benchmark records."""

from __future__ import annotations

import importlib.metadata
from typing import Iterable

__all__ = ["package_versions"]


def package_versions(dists: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}``, ``"not installed"`` for the missing ones."""
    out = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
