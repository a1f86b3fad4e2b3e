"""Cardiac: federated multi-state model of paediatric cardiac surgical pathways.

Piecewise-exponential transition hazards with covariates (:mod:`phems_clinical.
models.multistate`), penalised likelihood minimised by FedAdam (default; it
reaches the pooled optimum, :mod:`phems_clinical.evaluation.cardiac_eval`).
Scores on real held-out episodes (:func:`~phems_clinical.evaluation.
cardiac_eval.evaluate`): Harrell's C of death by one year, AUROC of a CICU stay
over 7 days, IPCW Brier scores of death and readmission.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.federation.registry import FEDOPT, build_fedopt
from phems_clinical.models import multistate as ms
from phems_clinical.runner.tasks import Fitted, Problem, Task, flat_estimates

METRICS = ("c_death", "auc_cicu_gt7", "brier_death_360d", "brier_readmit_360d")


NAMES = [f"{ms.DEFAULT_SPEC.states[a]}->{ms.DEFAULT_SPEC.states[b]}:{c}"
         for a, b in ms.DEFAULT_SPEC.transitions for c in ms.DEFAULT_SPEC.covariates]


def _algorithm(strategy: str, options: dict, objective, x0):
    opts = dict(options)
    lr = 0.1 if strategy == "fedadam" else 0.15
    alg = build_fedopt(strategy, objective, x0, opts, default_rounds=300,
                       learning_rate=lr, local_steps=1)
    if opts:
        raise ValueError(f"inference.options for {strategy}: unknown "
                         f"{', '.join(sorted(opts))}")
    return alg


def _fitted(x, to_natural) -> Fitted:
    params = to_natural(x)
    return Fitted(params, flat_estimates("log_hr", np.asarray(params.beta), NAMES))


def problem(key, frames: Sequence[pd.DataFrame], strategy: str,
            model: Mapping[str, Any]) -> Problem:
    del key  # deterministic start (zeros on the scaled parameters)
    ex, objective, x0, to_natural = ce.federated_objective(
        {f"site_{k}": f for k, f in enumerate(frames)}, **model)

    def build(options: dict):
        return _algorithm(strategy, options, objective, x0)

    def finish(result: dict) -> Fitted:
        return _fitted(result["x"], to_natural)

    return Problem(build, list(ex.values()), finish)


# ------------------------------------------------------------------ Flower
def _settings_model(settings) -> dict[str, Any]:
    from phems_clinical.federation.flower.tasks import model_options

    return model_from_config(model_options(settings))


def _fl_read(site, settings):
    from phems_clinical.federation.flower.tasks import read_table

    return read_table(site, FLOWER)


def _fl_examples(df, common):
    from phems_clinical.federation.strategies import Examples

    e = ms.site_examples(df, ms.DEFAULT_SPEC, n_pad=int(common["n-episodes"]))
    return Examples(e.data, e.mask)


def _fl_stats(df, settings, common, sums, broadcast):
    e = _fl_examples(df, common)
    return {k: np.asarray(v, np.float64) for k, v in ms.scaling_totals(
        ms.EpisodeExamples(e.data, e.mask), ms.DEFAULT_SPEC).items()}


def _fl_objective(settings, sums):
    """``(objective, x0, to_natural)`` from the summed scaling totals, as
    :func:`phems_clinical.evaluation.cardiac_eval.federated_objective`."""
    import jax.numpy as jnp

    from phems_clinical.federation.strategies import objective_from_loss

    model = _settings_model(settings)
    totals = {k: jnp.asarray(v) for k, v in sums["cardiac_stats"].items()}
    scaling = ms.scaling_from_totals(totals)
    kw = {k: model[k] for k in ("ridge", "prior_sd_alpha") if k in model}
    loss, x0, to_natural = ms.make_loss(
        ms.DEFAULT_SPEC, ridge=kw.get("ridge", 1e-3), scaling=scaling,
        prior_sd_alpha=kw.get("prior_sd_alpha", 3.0),
        prior_mean_alpha=float(np.log(0.05)), n_total=float(totals["n"]))
    return objective_from_loss(loss), x0, to_natural


def _fl_build(settings, common, sums):
    import json

    objective, x0, _ = _fl_objective(settings, sums)
    return _algorithm(settings.algorithm,
                      json.loads(settings.options) if settings.options else {},
                      objective, x0)


def flower_fitted(result: Mapping[str, Any], settings, sums, model=None
                  ) -> Fitted:
    """The :class:`Fitted` model of a Flower run's result (``x``) and its summed
    scaling totals."""
    import jax.numpy as jnp

    return _fitted(jnp.asarray(result["x"], jnp.float64),
                   _fl_objective(settings, sums)[2])


def _flower():
    from phems_clinical.federation.flower.tasks import Stage, UseCase, largest

    K, J, P = ms.DEFAULT_SPEC.dims
    # SecAgg bound 1e7 (events, episode-days of exposure per cell): 52-bit steps
    # of 4.4e-9, small against the shrinkage of an empty cell's log rate; a site
    # whose totals exceed it refuses to send, naming the field
    stats = Stage("cardiac_stats",
                  lambda settings, common: {"D": (K, J), "E": (K, J), "Dx": (K, P),
                                            "Dx2": (K, P), "n": ()},
                  _fl_stats, clip=1e7)
    return UseCase(
        name="cardiac", data_file="sojourns.csv", query="query_reply_cardiac",
        read_site=_fl_read,
        shape=lambda df: {"n-episodes": int(df.episode_id.nunique())},
        size=lambda df: int(df.episode_id.nunique()),
        common=lambda shapes, settings: largest(shapes, ("n-episodes",)),
        build=_fl_build,
        site_data=lambda df, settings, common, sums: _fl_examples(df, common),
        tag=lambda settings, common: (f"cardiac|{settings.algorithm}|"
                                      f"options={settings.options}|"
                                      f"model={settings.model}", []),
        before=(stats,), size_field="n-episodes")


def evaluate(fitted: Fitted, test: pd.DataFrame, model: Mapping[str, Any]
             ) -> dict[str, float]:
    del model
    return {k: float(v) for k, v in ce.evaluate(fitted.model, test).items()}


def model_from_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Penalties of the multi-state fit: ``ridge`` (log hazard ratios),
    ``prior_sd_alpha`` (baseline log-hazards)."""
    spec = dict(spec)
    unknown = sorted(set(spec) - {"ridge", "prior_sd_alpha"})
    if unknown:
        raise ValueError(f"model: unknown keys {unknown} for the multi-state model; "
                         f"expected some of ['ridge', 'prior_sd_alpha']")
    return spec


TASK = Task(
    use_case="cardiac", strategy="fedadam", strategies=FEDOPT, metrics=METRICS,
    lower_is_better=frozenset({"brier_death_360d", "brier_readmit_360d"}),
    labels={"c_death": "C-index of death by 1 year",
            "auc_cicu_gt7": "AUROC of a CICU stay > 7 days",
            "brier_death_360d": "Brier score of death by 1 year",
            "brier_readmit_360d": "Brier score of readmission by 1 year"},
    id_columns=("episode_id", "person_id"), model_from_config=model_from_config,
    model_label=lambda m: "multi-state pathways",
    problem=problem, evaluate=evaluate, flower_fitted=flower_fitted)

FLOWER = _flower()
"""The cardiac recipe of the Flower apps (:mod:`phems_clinical.federation.flower.
tasks`): a site reads its sojourn table (``sojourns.csv``); the summed round before
training carries the scaling totals of the multi-state model."""
