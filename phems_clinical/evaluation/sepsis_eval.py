"""Federated training and cross-site evaluation of the sepsis models.

Workflow (:func:`cross_site_evaluation`): every site builds its stays' features
(:func:`phems_clinical.models.sepsis_features.build_site`); the training sites'
standardisation sums are added (a sum a secure aggregation could carry); the model
trains federatedly over the training sites with the generic FedOpt strategies
(:mod:`phems_clinical.federation.strategies`) through
:func:`phems_clinical.federation.engine.run_federated`; the alarm threshold is the
one maximising the pooled CinC 2019 normalised utility on the training sites (the
utility totals are sums, so sites can send them per candidate threshold); then each
training site and the held-out hospital are scored with AUROC, AUPRC, calibration
slope / intercept (calibration-in-the-large), ECE (10 equal-width bins), Brier
score and the normalised utility (Reyna et al., Crit Care Med 2020;48:210).

AUROC, AUPRC and calibration use the hours before onset (the horizon label); the
utility uses every hour of the stay (up to ``max_hours``) with the challenge's
label (1 from 6 h before onset).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical.evaluation import classification as cm
from phems_clinical.federation.engine import run_federated
from phems_clinical.federation.strategies import (
    Examples,
    fedadam,
    fedavg,
    objective_from_loss,
)
from phems_clinical.models import sepsis as sm
from phems_clinical.models.sepsis_features import (
    FeatureStats,
    build_site,
    feature_stats,
)

__all__ = [
    "SepsisSites",
    "choose_threshold",
    "cross_site_evaluation",
    "evaluate_site",
    "prepare_sites",
    "train_federated",
    "utility_totals",
]


class SepsisSites(NamedTuple):
    """Standardised examples of the training and held-out sites.

    train : padded to a common (n, T) (vmappable); test : {site: Examples}
    (unpadded) for every site, training sites included; stats : pooled training
    sums.
    """

    train: list[Examples]
    train_names: list[str]
    test: dict[str, Examples]
    stats: FeatureStats
    n_features: int


def prepare_sites(
    hourly_by_site: Mapping[str, Any],
    onset,
    *,
    held_out: Sequence[str],
    model: str = sm.LOGISTIC,
    horizon_h: int = 6,
    max_hours: int = 168,
    **feature_kw,
) -> SepsisSites:
    """Features and labels of every site; standardisation from the training sites'
    summed :class:`FeatureStats`.

    hourly_by_site : {site name: hourly table}; onset : Series per stay_id (all
        sites) or {site: Series}.
    """
    tensors = {}
    for name, df in hourly_by_site.items():
        o = onset[name] if isinstance(onset, Mapping) else onset
        tensors[name] = build_site(
            df, o, model=model, horizon_h=horizon_h, max_hours=max_hours, **feature_kw
        )
    train_names = [s for s in tensors if s not in set(held_out)]
    if not train_names:
        raise ValueError("held_out: every site is held out; none left to train on")
    stats = sum(
        (feature_stats(tensors[s]) for s in train_names[1:]),
        feature_stats(tensors[train_names[0]]),
    )
    test = {s: sm.to_examples(t, stats) for s, t in tensors.items()}
    train = [
        Examples(e.data, e.mask)
        for e in sm.pad_examples([test[s] for s in train_names])
    ]
    return SepsisSites(
        train,
        train_names,
        test,
        stats,
        int(next(iter(test.values())).data["x"].shape[-1]),
    )


def train_federated(
    key,
    loss,
    x0,
    sites: Sequence[Examples],
    *,
    algorithm: str = "fedadam",
    rounds: int = 50,
    local_steps: int = 5,
    learning_rate: float = 0.05,
    server_learning_rate: float = 0.02,
    run_kw: Mapping | None = None,
    **kw,
):
    """Train over the padded sites; returns the engine's ``FederatedRun`` (final
    parameters in ``run.server.x``).

    algorithm : ``"fedavg"`` (local SGD, server average) or ``"fedadam"`` (Adam on
        the server; Reddi et al., ICLR 2021). Local steps are full-batch over the
        site's stays.
    """
    obj = objective_from_loss(loss)
    if algorithm == "fedavg":
        alg = fedavg(
            obj,
            x0,
            learning_rate=learning_rate,
            local_steps=local_steps,
            max_rounds=rounds,
            **kw,
        )
    elif algorithm == "fedadam":
        alg = fedadam(
            obj,
            x0,
            learning_rate=learning_rate,
            server_learning_rate=server_learning_rate,
            local_steps=local_steps,
            max_rounds=rounds,
            **kw,
        )
    else:
        raise ValueError(
            f"algorithm: expected 'fedavg' or 'fedadam', got {algorithm!r}"
        )
    data = [
        Examples(jax.tree.map(jnp.asarray, s.data), jnp.asarray(s.mask)) for s in sites
    ]
    return run_federated(key, alg, data, **(run_kw or {}))


def _flat(probs, ex: Examples):
    """Per-hour arrays of the real stays: (stay index, prob, y, w, cinc label)."""
    probs = np.asarray(probs)
    present = np.asarray(ex.data["present"]) & np.asarray(ex.mask)[:, None]
    stay = np.broadcast_to(np.arange(present.shape[0])[:, None], present.shape)
    return (
        stay[present],
        probs[present],
        np.asarray(ex.data["y"])[present],
        np.asarray(ex.data["w"])[present] > 0,
        np.asarray(ex.data["sepsis_label"])[present],
    )


def utility_totals(probs, ex: Examples, thresholds) -> list[cm.UtilityTotals]:
    """CinC 2019 utility totals of one site for each candidate threshold (additive
    across sites)."""
    stay, p, _, _, lab = _flat(probs, ex)
    return [
        cm.cinc_utility_totals(stay, lab, (p >= t).astype(np.int64))
        for t in np.atleast_1d(thresholds)
    ]


def choose_threshold(
    probs_by_site: Sequence, sites: Sequence[Examples], thresholds=None
) -> tuple[float, float]:
    """The threshold maximising the pooled normalised utility over ``sites``
    (default grid: 99 quantiles of the pooled used-hour probabilities).
    Returns ``(threshold, normalised utility)``."""
    if thresholds is None:
        pooled = np.concatenate(
            [_flat(p, e)[1] for p, e in zip(probs_by_site, sites, strict=True)]
        )
        thresholds = np.unique(np.quantile(pooled, np.linspace(0.01, 0.99, 99)))
    totals = None
    for p, e in zip(probs_by_site, sites, strict=True):
        t = utility_totals(p, e, thresholds)
        totals = (
            t if totals is None else [a + b for a, b in zip(totals, t, strict=True)]
        )
    scores = np.array([t.normalised for t in totals])
    i = int(np.nanargmax(scores))
    return float(np.atleast_1d(thresholds)[i]), float(scores[i])


def evaluate_site(probs, ex: Examples, threshold: float) -> dict[str, float]:
    """All metrics of one site (see the module docstring)."""
    stay, p, y, w, lab = _flat(probs, ex)
    pw, yw = p[w], y[w]
    cal = cm.calibration_slope_intercept(yw, pw)
    return {
        "n_stays": int(np.asarray(ex.mask).sum()),
        "n_hours": int(w.sum()),
        "prevalence": float(yw.mean()) if yw.size else float("nan"),
        "auroc": cm.auroc(yw, pw),
        "auprc": cm.auprc(yw, pw),
        "calibration_slope": cal.slope,
        "calibration_intercept": cal.intercept,
        "ece": cm.expected_calibration_error(yw, pw),
        "brier": cm.brier_score(yw, pw),
        "utility": cm.cinc_normalised_utility(
            stay, lab, (p >= threshold).astype(np.int64)
        ),
    }


def cross_site_evaluation(
    key,
    hourly_by_site: Mapping[str, Any],
    onset,
    *,
    held_out: Sequence[str],
    model: str = sm.LOGISTIC,
    horizon_h: int = 6,
    max_hours: int = 168,
    l2: float = 1e-4,
    weighting: str = "hour",
    model_kw: Mapping | None = None,
    feature_kw: Mapping | None = None,
    **train_kw,
) -> dict[str, Any]:
    """Prepare, train federatedly, choose the threshold on the training sites and
    evaluate every site.

    weighting : ``"hour"`` (default): the pooled hour-level loss (stay sums divided
        by the training sites' mean used hours per stay, itself a ratio of sums),
        calibrated per hour; ``"stay"``: every stay's mean counts once.

    Returns ``{"x", "threshold", "train_utility", "metrics": {site: {...}},
    "probs": {site: (p, y)} (the hours scored by AUROC/calibration), "held_out",
    "seconds_train", "rounds", "privacy"}``; ``train_kw`` goes to
    :func:`train_federated` (``run_kw`` to the engine, e.g. ``on_round``)."""
    k_init, k_run = jax.random.split(key)
    sites = prepare_sites(
        hourly_by_site,
        onset,
        held_out=held_out,
        model=model,
        horizon_h=horizon_h,
        max_hours=max_hours,
        **(feature_kw or {}),
    )
    x0, unravel = sm.init_params(k_init, sites.n_features, model, **(model_kw or {}))
    if weighting == "hour":
        used = sum(float(np.sum(s.data["w"])) for s in sites.train)
        stays = sum(float(np.sum(s.mask)) for s in sites.train)
        loss = sm.make_loss(unravel, l2=l2, hours_norm=used / stays)
    elif weighting == "stay":
        loss = sm.make_loss(unravel, l2=l2)
    else:
        raise ValueError(f"weighting: expected 'hour' or 'stay', got {weighting!r}")
    t0 = time.perf_counter()
    run = train_federated(k_run, loss, x0, sites.train, **train_kw)
    x = run.server.x
    x.block_until_ready()
    seconds = time.perf_counter() - t0
    predict = sm.make_predict(unravel)
    probs = {s: np.asarray(predict(x, e)) for s, e in sites.test.items()}
    thr, u_train = choose_threshold(
        [probs[s] for s in sites.train_names],
        [sites.test[s] for s in sites.train_names],
    )
    metrics = {s: evaluate_site(probs[s], e, thr) for s, e in sites.test.items()}
    used = {s: _flat(probs[s], e) for s, e in sites.test.items()}
    return {
        "x": x,
        "threshold": thr,
        "train_utility": u_train,
        "metrics": metrics,
        "probs": {s: (p[w], y[w]) for s, (_, p, y, w, _) in used.items()},
        "held_out": list(held_out),
        "seconds_train": seconds,
        "rounds": run.rounds,
        "privacy": run.privacy,
    }
