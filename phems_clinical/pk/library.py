"""The product library: published FVIII/FIX population models stored as YAML data.

Entries live in ``configs/model/<product>.yaml`` (the Hydra ``model/`` group), one
file per product, identified by its lower-case product name (``advate``).

Examples
--------
>>> "advate" in list_products()
True
>>> load_product("advate").n_cmt
2
"""

from __future__ import annotations

import yaml

from phems_clinical.pk.spec import ModelSpecError, PopModel, load_model
from phems_clinical.resources import configs_dir


def list_products() -> list[str]:
    """Identifiers of the library entries that carry a ``citation`` (published models)."""
    out = []
    for path in sorted((configs_dir() / "model").glob("*.yaml")):
        with path.open() as fh:
            spec = yaml.safe_load(fh) or {}
        if spec.get("citation"):
            out.append(path.stem)
    return out


def load_product(name: str) -> PopModel:
    """Load a library model by identifier, e.g. ``load_product("advate")``."""
    path = configs_dir() / "model" / f"{name.lower()}.yaml"
    if not path.is_file():
        raise ModelSpecError(
            f"unknown product {name!r}; available: {', '.join(list_products())}"
        )
    return load_model(path)
