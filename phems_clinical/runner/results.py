"""``results.nc``: one experiment run as an xarray Dataset.

=================  ==========================================  =====================
variable           dims                                        meaning
=================  ==========================================  =====================
``utility``        seed, source, site, utility_metric          the model trained on
                                                               each source, scored
                                                               on real held-out data
``scorecard``      seed, source, training_site, metric         privacy and fidelity
                                                               of each site's source
``estimate``       seed, source, parameter                     the model's estimates
``estimate_se``    seed, source, parameter                     their standard errors
                                                               (NaN: the fit gives
                                                               none)
``rounds``         seed, source                                federated rounds
``converged``      seed, source                                whether it converged
``train_epsilon``  seed, source                                DP ε of training
                                                               (NaN: not DP)
``train_delta``    seed, source                                its δ
=================  ==========================================  =====================

Every variable has ``long_name`` and ``units`` (:data:`VARIABLES`); per-element
units are the coordinates ``utility_unit`` and ``parameter_unit`` (the model's
units of the PK typical values, e.g. ``dL/h``; ``""``: not stated).
Coordinates: ``site_role`` (``held-out patients`` or ``held-out hospital``) on
``site``; per ``source`` its ``kind``, ``method``, data ``epsilon`` (the source's
own DP, e.g. MST; NaN: not DP) and ``stopped_by`` (why training
stopped). A multirun stacks runs along
``seed`` or along the swept settings (:mod:`phems_clinical.runner.collect`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from phems_clinical.evaluation.sources import SourceSpec
from phems_clinical.runner.pipeline import PipelineRun
from phems_clinical.usecases.task import Task


def held_out_site(ds: xr.Dataset) -> str:
    """The site of ``ds`` whose ``site_role`` is ``held-out hospital``."""
    roles = np.asarray(ds["site_role"].values)
    return str(np.asarray(ds["site"].values)[roles == "held-out hospital"][0])


def _union(lists) -> list[str]:
    out: list[str] = []
    for items in lists:
        out += [x for x in items if x not in out]
    return out


def to_dataset(
    run: PipelineRun,
    task: Task,
    sources: Sequence[SourceSpec],
    *,
    seed: int,
    parameter_units: Mapping[str, str] | None = None,
) -> xr.Dataset:
    """The Dataset of one run (see the module docstring); ``parameter_units``:
    ``{estimate name: unit}`` (:func:`phems_clinical.pk.spec.parameter_units`), the rest ``""``."""
    names = list(run.sources)
    sites = [*run.train_sites, run.holdout_site]
    metrics = list(task.metrics)
    ut = np.array(
        [
            [
                [run.sources[s].utility[site].get(m, np.nan) for m in metrics]
                for site in sites
            ]
            for s in names
        ],
        float,
    )
    params = _union(r.estimates for r in run.sources.values())
    est = np.array(
        [[run.sources[s].estimates.get(p, np.nan) for p in params] for s in names],
        float,
    )
    est_se = np.array(
        [[run.sources[s].se.get(p, np.nan) for p in params] for s in names], float
    )
    card_metrics = _union(c.metric.values.tolist() for c in run.scorecards.values())
    sc = np.full((len(names), len(run.train_sites), len(card_metrics)), np.nan)
    data_eps = np.full(len(names), np.nan)
    for j, site in enumerate(run.train_sites):
        card = run.scorecards[site]
        for i, s in enumerate(names):
            v = card["value"].sel(source=s)
            data_eps[i] = float(card["epsilon"].sel(source=s))
            for k, m in enumerate(card_metrics):
                if m in v.metric.values:
                    sc[i, j, k] = float(v.sel(metric=m))
    spec = {s.name: s for s in sources}
    dp = [run.sources[s].privacy for s in names]
    ds = xr.Dataset(
        {
            "utility": (("source", "site", "utility_metric"), ut),
            "scorecard": (("source", "training_site", "metric"), sc),
            "estimate": (("source", "parameter"), est),
            "estimate_se": (("source", "parameter"), est_se),
            "rounds": (("source",), np.array([run.sources[s].rounds for s in names])),
            "converged": (
                ("source",),
                np.array([run.sources[s].converged for s in names]),
            ),
            "train_epsilon": (
                ("source",),
                np.array([d.get("epsilon", np.nan) for d in dp], float),
            ),
            "train_delta": (
                ("source",),
                np.array([d.get("delta", np.nan) for d in dp], float),
            ),
        },
        coords={
            "source": names,
            "site": sites,
            "utility_metric": metrics,
            "training_site": run.train_sites,
            "metric": card_metrics,
            "parameter": params,
            "site_role": (
                "site",
                ["held-out patients"] * len(run.train_sites) + ["held-out hospital"],
            ),
            "kind": ("source", [spec[s].kind for s in names]),
            "method": ("source", [spec[s].method for s in names]),
            "epsilon": ("source", data_eps),
            "stopped_by": ("source", [run.sources[s].stopped_by for s in names]),
        },
    )
    ds["utility"].attrs["labels"] = "; ".join(f"{m}: {task.labels[m]}" for m in metrics)
    ds = ds.assign_coords(
        utility_unit=("utility_metric", [METRIC_UNITS.get(m, "") for m in metrics]),
        parameter_unit=(
            "parameter",
            [(parameter_units or {}).get(p, "") for p in params],
        ),
    )
    for name, (long_name, units) in VARIABLES.items():
        ds[name].attrs.update(long_name=long_name, units=units)
    return ds.expand_dims(seed=[int(seed)])


#: Units of the use cases' utility metrics (``"1"``: dimensionless; a share is a
#: fraction from 0 to 1); ``utility_unit`` is ``""`` for a metric not listed.
METRIC_UNITS = {
    "mdape": "%",
    "mpe": "%",
    "within20": "1",
    "auroc": "1",
    "auprc": "1",
    "utility": "1",
    "brier": "1",
    "calibration_slope": "1",
    "c_death": "1",
    "auc_cicu_gt7": "1",
    "brier_death_360d": "1",
    "brier_readmit_360d": "1",
}

#: ``long_name`` and ``units`` of every data variable of ``results.nc``; where
#: the unit differs along a dimension, ``units`` names the coordinate that holds
#: it per element (CF has no per-element units).
VARIABLES = {
    "utility": (
        "utility of the model trained on each source, on real held-out data",
        "see utility_unit",
    ),
    "scorecard": (
        "privacy and fidelity metric of each site's source",
        "see the scorecard's metric labels",
    ),
    "estimate": ("model estimate", "see parameter_unit"),
    "estimate_se": ("standard error of the estimate", "see parameter_unit"),
    "rounds": ("federated rounds", "1"),
    "converged": ("training converged (1) or not (0)", "1"),
    "train_epsilon": ("differential-privacy epsilon of training", "1"),
    "train_delta": ("differential-privacy delta of training", "1"),
}
