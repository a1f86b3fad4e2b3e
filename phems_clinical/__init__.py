"""phems_clinical: federated, privacy-preserving clinical models for paediatric
hospitals.

Subpackages, in import order (imports flow one way):
``data`` -> ``pk`` -> (federation, evaluation: later) -> ``app``.

Packages re-export their main names lazily (:func:`lazy_exports`): ``import
phems_clinical.data`` loads no JAX or pandas until a name that needs them is used,
so that the command line starts fast (``phems --help`` imports neither).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

__version__ = "0.1.0"


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` (PEP 562): ``exports`` maps a
    submodule (relative, e.g. ``".cohort"``) to the names it provides, and a name
    is imported from its submodule on first use, then kept on the package."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
