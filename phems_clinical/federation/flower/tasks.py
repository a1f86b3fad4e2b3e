"""Which use case a Flower run fits: what a site reads, what it reports, what the
sites sum before and after training, and the algorithm both sides build.

A :class:`UseCase` is the site-side and server-side recipe the Flower apps run for
one use case (run config ``use-case``):

* ``read_site(site, settings)``: the site's own data from its folder (never
  anything else), e.g. a NONMEM-style ``cohort.csv`` (haemophilia);
* ``shape(local)``: the counts of the query round (declared in
  ``federation_message.schema.json``, ``$defs/<query>``); ``common(shapes,
  settings)`` the padded sizes every site uses (largest counts);
* ``before``: summed rounds before training (:class:`Stage`: population-level
  arrays, e.g. the feature standardisation sums of the PICU model), each declared
  in the message schema (``$defs/summary_<stage>``) and checked like a training
  payload, by the site before it sends and by the server on receipt; the server
  adds them in site order (or under secure aggregation only their sum exists);
* ``build(settings, common, sums)``: the :class:`~phems_clinical.federation.core.
  Algorithm` (the same on the server and every site); ``site_data`` the site's
  padded data for ``local_update``;
* ``after``: summed rounds on the trained model (e.g. the PICU alarm threshold
  from per-candidate utility totals), then ``conclude(settings, common, sums)``:
  what the server adds to the result.

Layering: haemophilia's recipe uses the federation and PK layers only and lives
here; the PICU and cardiac recipes compose models with the evaluation layer
(utility totals, multi-state design), so they live with their use case
(:mod:`phems_clinical.usecases.picu`, ``.cardiac``: attribute ``FLOWER``) and
the Flower apps, the deployment entry points, look them up by name at call time
(:func:`use_case`); nothing here imports them at module import.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any, NamedTuple

import numpy as np

from phems_clinical.federation.messages import (
    MessageRejected,
    check_query_reply,
    load_message_schema,
)

USE_CASES = ("haemophilia", "picu", "cardiac")
"""Use cases the Flower apps run (run config ``use-case``)."""

SUMMARY_ROUND = 1_000_000
"""Round number of the first summed round before training (the ``j``-th is
``SUMMARY_ROUND + j``; after training ``SUMMARY_ROUND + 1000 + j``): apart from
the training rounds in the messages, the SecAgg round ids and the sites' logs."""

SECAGG_BITS = 52
"""Quantisation bits of a summed round under secure aggregation (the finest the
codec allows, :mod:`phems_clinical.federation.secagg`)."""


class Stage(NamedTuple):
    """One summed round: every site sends ``site(...)`` (population-level arrays of
    shapes ``spec(settings, common)``), the server keeps their sum.

    name : the schema's ``$defs/summary_<name>``; clip : the public bound of every
    coordinate under secure aggregation (a site whose summand exceeds it refuses
    to send, by field name); site : ``(local, settings, common, sums, broadcast)
    -> {field: array}`` (``sums``: the earlier stages' sums by stage; ``broadcast``:
    after training, the algorithm's final broadcast, e.g. ``x``).
    """

    name: str
    spec: Callable[[Any, Mapping[str, int]], dict[str, tuple[int, ...]]]
    site: Callable[..., dict[str, np.ndarray]]
    clip: float


class UseCase(NamedTuple):
    """The Flower recipe of one use case (see the module docstring)."""

    name: str
    data_file: str
    query: str
    read_site: Callable[[Any, Any], Any]
    shape: Callable[[Any], dict[str, int]]
    size: Callable[[Any], int]
    common: Callable[[Sequence[Mapping[str, int]], Any], dict[str, int]]
    build: Callable[[Any, Mapping[str, int], Mapping[str, Any]], Any]
    site_data: Callable[[Any, Any, Mapping[str, int], Mapping[str, Any]], Any]
    tag: Callable[[Any, Mapping[str, int]], tuple[str, list]]
    before: tuple[Stage, ...] = ()
    after: tuple[Stage, ...] = ()
    conclude: Callable[[Any, Mapping[str, int], Mapping[str, Any]], dict] = (
        lambda settings, common, sums: {}
    )
    size_field: str = "n-sub"


def use_case(name: str) -> UseCase:
    """The recipe of ``name`` (``haemophilia``, ``picu``, ``cardiac``); an unknown
    name is refused naming the run config key."""
    if name == "haemophilia":
        return HAEMOPHILIA
    if name in USE_CASES:
        return importlib.import_module(f"phems_clinical.usecases.{name}").FLOWER
    raise ValueError(
        f"run config use-case: {name!r} is not one of {', '.join(USE_CASES)}"
    )


def model_options(settings) -> dict[str, Any]:
    """The run config ``model`` (a JSON object, '' = the use case's defaults)."""
    spec = json.loads(settings.model) if settings.model else {}
    if not isinstance(spec, dict):
        raise ValueError("run config model: expected a JSON object")
    return spec


def largest(
    shapes: Sequence[Mapping[str, int]], fields: Sequence[str]
) -> dict[str, int]:
    """The largest of each count over the sites (the padded sizes)."""
    return {f: max(int(s[f]) for s in shapes) for f in fields}


# ---------------------------------------------------------------- checks
def query_fields(uc: UseCase) -> tuple[str, ...]:
    """The counts of ``uc``'s query reply (besides ``site-index``), as declared in
    the message schema: the padded sizes the server broadcasts."""
    return tuple(f for f in _defs()[uc.query]["properties"] if f != "site-index")


def check_query(
    reply: Mapping[str, Any], uc: UseCase, num_sites: int
) -> dict[str, int]:
    """The query reply of ``uc`` as ``{field: int}`` (haemophilia:
    :func:`~phems_clinical.federation.messages.check_query_reply`; others: the
    schema's ``$defs/<uc.query>``). Errors name fields, never values."""
    if uc.query == "query_reply":
        return check_query_reply(reply, num_sites)
    props = _defs()[uc.query]["properties"]
    if not isinstance(reply, Mapping) or set(reply) != set(props):
        raise MessageRejected(
            f"{uc.name} query reply: expected exactly {', '.join(props)}"
        )
    out = {}
    for name, prop in props.items():
        v = reply[name]
        if (
            isinstance(v, bool)
            or not isinstance(v, int | np.integer)
            or v < prop["minimum"]
        ):
            raise MessageRejected(
                f"{uc.name} query reply {name}: expected an "
                f"integer >= {prop['minimum']}"
            )
        out[name] = int(v)
    if not out["site-index"] < num_sites:
        raise MessageRejected(f"query reply site-index: expected 0..{num_sites - 1}")
    return out


@cache
def _defs() -> dict:
    return load_message_schema()["$defs"]


def check_summary(
    stage: str, arrays: Mapping[str, Any], spec: Mapping[str, Sequence[int]]
) -> None:
    """Raise :class:`~phems_clinical.federation.messages.MessageRejected` unless
    ``arrays`` are exactly the fields of ``$defs/summary_<stage>``, float64 or
    float32, finite, with the schema's ranks and the shapes ``spec``."""
    try:
        declared = _defs()[f"summary_{stage}"]["properties"]
    except KeyError:
        raise MessageRejected(
            f"summary {stage!r}: not declared in federation_message.schema.json"
        ) from None
    if set(arrays) != set(declared) or set(spec) != set(declared):
        raise MessageRejected(
            f"summary {stage}: fields expected exactly {', '.join(sorted(declared))}"
        )
    for name, prop in declared.items():
        a = np.asarray(arrays[name])
        if str(a.dtype) not in ("float64", "float32"):
            raise MessageRejected(
                f"summary {stage}.{name}: dtype {a.dtype}, expected float64"
            )
        want = tuple(int(n) for n in spec[name])
        if len(want) != len(prop["x-shape"]) or a.shape != want:
            raise MessageRejected(
                f"summary {stage}.{name}: shape {a.shape}, "
                f"expected {want} (rank {len(prop['x-shape'])})"
            )
        if not np.all(np.isfinite(a)):
            raise MessageRejected(f"summary {stage}.{name}: expected finite values")


def check_clip(stage: Stage, arrays: Mapping[str, Any]) -> None:
    """Refuse (by field) a summand that secure aggregation would clip."""
    over = [n for n, v in arrays.items() if np.any(np.abs(np.asarray(v)) > stage.clip)]
    if over:
        raise ValueError(
            f"summary {stage.name}: field(s) {', '.join(sorted(over))} "
            f"exceed the secure-aggregation bound {stage.clip:g} of "
            f"this stage; the sum cannot be carried without clipping"
        )


# ------------------------------------------------- sums in a message record
def pack_sums(sums: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{stage: {field: array}}`` -> ``{"stage.field": float64 array}``."""
    return {
        f"{s}.{f}": np.asarray(v, np.float64)
        for s, fields in sums.items()
        for f, v in fields.items()
    }


def unpack_sums(flat: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of :func:`pack_sums`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in flat.items():
        stage, _, field = key.partition(".")
        out.setdefault(stage, {})[field] = np.asarray(v, np.float64)
    return out


def stage_round(uc: UseCase, stage: str) -> int:
    """The round number of a summed stage of ``uc``."""
    names = [s.name for s in uc.before]
    if stage in names:
        return SUMMARY_ROUND + names.index(stage)
    names = [s.name for s in uc.after]
    if stage in names:
        return SUMMARY_ROUND + 1000 + names.index(stage)
    raise MessageRejected(f"{uc.name}: no summed stage {stage!r}")


def find_stage(uc: UseCase, stage: str) -> Stage:
    for s in uc.before + uc.after:
        if s.name == stage:
            return s
    raise MessageRejected(f"{uc.name}: no summed stage {stage!r}")


# ------------------------------------------------------------ haemophilia
def _pk_read(site, settings):
    from phems_clinical.federation.flower.config import product_model, read_site_cohort

    return read_site_cohort(site, product_model(settings))


def _pk_shape(cohort) -> dict[str, int]:
    from phems_clinical.federation.flower.config import site_shape

    return site_shape(cohort)


def _pk_common(shapes, settings) -> dict[str, int]:
    common = largest(shapes, ("n-sub", "n-dose", "n-obs", "n-occ"))
    if settings.n_occ:
        common["n-occ"] = int(settings.n_occ)
    return common


def _pk_build(settings, common, sums):
    from phems_clinical.federation.flower.config import build_algorithm

    return build_algorithm(settings, n_occ=int(common["n-occ"]))


def _pk_data(cohort, settings, common, sums):
    from phems_clinical.federation.pk_sites import pad_cohort

    return pad_cohort(
        cohort, int(common["n-sub"]), int(common["n-dose"]), int(common["n-obs"])
    )


def _pk_tag(settings, common):
    from phems_clinical.federation.flower.config import algorithm_tag

    return algorithm_tag(settings, int(common["n-occ"]))


HAEMOPHILIA = UseCase(
    name="haemophilia",
    data_file="cohort.csv",
    query="query_reply",
    read_site=_pk_read,
    shape=_pk_shape,
    size=lambda c: int(c.n_subjects),
    common=_pk_common,
    build=_pk_build,
    site_data=_pk_data,
    tag=_pk_tag,
    size_field="n-sub",
)
"""Population PK: NONMEM-style ``cohort.csv``; the sites agree on the occasions in
the query round (largest count); no summed rounds."""


# --------------------------------------------------- a site's table on disk
_DATE_NAME = __import__("re").compile(r"(date|datetime|DATE|DAT)$")


def write_table(df, path) -> None:
    """A site's analysis table as CSV (floats to 17 significant digits, so they
    read back exactly), the file :func:`read_table` reads."""
    df.to_csv(path, index=False, float_format="%.17g")


def read_table(site, uc: UseCase):
    """A site's analysis table (CSV; ``*date``/``*datetime`` columns parsed as
    dates, as ``phems derive --csv`` reads an extract): ``data-file`` of its node
    config, else the use case's file."""
    import pandas as pd

    from phems_clinical.federation.flower.config import DATA_FILE

    name = site.data_file if site.data_file != DATA_FILE else uc.data_file
    path = site.site_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"site {site.site_index}: no {uc.name} table {path}")
    df = pd.read_csv(path, float_precision="round_trip")  # exact floats
    for c in df.columns:
        if _DATE_NAME.search(str(c)) and df[c].dtype == object:
            df[c] = pd.to_datetime(df[c], errors="raise")
    return df


def sums_digest(sums: Mapping[str, Mapping[str, Any]]) -> str:
    """SHA-256 of the summed arrays (part of a compiled program's cache key when
    the algorithm bakes them in)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(pack_sums(sums).items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:32]


__all__ = [
    "HAEMOPHILIA",
    "SECAGG_BITS",
    "SUMMARY_ROUND",
    "Stage",
    "USE_CASES",
    "UseCase",
    "check_clip",
    "check_query",
    "check_summary",
    "find_stage",
    "largest",
    "model_options",
    "pack_sums",
    "query_fields",
    "read_table",
    "stage_round",
    "sums_digest",
    "unpack_sums",
    "use_case",
    "write_table",
]
