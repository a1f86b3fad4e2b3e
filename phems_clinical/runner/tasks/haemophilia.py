"""Haemophilia: federated population PK, scored by the dosing tool's forecast.

The prior of ``phems dose`` is the population the federation fitted; each real
held-out patient's MAP estimate from their first 2 levels predicts their later
levels (:func:`phems_clinical.evaluation.utility.pk_forecast_accuracy`).
Strategies: every algorithm of :mod:`phems_clinical.federation.registry`
(federated FOCEI by default). Flower engine: :func:`flower_fitted` reads the
result of :func:`phems_clinical.runner.training.train_flower`.
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


def flower_fitted(result: Mapping[str, Any], settings, sums, model: PopModel
                  ) -> Fitted:
    """The :class:`Fitted` population of a Flower run's result JSON."""
    del settings, sums
    result = dict(result)
    if isinstance(result.get("params"), dict):  # PopParams, as JSON
        result["params"] = PopParams(**{k: np.asarray(v, float)
                                        for k, v in result["params"].items()})
    return _finish(model)(result)


def train_flower(key_seed: int, frames: Sequence[pd.DataFrame], strategy: str,
                 model: PopModel, options: Mapping[str, Any], folder: Path, *,
                 min_sites: int | None = None, secagg: bool = False
                 ) -> tuple[Fitted, int, bool]:
    """The fit over real Flower processes
    (:func:`phems_clinical.runner.training.train_flower`): returns the fit, rounds
    and whether it converged."""
    from phems_clinical.runner.training import FederationSettings
    from phems_clinical.runner.training import train_flower as train

    fitted, _, res = train(TASK, None, key_seed, frames, strategy, model,
                           FederationSettings("flower", strategy, dict(options),
                                              secagg, min_sites), folder)
    return fitted, int(res["rounds"]), bool(res["converged"])


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
    evaluate=evaluate, flower_fitted=flower_fitted)
