"""PICU: federated sepsis early warning (Phoenix sepsis onset within 6 h).

Analysis table: one row per ICU stay-hour (:func:`phems_clinical.data.picu.
hourly_table` from each site's OMOP database); profile: one row per ICU stay
(:func:`phems_clinical.evaluation.profiles.picu_profile`); synthetic data: stay
sequences (:mod:`phems_clinical.privacy.synth.picu_sequences`).

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

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from phems_clinical.data.picu import hourly_table
from phems_clinical.evaluation import sepsis_eval as se
from phems_clinical.evaluation import utility as ut
from phems_clinical.evaluation.profiles import picu_profile
from phems_clinical.federation.registry import FEDOPT, build_fedopt
from phems_clinical.federation.strategies import objective_from_loss
from phems_clinical.models import sepsis as sm
from phems_clinical.models.scores import sepsis_onset
from phems_clinical.models.sepsis_features import build_site
from phems_clinical.privacy.hierarchies import paediatric_age, suppress_only
from phems_clinical.privacy.perturb import LongitudinalRoles, ValueColumn
from phems_clinical.privacy.release import Roles
from phems_clinical.usecases.base import PLOT_SITE, UseCase
from phems_clinical.usecases.omop_sites import load_site, report_json, site_databases
from phems_clinical.usecases.task import Fitted, Problem, Task

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
    return build_site(
        hourly,
        sepsis_onset(hourly),
        model=model.architecture,
        horizon_h=model.horizon_h,
        max_hours=model.max_hours,
    )


THRESHOLDS = 1.0 / (
    1.0 + np.exp(-np.linspace(np.log(1e-4 / (1 - 1e-4)), np.log(0.99 / 0.01), 999))
)
"""Public candidate alarm thresholds (999, equally spaced in logit from 1e-4 to
0.99): every site sends its CinC utility totals at each (sums), and the pooled
normalised utility is maximised over them -- no prediction leaves a site."""


def _algorithm(
    key,
    strategy: str,
    options: dict,
    n_features: int,
    model: SepsisModel,
    hours: float,
    stays: float,
    positive_hours: float,
):
    """FedOpt over the hour-weighted loss, from the summed hours, stays and
    positive hours (the output bias starts at the pooled prevalence); returns
    ``(algorithm, unravel)``."""
    prev = positive_hours / hours
    x0, unravel = sm.init_params(
        key, n_features, model.architecture, prior=min(max(prev, 1e-3), 0.5)
    )
    loss = sm.make_loss(unravel, l2=model.l2, hours_norm=hours / stays)
    opts = dict(options)
    alg = build_fedopt(
        strategy,
        objective_from_loss(loss),
        x0,
        opts,
        default_rounds=50,
        learning_rate=0.05,
        local_steps=5,
    )
    if opts:
        raise ValueError(
            f"inference.options for {strategy}: unknown {', '.join(sorted(opts))}"
        )
    return alg, unravel


def _site_sums(ex) -> dict[str, float]:
    """A site's hours, stays and positive hours (population-level sums)."""
    return {
        "hours": float(np.sum(ex.data["w"])),
        "stays": float(np.sum(ex.mask)),
        "positive_hours": float(np.sum(ex.data["y"] * ex.data["w"])),
    }


def _utility_totals(probs, ex) -> dict[str, np.ndarray]:
    """A site's CinC utility totals at each of :data:`THRESHOLDS`."""
    t = se.utility_totals(probs, ex, THRESHOLDS)
    return {
        "observed": np.array([u.observed for u in t], np.float64),
        "best": np.asarray(t[0].best, np.float64),
        "inaction": np.asarray(t[0].inaction, np.float64),
    }


def _choose_threshold(sums: dict[str, np.ndarray]) -> tuple[float, float]:
    """The candidate maximising the pooled normalised utility
    ``(U - U_inaction) / (U_best - U_inaction)`` (Reyna et al. 2020) from the summed
    totals: ``(threshold, normalised utility)``."""
    den = float(sums["best"]) - float(sums["inaction"])
    scores = (
        (np.asarray(sums["observed"]) - float(sums["inaction"])) / den
        if den != 0
        else np.full(len(THRESHOLDS), np.nan)
    )
    i = int(np.nanargmax(scores))
    return float(THRESHOLDS[i]), float(scores[i])


def _fitted(
    x, unravel, stats, threshold: float, utility: float, model: SepsisModel
) -> Fitted:
    return Fitted(
        Trained(x, sm.make_predict(unravel), stats, threshold),
        {
            "threshold": threshold,
            "train_utility": utility,
            "intercept": float(unravel(x)["b"])
            if model.architecture == sm.LOGISTIC
            else float("nan"),
        },
    )


def problem(
    key, frames: Sequence[pd.DataFrame], strategy: str, model: SepsisModel
) -> Problem:
    named = {f"site_{k}": h for k, h in enumerate(frames)}
    sites = se.prepare_sites(
        named,
        {n: sepsis_onset(h) for n, h in named.items()},
        held_out=[],
        model=model.architecture,
        horizon_h=model.horizon_h,
        max_hours=model.max_hours,
    )
    examples = [sites.test[n] for n in sites.train_names]
    per_site = [_site_sums(e) for e in examples]
    total = {k: sum(s[k] for s in per_site) for k in per_site[0]}
    _, unravel = _algorithm(key, strategy, {}, sites.n_features, model, **total)

    def build(options: dict):
        return _algorithm(key, strategy, options, sites.n_features, model, **total)[0]

    predict = sm.make_predict(unravel)

    def finish(result: dict) -> Fitted:
        x = result["x"]
        per = [_utility_totals(np.asarray(predict(x, e)), e) for e in examples]
        summed = {k: sum(p[k] for p in per) for k in per[0]}
        thr, u = _choose_threshold(summed)
        return _fitted(x, unravel, sites.stats, thr, u, model)

    return Problem(build, sites.train, finish)


def evaluate(
    fitted: Fitted, test: pd.DataFrame, model: SepsisModel
) -> dict[str, float]:
    t: Trained = fitted.model
    ex = sm.to_examples(_examples(test, model), t.stats)
    return {
        k: float(v)
        for k, v in se.evaluate_site(
            np.asarray(t.predict(t.x, ex)), ex, t.threshold
        ).items()
    }


def model_from_config(spec: Mapping[str, Any]) -> SepsisModel:
    spec = dict(spec)
    unknown = sorted(set(spec) - set(SepsisModel._fields))
    if unknown:
        raise ValueError(
            f"model: unknown keys {unknown} for the sepsis model; "
            f"expected some of {list(SepsisModel._fields)}"
        )
    m = SepsisModel(**spec)
    if m.architecture not in (sm.LOGISTIC, sm.TCN):
        raise ValueError(
            f"model.architecture: {m.architecture!r} is not one of "
            f"{sm.LOGISTIC!r}, {sm.TCN!r}"
        )
    return m


# ------------------------------------------------------------------ Flower
def _settings_model(settings) -> SepsisModel:
    from phems_clinical.federation.flower.tasks import model_options

    return model_from_config(model_options(settings))


def _n_features(model: SepsisModel) -> int:
    from phems_clinical.models.sepsis_features import feature_names

    return len(feature_names(model.architecture))


def _fl_read(site, settings):
    from phems_clinical.federation.flower.tasks import read_table

    return _examples(read_table(site, FLOWER), _settings_model(settings))


def _fl_stats(tensors, settings, common, sums, broadcast):
    from phems_clinical.models.sepsis_features import feature_stats

    fs = feature_stats(tensors)
    return {
        "count": fs.count,
        "total": fs.total,
        "total_sq": fs.total_sq,
        **{
            k: np.asarray(v) for k, v in _site_sums(sm.to_examples(tensors, fs)).items()
        },
    }


def _stats(sums):
    from phems_clinical.models.sepsis_features import FeatureStats

    st = sums["picu_stats"]
    return FeatureStats(
        *(np.asarray(st[k], np.float64) for k in ("count", "total", "total_sq"))
    )


def _fl_algorithm(settings, sums):
    import json

    import jax

    st = sums["picu_stats"]
    model = _settings_model(settings)
    return _algorithm(
        jax.random.key(settings.seed),
        settings.algorithm,
        json.loads(settings.options) if settings.options else {},
        _n_features(model),
        model,
        hours=float(st["hours"]),
        stays=float(st["stays"]),
        positive_hours=float(st["positive_hours"]),
    )


def _fl_data(tensors, settings, common, sums):
    from phems_clinical.federation.strategies import Examples

    ex = sm.to_examples(tensors, _stats(sums))
    padded = sm.pad_examples([ex], n=int(common["n-stays"]), T=int(common["n-hours"]))[
        0
    ]
    return Examples(padded.data, padded.mask)


def _fl_threshold(tensors, settings, common, sums, broadcast):
    import jax
    import jax.numpy as jnp

    model = _settings_model(settings)
    _, unravel = sm.init_params(
        jax.random.key(0), _n_features(model), model.architecture
    )  # the structure only
    ex = sm.to_examples(tensors, _stats(sums))
    probs = np.asarray(sm.make_predict(unravel)(jnp.asarray(broadcast["x"]), ex))
    return _utility_totals(probs, ex)


def _fl_tag(settings, common):
    return (
        f"picu|{settings.algorithm}|seed={settings.seed}|"
        f"options={settings.options}|model={settings.model}",
        [],
    )


def flower_fitted(result: Mapping[str, Any], settings, sums, model=None) -> Fitted:
    """The :class:`Fitted` model of a Flower run's result (``x``, ``threshold``,
    ``train_utility``) and its summed statistics."""
    import jax.numpy as jnp

    _, unravel = _fl_algorithm(settings, sums)
    return _fitted(
        jnp.asarray(result["x"], jnp.float64),
        unravel,
        _stats(sums),
        float(result["threshold"]),
        float(result["train_utility"]),
        _settings_model(settings),
    )


def _flower():
    from phems_clinical.federation.flower.tasks import Stage, UseCase, largest

    stats = Stage(
        "picu_stats",
        lambda settings, common: {
            **dict.fromkeys(
                ("count", "total", "total_sq"),
                (_n_features(_settings_model(settings)),),
            ),
            **dict.fromkeys(("hours", "stays", "positive_hours"), ()),
        },
        _fl_stats,
        clip=1e13,
    )
    threshold = Stage(
        "picu_threshold",
        lambda settings, common: {
            "observed": (len(THRESHOLDS),),
            "best": (),
            "inaction": (),
        },
        _fl_threshold,
        clip=1e9,
    )

    def conclude(settings, common, sums):
        thr, u = _choose_threshold(sums["picu_threshold"])
        return {"threshold": thr, "train_utility": u}

    return UseCase(
        name="picu",
        data_file="hourly.csv",
        query="query_reply_picu",
        read_site=_fl_read,
        shape=lambda t: {
            "n-stays": int(t.stay_id.shape[0]),
            "n-hours": int(t.x.shape[1]),
        },
        size=lambda t: int(t.stay_id.shape[0]),
        common=lambda shapes, settings: largest(shapes, ("n-stays", "n-hours")),
        build=lambda settings, common, sums: _fl_algorithm(settings, sums)[0],
        site_data=_fl_data,
        tag=_fl_tag,
        before=(stats,),
        after=(threshold,),
        conclude=conclude,
        size_field="n-stays",
    )


TASK = Task(
    use_case="picu",
    strategy="fedadam",
    strategies=FEDOPT,
    metrics=METRICS,
    lower_is_better=frozenset({"brier"}),
    labels={
        "auroc": "AUROC of sepsis onset within 6 h",
        "auprc": "AUPRC",
        "utility": "CinC 2019 normalised utility",
        "brier": "Brier score",
        "calibration_slope": "calibration slope",
    },
    id_columns=("stay_id", "person_id", "visit_occurrence_id"),
    model_from_config=model_from_config,
    model_label=lambda m: f"sepsis {m.architecture}",
    problem=problem,
    evaluate=evaluate,
    flower_fitted=flower_fitted,
    flower_model=lambda m: ("", json.dumps(m._asdict())),
)

FLOWER = _flower()
"""The PICU recipe of the Flower apps (:mod:`phems_clinical.federation.flower.
tasks`): a site reads its hourly table (``hourly.csv``); the summed round before
training carries the standardisation sums, hours, stays and positive hours; after
training the utility totals at :data:`THRESHOLDS` choose the alarm threshold."""


# ------------------------------------------------------------ data and sources
ROLES = Roles(
    use_case="picu",
    patient_id="person_id",
    identifiers=("person_id", "stay_id"),
    quasi_identifiers={
        "age_months": lambda: paediatric_age("months", "age_months"),
        "sex": lambda: suppress_only("sex"),
    },
    sensitive=("died",),
    sensitive_rule={"died": "max"},
    longitudinal=LongitudinalRoles(
        course="stay_id",
        time_unit="h",
        values={
            **{
                c: ValueColumn("additive", lower=0.0, upper=hi, resolution=1.0)
                for c, hi in (
                    ("hr", 300.0),
                    ("resp_rate", 150.0),
                    ("sbp", 300.0),
                    ("dbp", 300.0),
                    ("map", 300.0),
                    ("spo2", 100.0),
                )
            },
            "temp": ValueColumn("additive", lower=25.0, upper=45.0, resolution=0.1),
            **{
                c: ValueColumn("multiplicative", lower=0.0, resolution=r)
                for c, r in (
                    ("lactate", 0.1),
                    ("platelets", 1.0),
                    ("inr", 0.01),
                    ("d_dimer", 0.01),
                    ("fibrinogen", 1.0),
                    ("glucose", 1.0),
                    ("anc", 0.01),
                    ("alc", 0.01),
                    ("wbc", 0.1),
                    ("creatinine", 0.01),
                    ("bilirubin", 0.1),
                    ("alt", 1.0),
                    ("pao2", 1.0),
                    ("paco2", 1.0),
                )
            },
        },
    ),
)

#: Public bounds of the profile columns (clinical ranges, never read from data).
PROFILE_BOUNDS = {
    "age_months": (0, 216, 24, "log1p"),
    "sex": ["F", "M"],
    "los_hours": (1, 336, 16, "log1p"),
    "died": [0, 1],
    "hr_mean": (40, 220, 18),
    "lactate_max": (0, 20, 12, "log1p"),
    "spo2_min": (50, 100, 10),
    "imv_hours": (0, 336, 12, "log1p"),
    "vasoactive_hours": (0, 336, 12, "log1p"),
    "culture": [0, 1],
}


def synthesise(
    key, data: pd.DataFrame, options: Mapping[str, Any], model=None, params=None
) -> tuple[pd.DataFrame, dict]:
    """Synthetic ICU stays (``options["n"]``, default as many as ``data``)."""
    del model, params
    from phems_clinical.privacy.synth import picu_sequences as ps

    fitted = ps.fit_picu_sequences(data)
    n = int(options.get("n") or data["stay_id"].nunique())
    return ps.sample_picu_sequences(key, fitted, n), {"n": n}


def utility(
    key,
    source: pd.DataFrame,
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    model=None,
    reference=None,
) -> dict[str, float]:
    """The sepsis model trained on ``source``, scored on the real holdout."""
    del train, model, reference
    return ut.sepsis_utility(key, source, holdout)


def load_sites(
    omop: str | Path,
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.Series], dict[str, Any]]:
    """Each site's hourly table, Phoenix onsets (hour per stay_id, NaN = none) and
    load report."""
    hourly, onsets, reports = {}, {}, {}
    for site, db in site_databases(omop).items():
        tables, report = load_site(db)
        h = hourly_table(tables, site=site)
        if h.empty:
            raise ValueError(f"site {site}: no ICU stay with hourly data in {db}")
        onset = sepsis_onset(h)
        hourly[site], onsets[site] = h, onset
        reports[site] = {
            **report_json(report),
            "stays": int(h["stay_id"].nunique()),
            "hours": len(h),
            "phoenix_sepsis_stays": int(np.isfinite(onset).sum()),
        }
    return hourly, onsets, reports


def load(omop, model=None) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Each site's hourly table and load report."""
    del model
    hourly, _, reports = load_sites(omop)
    return hourly, reports


def _site_mixes(n_sites: int) -> dict[str, dict]:
    from phems_clinical.data.picu import DEFAULT_SITES

    mixes = list(DEFAULT_SITES.items())
    return {f"{mixes[i % 3][0]}_{i + 1}": mixes[i % 3][1] for i in range(n_sites)}


def site_names(n_sites: int) -> list[str]:
    """Sites cycle through the simulator's case mixes (tertiary, surgical,
    district)."""
    return list(_site_mixes(n_sites))


def simulate(key, n_sites: int, n_per_site: int, model=None) -> dict:
    """``n_sites`` hospitals of ``n_per_site`` stays as OMOP tables."""
    del model
    from phems_clinical.data.picu import simulate_sites

    spec = {
        s: {**cfg, "n_stays": n_per_site} for s, cfg in _site_mixes(n_sites).items()
    }
    return {s: c.tables for s, c in simulate_sites(key, spec).items()}


def simulate_default(key, n: int | None, product: str = "") -> dict:
    """The simulator's default hospitals (``n`` stays each when given), with the
    simulator's truth."""
    del product
    from phems_clinical.data.picu import DEFAULT_SITES, simulate_sites

    sites = {
        name: {**cfg, **({"n_stays": n} if n else {})}
        for name, cfg in DEFAULT_SITES.items()
    }
    return {name: (c.tables, c.truth) for name, c in simulate_sites(key, sites).items()}


#: Hours-since-admission bins of the trajectory figure.
HOUR_EDGES = (0, 6, 12, 18, 24, 36, 48, 72, 96, 120, 168)


def _trajectories(tables: Mapping[str, pd.DataFrame]) -> tuple[bytes, str]:
    from phems_clinical.evaluation.plots import band_figure

    png = band_figure(
        tables,
        "hour",
        ["hr", "lactate"],
        edges=HOUR_EDGES,
        unit=(PLOT_SITE, "stay_id"),
        xlabel="hours since PICU admission",
        ylabels=["heart rate (/min)", "lactate (mmol/L)"],
        log_y=[False, True],
    )
    return png, (
        "Heart rate and lactate over the stay, each source's stays pooled "
        "over the training hospitals: median per time bin and the 10-90 % "
        "band of the recorded values (bins with fewer than 5 stays are "
        "left out; no single value is drawn)."
    )


def _covariates(tables: Mapping[str, pd.DataFrame]) -> tuple[bytes, str]:
    from phems_clinical.evaluation.plots import covariate_figure, edges_from_bounds

    png = covariate_figure(
        tables,
        ["age_months", "sex"],
        unit=(PLOT_SITE, "stay_id"),
        bins={
            "age_months": edges_from_bounds((0, 216, 8, "log1p")),
            "sex": PROFILE_BOUNDS["sex"],
        },
        labels={"age_months": "age at admission (months)"},
    )
    return png, (
        "Age and sex of each source's stays: share per public bin (cells "
        "of fewer than 5 stays are not drawn)."
    )


USE_CASE = UseCase(
    name="picu",
    unit="ICU stay",
    roles=ROLES,
    profile=picu_profile,
    profile_bounds=PROFILE_BOUNDS,
    may_be_missing=frozenset({"hr_mean", "lactate_max", "spo2_min"}),
    attack_columns=(("age_months", "sex", "los_hours"), "died"),
    generator="sequence",
    synthesise=synthesise,
    utility=utility,
    load=load,
    simulate=simulate,
    site_names=site_names,
    simulate_default=simulate_default,
    task=TASK,
    outcome=(
        "died",
        (
            "age_months",
            "sex",
            "hr_mean",
            "lactate_max",
            "spo2_min",
            "imv_hours",
            "vasoactive_hours",
            "culture",
        ),
    ),
    plots={
        "Trajectories by source": _trajectories,
        "Covariates by source": _covariates,
    },
)
"""PICU sepsis early warning (see the module docstring)."""
