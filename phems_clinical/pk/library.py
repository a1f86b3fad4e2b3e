"""The product library: published FVIII/FIX population models stored as YAML data.

Entries live in ``configs/model/<id>.yaml`` (the Hydra ``model/`` group), one file
per model, identified by a lower-case id (``kovaltry``, ``koopman2024``). Each entry
names the product by brand and INN, the model (``model_label``), its population,
assay, when to choose it, its verification status per section (``sources``,
``unverified``) and the product's vial sizes. ``docs/products.md`` is the table for
clinicians.

A clinician may name a product by id or by brand (case-insensitive; ``"Elocta"``
and ``"Eloctate"`` are the same entry): :func:`resolve_product`.

Examples
--------
>>> "kovaltry" in list_products()
True
>>> resolve_product("ELOCTA")
'eloctate'
>>> product_info("kovaltry").display
'Kovaltry (octocog alfa) — Garmann 2017'
>>> load_product("kovaltry").n_cmt
2
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from phems_clinical.pk.spec import ModelSpecError, PopModel, load_model
from phems_clinical.resources import configs_dir

#: The library's default product: a fully verified model (no ``unverified``
#: section), standard half-life rFVIII, built on children and adults (1-61 y).
DEFAULT_PRODUCT = "kovaltry"

#: Sections graded in each entry's ``sources`` mapping.
SOURCE_SECTIONS = (
    "fixed_effects",
    "covariates",
    "iiv",
    "iov",
    "residual",
    "vial_sizes_IU",
)
#: Grades of ``sources``: P primary paper, S faithful secondary transcription of
#: the paper's table, L regulatory label; the last three are not verified.
VERIFIED_GRADES = ("P", "S", "L")
UNVERIFIED_GRADES = ("T", "not found", "placeholder")
ASSAYS = ("one-stage", "chromogenic")


class UnknownProductError(ModelSpecError):
    """A product name that is not in the library, or names several entries.

    ``choices`` holds the ids the name could mean (empty when none is close).
    """

    def __init__(self, message: str, choices: tuple[str, ...] = ()):
        super().__init__(message)
        self.choices = choices


class ProductInfo(NamedTuple):
    """What a clinician is shown about a library product (no model compiled).

    ``display`` reads "Brand (INN) — Model year". ``assay`` is the assay of the
    model's data (``"one-stage"``, ``"chromogenic"`` or ``None``);
    ``assay_conversion`` maps a measured assay to ``{"factor", "source"}``, the
    factor multiplying a level measured with that assay to put it on the model's
    scale. ``unverified`` names the sections not checked against a published table.
    """

    id: str
    brand: str
    inn: str
    model_label: str
    display: str
    factor: str
    half_life_class: str
    population: dict[str, Any]
    ages: str | None
    assay: str | None
    assay_conversion: dict[str, dict[str, Any]]
    choose_when: str
    unverified: tuple[str, ...]
    vial_sizes_IU: tuple[int, ...]
    external_validation: tuple[dict[str, Any], ...]
    citation: str
    vial_notes: str | None


def _model_dir() -> Path:
    return configs_dir() / "model"


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime_ns: int) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        # libyaml's safe loader where PyYAML has it: the same documents, read about
        # ten times faster (the whole library is read when a product is resolved)
        spec = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(spec, dict):
        raise ModelSpecError(f"{path}: expected a mapping")
    return spec


def _spec(product_id: str) -> dict[str, Any]:
    path = _model_dir() / f"{product_id}.yaml"
    return _read(str(path), path.stat().st_mtime_ns)


def list_products() -> list[str]:
    """Ids of the library entries that carry a ``citation`` (published models)."""
    out = []
    for path in sorted(_model_dir().glob("*.yaml")):
        if _read(str(path), path.stat().st_mtime_ns).get("citation"):
            out.append(path.stem)
    return out


def _text(spec: dict[str, Any], key: str, product_id: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ModelSpecError(f"{product_id}.yaml: {key}: expected a non-empty text")
    return value.strip()


@functools.lru_cache(maxsize=64)
def _info(product_id: str, mtime_ns: int) -> ProductInfo:
    spec = _spec(product_id)
    brand = _text(spec, "brand", product_id)
    inn = _text(spec, "inn", product_id)
    label = _text(spec, "model_label", product_id)
    assay = spec.get("assay")
    if assay is not None and assay not in ASSAYS:
        raise ModelSpecError(
            f"{product_id}.yaml: assay: expected one of "
            f"{', '.join(ASSAYS)} or null, got {assay!r}"
        )
    population = dict(spec.get("population") or {})
    ages = population.get("ages")
    return ProductInfo(
        id=product_id,
        brand=brand,
        inn=inn,
        model_label=label,
        display=f"{brand} ({inn}) — {label}",
        factor=str(spec.get("factor", "")),
        half_life_class=str(spec.get("half_life_class", "")),
        population=population,
        ages=None if ages is None else str(ages),
        assay=assay,
        assay_conversion={
            str(k): dict(v) for k, v in (spec.get("assay_conversion") or {}).items()
        },
        choose_when=_text(spec, "choose_when", product_id),
        unverified=tuple(str(u) for u in spec.get("unverified") or ()),
        vial_sizes_IU=tuple(int(v) for v in spec.get("vial_sizes_IU") or ()),
        external_validation=tuple(
            dict(e) for e in spec.get("external_validation") or ()
        ),
        citation=_text(spec, "citation", product_id),
        vial_notes=spec.get("vial_notes"),
    )


def product_info(product: str) -> ProductInfo:
    """Display data of a product given by id or brand (see :func:`resolve_product`)."""
    pid = resolve_product(product)
    path = _model_dir() / f"{pid}.yaml"
    return _info(pid, path.stat().st_mtime_ns)


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def _names(pid: str) -> dict[str, str]:
    """Names a clinician may use for ``pid``: normalised form -> as written."""
    spec = _spec(pid)
    names = {_norm(pid): pid}
    brand = str(spec.get("brand") or "")
    for part in [brand, *brand.split("/")]:
        if part.strip():
            names[_norm(part)] = part.strip()
    inn = str(spec.get("inn") or "")
    if inn.strip():
        names[_norm(inn)] = inn.strip()
    return names


def resolve_product(text: str) -> str:
    """The library id named by ``text``: an id, a brand or an INN.

    Brands and INNs match in any case and spacing (``"ELOCTA"``, ``"humate p"``);
    an id matches as written (lower case), or in any case when it is no shared
    brand. A brand or INN shared by several entries (``"Alprolix"``: Diao 2014 and
    Koopman 2024; ``"octocog alfa"``) resolves by id only: the error lists the
    choices with their display names.

    Raises
    ------
    UnknownProductError
        (a ``ValueError``) for an unknown or ambiguous name, with a suggestion for
        a misspelling.
    """
    if not isinstance(text, str) or not text.strip():
        raise UnknownProductError(f"product: expected a product name, got {text!r}")
    ids = list_products()
    if text.strip() in ids:
        return text.strip()
    key = _norm(text)
    by_name: dict[str, set[str]] = {}
    written: dict[str, str] = {}
    for pid in ids:
        for k, w in _names(pid).items():
            by_name.setdefault(k, set()).add(pid)
            written.setdefault(k, w)
    hits = sorted(by_name.get(key, ()))
    if len(hits) == 1:
        return hits[0]
    if hits:
        listed = "; ".join(f"'{p}' = {product_info(p).display}" for p in hits)
        raise UnknownProductError(
            f"product: {text!r} names {len(hits)} library models; choose one by "
            f"id: {listed}",
            tuple(hits),
        )
    close = difflib.get_close_matches(
        text.strip().lower(), [w.lower() for w in written.values()], n=3, cutoff=0.6
    )
    sugg = sorted({p for c in close for p in by_name[_norm(c)]})
    hint = (
        (
            "; did you mean "
            + " or ".join(f"'{p}' ({product_info(p).display})" for p in sugg)
            + "?"
        )
        if sugg
        else ""
    )
    raise UnknownProductError(
        f"product: unknown product {text!r}{hint} Available: {', '.join(ids)}",
        tuple(sugg),
    )


def load_product(name: str) -> PopModel:
    """Load a library model by id or brand, e.g. ``load_product("kovaltry")``."""
    return load_model(_model_dir() / f"{resolve_product(name)}.yaml")


def _half_lives(model: PopModel) -> tuple[float, float]:
    """Typical terminal and effective (ln 2 Vss/CL) half-lives at the reference
    covariates, h (every covariate effect is 1 there)."""
    p = dict(zip(model.theta_names, model.theta_values, strict=True))
    cl, v1 = p["CL"], p["V1"]
    qs = [p[f"Q{i}"] for i in range(2, model.n_cmt + 1)]
    vs = [p[f"V{i}"] for i in range(2, model.n_cmt + 1)]
    k = np.zeros((model.n_cmt, model.n_cmt))
    k[0, 0] = -cl / v1
    for i, (q, v) in enumerate(zip(qs, vs, strict=True), start=1):
        k[0, 0] -= q / v1
        k[0, i], k[i, 0], k[i, i] = q / v, q / v1, -q / v
    lam = float(np.min(-np.linalg.eigvals(k).real))
    return math.log(2.0) / lam, math.log(2.0) * (v1 + sum(vs)) / cl


def products_table() -> list[dict[str, Any]]:
    """One row per product for a listing (``phems products``, the web page).

    Keys: ``id``, ``display``, ``factor``, ``half_life_class``, ``ages``, ``assay``,
    ``verified`` (no unverified section), ``unverified``, ``choose_when``,
    ``vial_sizes_IU``, typical ``terminal_half_life_h`` and
    ``effective_half_life_h`` at the model's reference covariates, ``default``.
    """
    rows = []
    for pid in list_products():
        info = product_info(pid)
        t_term, t_eff = _half_lives(load_product(pid))
        rows.append(
            {
                "id": pid,
                "display": info.display,
                "factor": info.factor,
                "half_life_class": info.half_life_class,
                "ages": info.ages,
                "assay": info.assay,
                "verified": not info.unverified,
                "unverified": list(info.unverified),
                "choose_when": info.choose_when,
                "vial_sizes_IU": list(info.vial_sizes_IU),
                "terminal_half_life_h": round(t_term, 1),
                "effective_half_life_h": round(t_eff, 1),
                "default": pid == DEFAULT_PRODUCT,
            }
        )
    return rows


__all__ = [
    "DEFAULT_PRODUCT",
    "ProductInfo",
    "UnknownProductError",
    "list_products",
    "load_product",
    "product_info",
    "products_table",
    "resolve_product",
]
