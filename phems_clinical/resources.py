"""Locate the shipped configuration and schema folders.

In a source checkout (editable install) they are the top-level ``configs/`` and
``data_schemas/``; in a wheel they are packaged as ``phems_clinical/_configs`` and
``phems_clinical/_data_schemas``.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(packaged: str, top: str) -> Path:
    for cand in (_PKG / packaged, _PKG.parent / top):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"cannot find {top}/ next to the phems_clinical package")


def configs_dir() -> Path:
    """The Hydra configuration root (holds ``model/``, ``experiment/``, ...)."""
    return _find("_configs", "configs")


def schemas_dir() -> Path:
    """The JSON Schema folder (``data_schemas/``)."""
    return _find("_data_schemas", "data_schemas")
