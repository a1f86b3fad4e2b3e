"""PICU: federated sepsis early warning (Phoenix sepsis onset within 6 h).

Each site builds its stays' hourly features and the standardisation is the
training sites' summed :class:`~phems_clinical.models.sepsis_features.
FeatureStats` (:func:`phems_clinical.evaluation.sepsis_eval.prepare_sites`);
FedAdam (default) minimises the hour-weighted logistic loss of
:func:`phems_clinical.models.sepsis.make_loss`; the alarm threshold maximises
the pooled CinC 2019 utility on the training data, as
:func:`phems_clinical.evaluation.sepsis_eval.cross_site_evaluation` does.
Scores on real held-out stays: AUROC, AUPRC, normalised utility (Reyna et al.,
Crit Care Med 2020;48:210), Brier score, calibration slope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from phems_clinical.evaluation import sepsis_eval as se
from phems_clinical.federation.registry import FEDOPT, build_fedopt
from phems_clinical.federation.strategies import objective_from_loss
from phems_clinical.models import sepsis as sm
from phems_clinical.models.scores import sepsis_onset
from phems_clinical.models.sepsis_features import build_site
from phems_clinical.runner.tasks import Fitted, Problem, Task

METRICS = ("auroc", "auprc", "utility", "brier", "calibration_slope")


class SepsisModel(NamedTuple):
    """``architecture`` logistic | tcn; label horizon (h); hours kept per stay;
    L2 penalty."""

    architecture: str = sm.LOGISTIC
    horizon_h: int = 6
    max_hours: int = 168
    l2: float = 1e-4


class Trained(NamedTuple):
    x: Any
    predict: Any
    stats: Any
    threshold: float


def _examples(hourly: pd.DataFrame, model: SepsisModel):
    return build_site(hourly, sepsis_onset(hourly), model=model.architecture,
                      horizon_h=model.horizon_h, max_hours=model.max_hours)


def problem(key, frames: Sequence[pd.DataFrame], strategy: str, model: SepsisModel
            ) -> Problem:
    named = {f"site_{k}": h for k, h in enumerate(frames)}
    sites = se.prepare_sites(named, {n: sepsis_onset(h) for n, h in named.items()},
                             held_out=[], model=model.architecture,
                             horizon_h=model.horizon_h, max_hours=model.max_hours)
    examples = [sites.test[n] for n in sites.train_names]
    used = sum(float(np.sum(e.data["w"])) for e in examples)
    stays = sum(float(np.sum(e.mask)) for e in examples)
    prev = sum(float(np.sum(e.data["y"] * e.data["w"])) for e in examples) / used
    x0, unravel = sm.init_params(key, sites.n_features, model.architecture,
                                 prior=min(max(prev, 1e-3), 0.5))
    loss = sm.make_loss(unravel, l2=model.l2, hours_norm=used / stays)
    objective = objective_from_loss(loss)

    def build(options: dict):
        opts = dict(options)
        alg = build_fedopt(strategy, objective, x0, opts, default_rounds=50,
                           learning_rate=0.05, local_steps=5)
        if opts:
            raise ValueError(f"inference.options for {strategy}: unknown "
                             f"{', '.join(sorted(opts))}")
        return alg

    predict = sm.make_predict(unravel)

    def finish(result: dict) -> Fitted:
        x = result["x"]
        probs = [np.asarray(predict(x, e)) for e in examples]
        thr, u = se.choose_threshold(probs, examples)
        return Fitted(Trained(x, predict, sites.stats, thr),
                      {"threshold": thr, "train_utility": u,
                       "intercept": float(unravel(x)["b"]) if model.architecture
                       == sm.LOGISTIC else float("nan")})

    return Problem(build, sites.train, finish)


def evaluate(fitted: Fitted, test: pd.DataFrame, model: SepsisModel
             ) -> dict[str, float]:
    t: Trained = fitted.model
    ex = sm.to_examples(_examples(test, model), t.stats)
    return {k: float(v) for k, v in se.evaluate_site(
        np.asarray(t.predict(t.x, ex)), ex, t.threshold).items()}


def model_from_config(spec: Mapping[str, Any]) -> SepsisModel:
    spec = dict(spec)
    unknown = sorted(set(spec) - set(SepsisModel._fields))
    if unknown:
        raise ValueError(f"model: unknown keys {unknown} for the sepsis model; "
                         f"expected some of {list(SepsisModel._fields)}")
    m = SepsisModel(**spec)
    if m.architecture not in (sm.LOGISTIC, sm.TCN):
        raise ValueError(f"model.architecture: {m.architecture!r} is not one of "
                         f"{sm.LOGISTIC!r}, {sm.TCN!r}")
    return m


TASK = Task(
    use_case="picu", strategy="fedadam", strategies=FEDOPT, metrics=METRICS,
    lower_is_better=frozenset({"brier"}),
    labels={"auroc": "AUROC of sepsis onset within 6 h", "auprc": "AUPRC",
            "utility": "CinC 2019 normalised utility", "brier": "Brier score",
            "calibration_slope": "calibration slope"},
    id_columns=("stay_id", "person_id", "visit_occurrence_id"),
    model_from_config=model_from_config,
    model_label=lambda m: f"sepsis {m.architecture}", problem=problem,
    evaluate=evaluate)
