"""One experiment run, use case haemophilia (issue 7, section 2; first step).

For every data source (real, anonymised, synthetic...):

1. each training hospital splits its patients into training and held-out real
   patients (:func:`phems_clinical.evaluation.sources.split_patients`) and derives
   the source from its training patients, locally
   (:func:`phems_clinical.evaluation.sources.derive`);
2. the population model is fitted federatedly over the hospitals' derived data
   (federated FOCEI by default; only the algorithm's messages leave a site);
3. the dosing tool's forecast with that population as prior is scored on the
   held-out real patients of every training hospital and on every patient of the
   held-out hospital (:func:`phems_clinical.evaluation.utility.pk_forecast_accuracy`);
4. each training hospital scores its derived data (fidelity and privacy) against
   its own held-out patients (:func:`phems_clinical.evaluation.sources.score_sources`).

:func:`run_haemophilia` returns plain tables; :func:`to_dataset` makes the xarray
``results.nc`` with dims ``source``, ``site``, ``metric`` and the per-parameter
estimates over ``source`` x ``parameter``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
import xarray as xr

from phems_clinical.evaluation.sources import (
    SourceSpec,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.evaluation.utility import pk_forecast_accuracy
from phems_clinical.federation.engine import run_federated
from phems_clinical.federation.pk_sites import (
    cohorts_by_site,
    n_occasions_all,
    pad_sites,
)
from phems_clinical.federation.registry import build_algorithm, estimates_table
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel

FORECAST_METRICS = ("mdape", "mpe", "within20")


class SourceRun(NamedTuple):
    """What one source gave: estimates (NONMEM name -> value), forecast metrics per
    evaluation site, the per-site scorecards, rounds and whether it converged."""

    estimates: dict[str, float]
    forecast: dict[str, dict[str, float]]
    scorecards: dict[str, xr.Dataset]
    rounds: int
    converged: bool


def _save(run: SourceRun, folder: Path) -> None:
    """Write a finished source (scorecards as netCDF, the rest as JSON); the
    ``done.json`` marker is written last, so a half-written folder is not 'done'."""
    folder.mkdir(parents=True, exist_ok=True)
    for site, ds in run.scorecards.items():
        ds.to_netcdf(folder / f"scorecard_{site}.nc", engine="h5netcdf")
    (folder / "done.json").write_text(json.dumps({
        "estimates": run.estimates, "forecast": run.forecast,
        "sites": list(run.scorecards), "rounds": run.rounds,
        "converged": run.converged}))


def _load(folder: Path) -> SourceRun | None:
    done = folder / "done.json"
    if not done.exists():
        return None
    d = json.loads(done.read_text())
    cards = {s: xr.open_dataset(folder / f"scorecard_{s}.nc", engine="h5netcdf").load()
             for s in d["sites"]}
    return SourceRun(d["estimates"], d["forecast"], cards, d["rounds"],
                     d["converged"])


def _site_column(events: pd.DataFrame, site: str) -> pd.DataFrame:
    out = events.copy()
    out["SITE"] = site
    # ids must be unique across sites once the sites' cohorts are stacked
    out["ID"] = site + ":" + out["ID"].astype(str)
    return out


def run_haemophilia(key, sites: Mapping[str, pd.DataFrame], model: PopModel,
                    sources: Sequence[SourceSpec], *, holdout_site: str,
                    test_fraction: float = 0.5, algorithm: str = "fed_focei",
                    options: dict | None = None, n_attacks: int = 100,
                    progress: Callable[[str], None] | None = print,
                    checkpoint_dir: str | Path | None = None
                    ) -> dict[str, SourceRun]:
    """Federated population PK on each source, evaluated on real patients.

    ``sites``: each hospital's NONMEM-style events; ``holdout_site`` takes no part
    in training and is evaluated whole. With ``checkpoint_dir`` every finished
    source is saved there and the federated fit checkpoints every round, so an
    interrupted run called again with the same arguments skips the finished
    sources and resumes the fit it was in; the results equal an uninterrupted
    run's (tested).
    """
    if holdout_site not in sites:
        raise ValueError(f"holdout_site: {holdout_site!r} is not one of "
                         f"{sorted(sites)}")
    train_sites = [s for s in sites if s != holdout_site]
    if not train_sites:
        raise ValueError("need at least one training site besides the held-out one")
    k_split, k_derive, k_fed, k_score = jax.random.split(key, 4)
    split = {s: split_patients(jax.random.fold_in(k_split, i), sites[s],
                               "haemophilia", test_fraction)
             for i, s in enumerate(train_sites)}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    finished = {spec.name: _load(ckpt / spec.name) for spec in sources} if ckpt \
        else {}
    # every source is derived at every site before any training: a source that
    # cannot be produced (k too large, too few patients) fails here
    derived = {}
    for j, spec in enumerate(sources):
        if finished.get(spec.name) is not None:
            continue
        derived[spec.name] = {
            s: derive(jax.random.fold_in(jax.random.fold_in(k_derive, j), i),
                      "haemophilia", split[s][0], spec, pk_model=model)
            for i, s in enumerate(train_sites)}
        if progress:
            progress(f"derived {spec.name} at {len(train_sites)} sites")
    packer = build_packer(model)
    out: dict[str, SourceRun] = {}
    for j, spec in enumerate(sources):
        if finished.get(spec.name) is not None:
            out[spec.name] = finished[spec.name]
            if progress:
                progress(f"{spec.name}: finished in an earlier run, taken from "
                         f"{ckpt / spec.name}")
            continue
        per_site = derived[spec.name]
        if any(d.data is None for d in per_site.values()):
            raise ValueError(f"source {spec.name!r} gives patient profiles only "
                             f"({spec.method}); a PK model needs event data")
        events = pd.concat([_site_column(per_site[s].data, s) for s in train_sites],
                           ignore_index=True)
        names, cohorts = cohorts_by_site(events, model)
        alg = build_algorithm(algorithm, model, n_sites=len(cohorts),
                              n_occ=n_occasions_all(cohorts), options=options)

        n_sites = len(cohorts)

        def on_round(rec, server, name=spec.name, n_sites=n_sites):
            if progress and (rec.round + 1) % 10 == 0:
                progress(f"{name}: round {rec.round + 1}, sites "
                         f"{len(rec.participants)}/{n_sites}")

        run = run_federated(jax.random.fold_in(k_fed, j), alg, pad_sites(cohorts),
                            on_round=on_round,
                            checkpoint_dir=None if ckpt is None
                            else ckpt / spec.name / "federated")
        est = {k: v["estimate"] for k, v in
               estimates_table(model, run.result).items()}
        prior = (run.result["params"] if "params" in run.result
                 else packer.unpack(run.result["x"]))
        forecast = {}
        for s in train_sites:
            forecast[s] = pk_forecast_accuracy(prior, split[s][1], model)
        forecast[holdout_site] = pk_forecast_accuracy(prior, sites[holdout_site],
                                                      model)
        cards = {}
        for i, s in enumerate(train_sites):
            real = derive(k_derive, "haemophilia", split[s][0],
                          SourceSpec("real", "real"))
            cards[s] = score_sources(
                jax.random.fold_in(jax.random.fold_in(k_score, j), i), "haemophilia",
                split[s][0], split[s][1],
                [real] if spec.kind == "real" else [real, per_site[s]],
                n_attacks=n_attacks, utility=False)
        out[spec.name] = SourceRun(est, forecast, cards, int(run.rounds),
                                   bool(run.converged))
        if ckpt is not None:
            _save(out[spec.name], ckpt / spec.name)
        if progress:
            progress(f"{spec.name}: {run.rounds} rounds; forecast MDAPE at "
                     f"{holdout_site} {forecast[holdout_site]['mdape']:.1f} %")
    return out


def to_dataset(runs: Mapping[str, SourceRun], *, seed: int) -> xr.Dataset:
    """``results.nc``: ``forecast`` (source, site, metric), ``privacy`` and
    ``fidelity`` scorecard values (source, site, metric) and ``estimate``
    (source, parameter), with a ``seed`` coordinate."""
    sources = list(runs)
    sites = list(next(iter(runs.values())).forecast)
    fc = np.array([[[runs[s].forecast[site].get(m, np.nan) for m in FORECAST_METRICS]
                    for site in sites] for s in sources], float)
    params = list(next(iter(runs.values())).estimates)
    est = np.array([[runs[s].estimates.get(p, np.nan) for p in params]
                    for s in sources], float)
    card_sites = list(next(iter(runs.values())).scorecards)
    metrics: list[str] = []
    for r in runs.values():
        for ds in r.scorecards.values():
            metrics += [m for m in ds.metric.values.tolist() if m not in metrics]
    sc = np.full((len(sources), len(card_sites), len(metrics)), np.nan)
    for i, s in enumerate(sources):
        for j, site in enumerate(card_sites):
            ds = runs[s].scorecards[site]
            src = s if s in ds.source.values else "real"
            v = ds["value"].sel(source=src)
            for k, m in enumerate(metrics):
                if m in v.metric.values:
                    sc[i, j, k] = float(v.sel(metric=m))
    return xr.Dataset(
        {"forecast": (("source", "site", "forecast_metric"), fc),
         "scorecard": (("source", "training_site", "metric"), sc),
         "estimate": (("source", "parameter"), est),
         "rounds": (("source",), np.array([runs[s].rounds for s in sources])),
         "converged": (("source",), np.array([runs[s].converged for s in sources]))},
        coords={"source": sources, "site": sites, "forecast_metric":
                list(FORECAST_METRICS), "training_site": card_sites,
                "metric": metrics, "parameter": params, "seed": seed})
