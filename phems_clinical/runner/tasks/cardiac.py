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


def problem(key, frames: Sequence[pd.DataFrame], strategy: str,
            model: Mapping[str, Any]) -> Problem:
    del key  # deterministic start (zeros on the scaled parameters)
    ex, objective, x0, to_natural = ce.federated_objective(
        {f"site_{k}": f for k, f in enumerate(frames)}, **model)
    spec = ms.DEFAULT_SPEC
    names = [f"{spec.states[a]}->{spec.states[b]}:{c}" for a, b in spec.transitions
             for c in spec.covariates]

    def build(options: dict):
        opts = dict(options)
        lr = 0.1 if strategy == "fedadam" else 0.15
        alg = build_fedopt(strategy, objective, x0, opts, default_rounds=300,
                           learning_rate=lr, local_steps=1)
        if opts:
            raise ValueError(f"inference.options for {strategy}: unknown "
                             f"{', '.join(sorted(opts))}")
        return alg

    def finish(result: dict) -> Fitted:
        params = to_natural(result["x"])
        return Fitted(params, flat_estimates("log_hr", np.asarray(params.beta),
                                             names))

    return Problem(build, list(ex.values()), finish)


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
    problem=problem, evaluate=evaluate)
