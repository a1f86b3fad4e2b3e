"""Haemophilia: federated population PK, scored by the dosing tool's forecast.

The prior of ``phems dose`` is the population the federation fitted; each real
held-out patient's MAP estimate from their first 2 levels predicts their later
levels (:func:`phems_clinical.evaluation.utility.pk_forecast_accuracy`).
Strategies: every algorithm of :mod:`phems_clinical.federation.registry`
(federated FOCEI by default). Flower engine: :func:`train_flower`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from phems_clinical.evaluation.utility import pk_forecast_accuracy
from phems_clinical.federation.pk_sites import (
    cohorts_by_site,
    n_occasions_all,
    pad_sites,
)
from phems_clinical.federation.registry import (
    ALGORITHMS,
    build_algorithm,
    estimates_table,
)
from phems_clinical.pk.model import PopParams
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel, parse_model
from phems_clinical.runner.tasks import Fitted, Problem, Task

METRICS = ("mdape", "mpe", "within20")


def _events(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    out = []
    for k, df in enumerate(frames):
        df = df.drop(columns="SITE", errors="ignore")
        # ids unique across sites once stacked; SITE keeps the sites apart
        out.append(df.assign(SITE=f"site_{k}", ID=f"{k}:" + df["ID"].astype(str)))
    return pd.concat(out, ignore_index=True)


def _finish(model: PopModel):
    packer = build_packer(model)

    def finish(result: dict) -> Fitted:
        prior = (result["params"] if "params" in result
                 else packer.unpack(np.asarray(result["x"])))
        est = {k: v["estimate"] for k, v in estimates_table(model, result).items()}
        return Fitted(prior, est)

    return finish


def problem(key, frames: Sequence[pd.DataFrame], strategy: str, model: PopModel
            ) -> Problem:
    del key  # the model's initial values are deterministic
    _, cohorts = cohorts_by_site(_events(frames), model)
    n_occ = n_occasions_all(cohorts)

    def build(options: dict):
        return build_algorithm(strategy, model, n_sites=len(cohorts), n_occ=n_occ,
                               options=options)

    return Problem(build, pad_sites(cohorts), _finish(model))


def evaluate(fitted: Fitted, test: pd.DataFrame, model: PopModel
             ) -> dict[str, float]:
    return pk_forecast_accuracy(fitted.model, test.drop(columns="SITE",
                                                        errors="ignore"), model)


def train_flower(key_seed: int, frames: Sequence[pd.DataFrame], strategy: str,
                 model: PopModel, options: Mapping[str, Any], folder: Path, *,
                 min_sites: int | None = None, secagg: bool = False
                 ) -> tuple[Fitted, int, bool]:
    """The same fit over real Flower processes on this machine (one SuperLink, one
    SuperNode per site; :func:`phems_clinical.federation.flower.launch.
    run_loopback`): each site's derived data go to ``folder/site_<k>/cohort.csv``,
    the node's only input. ``model`` must be a library product (the Flower apps
    load it by name). With ``secagg`` the payloads are summed with secure
    aggregation over Flower (:mod:`phems_clinical.federation.flower.
    secagg_transport`). Returns the fit, rounds and whether it converged."""
    import json

    from phems_clinical.federation.flower.config import DATA_FILE, RunSettings
    from phems_clinical.federation.flower.launch import run_loopback

    dirs = []
    for k, df in enumerate(frames):
        d = folder / "sites" / f"site_{k}"
        d.mkdir(parents=True, exist_ok=True)
        df.drop(columns="SITE", errors="ignore").to_csv(d / DATA_FILE, index=False,
                                                        float_format="%.17g")
        dirs.append(d)
    settings = RunSettings(seed=int(key_seed), algorithm=strategy,
                           product=model.name, rounds=int(options.get("rounds", 0)),
                           min_sites=int(min_sites or 0), secagg=bool(secagg),
                           options=json.dumps({k: v for k, v in options.items()
                                               if k != "rounds"}))
    res = run_loopback(dirs, folder / "flower", settings=settings)
    result = {k: (np.asarray(v) if isinstance(v, list) else v)
              for k, v in res["result"].items()}
    if isinstance(result.get("params"), dict):  # PopParams, as JSON
        result["params"] = PopParams(**{k: np.asarray(v, float)
                                        for k, v in result["params"].items()})
    return _finish(model)(result), int(res["rounds"]), bool(res["converged"])


def model_from_config(spec: Mapping[str, Any]) -> PopModel:
    return parse_model(dict(spec))


TASK = Task(
    use_case="haemophilia", strategy="fed_focei", strategies=ALGORITHMS,
    metrics=METRICS,
    lower_is_better=frozenset({"mdape"}),
    labels={"mdape": "forecast MDAPE (%)", "mpe": "forecast median bias (%)",
            "within20": "share of patients forecast within 20 %"},
    id_columns=("ID",), model_from_config=model_from_config,
    model_label=lambda m: m.name, problem=problem,
    evaluate=evaluate)
