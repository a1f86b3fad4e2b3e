"""The runner's side of a use case: a :class:`Task` turns the training hospitals'
(derived) data into a federated problem and scores a fitted model on real
held-out data:

* ``problem(key, frames, strategy, model)`` -> :class:`Problem`: ``build(options)``
  makes the algorithm, ``sites`` are the padded per-site data, ``finish(result)``
  turns the algorithm's result into a :class:`Fitted` model;
* ``evaluate(fitted, test, model)`` -> metrics on one real test table.

=============  ===================================  ==========================
use case       model                                scores (first = headline)
=============  ===================================  ==========================
haemophilia    population PK (``configs/model``)    dosing-forecast MDAPE ...
picu           sepsis onset within 6 h (logistic)   AUROC, AUPRC, utility ...
cardiac        multi-state pathway model            C-index of death ...
=============  ===================================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from phems_clinical.federation.core import Algorithm


class Fitted(NamedTuple):
    """A trained model (``model``: what ``evaluate`` needs), its named estimates
    (``results.nc`` variable ``estimate``) and, where the fit gives them, their
    standard errors (``estimate_se``; e.g. federated FOCEI's R-based SEs)."""

    model: Any
    estimates: dict[str, float]
    se: dict[str, float] = {}


class Problem(NamedTuple):
    build: Callable[[dict], Algorithm]
    sites: list
    finish: Callable[[dict], Fitted]


class Task(NamedTuple):
    """One use case in the runner.

    strategy : the default federated strategy; strategies : those offered;
    metrics : evaluation metrics kept in ``results.nc`` (the first is the headline
        of figures and captions); lower_is_better : the metrics where lower is
        better; id_columns : made unique when sites' tables are stacked (the first is
    the unit a site counts: patient, stay, episode); model_label : a model's name
    for reports; flower_fitted : ``(result, run settings, sums, model) -> Fitted``
    of a Flower run's result JSON (:func:`phems_clinical.runner.training.
    train_flower`); flower_model : ``model -> (product, model JSON)`` of the
    Flower run config; check_flower_model : ``model -> None``, raising a
    ``ValueError`` naming ``model`` when the Flower apps would not fit it as
    configured (None: every model goes).
    """

    use_case: str
    strategy: str
    strategies: tuple[str, ...]
    metrics: tuple[str, ...]
    lower_is_better: frozenset[str]
    labels: Mapping[str, str]
    id_columns: tuple[str, ...]
    model_from_config: Callable[[Mapping[str, Any]], Any]
    model_label: Callable[[Any], str]
    problem: Callable[..., Problem]
    evaluate: Callable[[Fitted, pd.DataFrame, Any], dict[str, float]]
    flower_fitted: Callable[..., Fitted] | None = None
    flower_model: Callable[[Any], tuple[str, str]] | None = None
    check_flower_model: Callable[[Any], None] | None = None


def stack_sites(
    frames: Sequence[pd.DataFrame], id_columns: Sequence[str]
) -> pd.DataFrame:
    """Stack sites' tables with their ids kept apart: integer ids are offset past
    the previous sites' largest, other ids get a ``<site index>:`` prefix."""
    out, offsets = [], dict.fromkeys(id_columns, 0)
    for k, df in enumerate(frames):
        df = df.copy()
        for c in id_columns:
            if c not in df.columns:
                continue
            if pd.api.types.is_integer_dtype(df[c]):
                df[c] = df[c] + offsets[c]
                offsets[c] = int(df[c].max()) + 1 if len(df) else offsets[c]
            else:
                df[c] = f"{k}:" + df[c].astype(str)
        out.append(df)
    return pd.concat(out, ignore_index=True)


def flat_estimates(
    prefix: str, values, names: Sequence[str] | None = None
) -> dict[str, float]:
    """``{prefix[i]: value}`` (or ``prefix[name]``) of an array's entries."""
    v = np.asarray(values, float).ravel()
    keys = names if names is not None else [str(i) for i in range(v.size)]
    return {f"{prefix}[{k}]": float(x) for k, x in zip(keys, v, strict=True)}
