"""Cardiac: federated multi-state model of paediatric cardiac surgical pathways.

Analysis table: one row per sojourn of a surgical episode (:func:`phems_clinical.
data.cardiac.pathways.episodes` from each site's OMOP database); profile: one row
per episode (:func:`phems_clinical.evaluation.profiles.cardiac_profile`);
synthetic data: pathways (:mod:`phems_clinical.privacy.synth.pathways`).

Piecewise-exponential transition hazards with covariates (:mod:`phems_clinical.
models.multistate`), penalised likelihood minimised by FedAdam (default; it
reaches the pooled optimum, :mod:`phems_clinical.evaluation.cardiac_eval`).
Scores on real held-out episodes (:func:`~phems_clinical.evaluation.
cardiac_eval.evaluate`): Harrell's C of death by one year, AUROC of a CICU stay
over 7 days, IPCW Brier scores of death and readmission.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from phems_clinical.data.cardiac.pathways import derived_covariates, episodes
from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.evaluation import utility as ut
from phems_clinical.evaluation.profiles import cardiac_profile
from phems_clinical.federation.registry import FEDOPT, build_fedopt
from phems_clinical.models import multistate as ms
from phems_clinical.privacy.hierarchies import (
    paediatric_age,
    suppress_only,
    weight_kg,
)
from phems_clinical.privacy.perturb import LongitudinalRoles
from phems_clinical.privacy.release import Roles
from phems_clinical.usecases.base import PLOT_SITE, UseCase
from phems_clinical.usecases.omop_sites import load_site, report_json, site_databases
from phems_clinical.usecases.task import Fitted, Problem, Task, flat_estimates

METRICS = ("c_death", "auc_cicu_gt7", "brier_death_360d", "brier_readmit_360d")


NAMES = [
    f"{ms.DEFAULT_SPEC.states[a]}->{ms.DEFAULT_SPEC.states[b]}:{c}"
    for a, b in ms.DEFAULT_SPEC.transitions
    for c in ms.DEFAULT_SPEC.covariates
]


def _algorithm(strategy: str, options: dict, objective, x0):
    opts = dict(options)
    lr = 0.1 if strategy == "fedadam" else 0.15
    alg = build_fedopt(
        strategy,
        objective,
        x0,
        opts,
        default_rounds=300,
        learning_rate=lr,
        local_steps=1,
    )
    if opts:
        raise ValueError(
            f"inference.options for {strategy}: unknown {', '.join(sorted(opts))}"
        )
    return alg


def _fitted(x, to_natural) -> Fitted:
    params = to_natural(x)
    return Fitted(params, flat_estimates("log_hr", np.asarray(params.beta), NAMES))


def problem(
    key, frames: Sequence[pd.DataFrame], strategy: str, model: Mapping[str, Any]
) -> Problem:
    del key  # deterministic start (zeros on the scaled parameters)
    ex, objective, x0, to_natural = ce.federated_objective(
        {f"site_{k}": f for k, f in enumerate(frames)}, **model
    )

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
    return {
        k: np.asarray(v, np.float64)
        for k, v in ms.scaling_totals(
            ms.EpisodeExamples(e.data, e.mask), ms.DEFAULT_SPEC
        ).items()
    }


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
        ms.DEFAULT_SPEC,
        ridge=kw.get("ridge", 1e-3),
        scaling=scaling,
        prior_sd_alpha=kw.get("prior_sd_alpha", 3.0),
        prior_mean_alpha=float(np.log(0.05)),
        n_total=float(totals["n"]),
    )
    return objective_from_loss(loss), x0, to_natural


def _fl_build(settings, common, sums):
    import json

    objective, x0, _ = _fl_objective(settings, sums)
    return _algorithm(
        settings.algorithm,
        json.loads(settings.options) if settings.options else {},
        objective,
        x0,
    )


def flower_fitted(result: Mapping[str, Any], settings, sums, model=None) -> Fitted:
    """The :class:`Fitted` model of a Flower run's result (``x``) and its summed
    scaling totals."""
    import jax.numpy as jnp

    return _fitted(
        jnp.asarray(result["x"], jnp.float64), _fl_objective(settings, sums)[2]
    )


def _flower():
    from phems_clinical.federation.flower.tasks import Stage, UseCase, largest

    K, J, P = ms.DEFAULT_SPEC.dims
    # SecAgg bound 1e7 (events, episode-days of exposure per cell): 52-bit steps
    # of 4.4e-9, small against the shrinkage of an empty cell's log rate; a site
    # whose totals exceed it refuses to send, naming the field
    stats = Stage(
        "cardiac_stats",
        lambda settings, common: {
            "D": (K, J),
            "E": (K, J),
            "Dx": (K, P),
            "Dx2": (K, P),
            "n": (),
        },
        _fl_stats,
        clip=1e7,
    )
    return UseCase(
        name="cardiac",
        data_file="sojourns.csv",
        query="query_reply_cardiac",
        read_site=_fl_read,
        shape=lambda df: {"n-episodes": int(df.episode_id.nunique())},
        size=lambda df: int(df.episode_id.nunique()),
        common=lambda shapes, settings: largest(shapes, ("n-episodes",)),
        build=_fl_build,
        site_data=lambda df, settings, common, sums: _fl_examples(df, common),
        tag=lambda settings, common: (
            f"cardiac|{settings.algorithm}|"
            f"options={settings.options}|"
            f"model={settings.model}",
            [],
        ),
        before=(stats,),
        size_field="n-episodes",
    )


def evaluate(
    fitted: Fitted, test: pd.DataFrame, model: Mapping[str, Any]
) -> dict[str, float]:
    del model
    return {k: float(v) for k, v in ce.evaluate(fitted.model, test).items()}


def model_from_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Penalties of the multi-state fit: ``ridge`` (log hazard ratios),
    ``prior_sd_alpha`` (baseline log-hazards)."""
    spec = dict(spec)
    unknown = sorted(set(spec) - {"ridge", "prior_sd_alpha"})
    if unknown:
        raise ValueError(
            f"model: unknown keys {unknown} for the multi-state model; "
            f"expected some of ['ridge', 'prior_sd_alpha']"
        )
    return spec


TASK = Task(
    use_case="cardiac",
    strategy="fedadam",
    strategies=FEDOPT,
    metrics=METRICS,
    lower_is_better=frozenset({"brier_death_360d", "brier_readmit_360d"}),
    labels={
        "c_death": "C-index of death by 1 year",
        "auc_cicu_gt7": "AUROC of a CICU stay > 7 days",
        "brier_death_360d": "Brier score of death by 1 year",
        "brier_readmit_360d": "Brier score of readmission by 1 year",
    },
    id_columns=("episode_id", "person_id"),
    model_from_config=model_from_config,
    model_label=lambda m: "multi-state pathways",
    problem=problem,
    evaluate=evaluate,
    flower_fitted=flower_fitted,
    flower_model=lambda m: ("", json.dumps(dict(m))),
)

FLOWER = _flower()
"""The cardiac recipe of the Flower apps (:mod:`phems_clinical.federation.flower.
tasks`): a site reads its sojourn table (``sojourns.csv``); the summed round before
training carries the scaling totals of the multi-state model."""


# ------------------------------------------------------------ data and sources
def recompute(df: pd.DataFrame) -> pd.DataFrame:
    """age_group and weight_z from the released age_days / weight_kg, by the rule of
    :func:`phems_clinical.data.cardiac.pathways.episodes`."""
    out = df.copy()
    group, wz = derived_covariates(
        out["age_days"].to_numpy(float), out["weight_kg"].to_numpy(float)
    )
    out["age_group"] = group
    out["weight_z"] = wz
    return out


ROLES = Roles(
    use_case="cardiac",
    patient_id="person_id",
    identifiers=("person_id", "episode_id"),
    quasi_identifiers={
        "age_days": lambda: paediatric_age("days", "age_days"),
        "sex": lambda: suppress_only("sex"),
        "weight_kg": lambda: weight_kg("weight_kg"),
    },
    sensitive=("died",),
    sensitive_rule={"died": "state:DEAD"},
    date_columns=("surgery_datetime",),
    derived=("age_group", "weight_z"),
    recompute=recompute,
    # sojourn entry/exit (days since surgery) are coarsened; no measured values
    longitudinal=LongitudinalRoles(
        course="episode_id", times=("entry", "exit"), time_unit="d"
    ),
)

#: Public bounds of the profile columns (clinical ranges, never read from data).
PROFILE_BOUNDS = {
    "age_days": (0, 6575, 24, "log1p"),
    "sex": ["F", "M"],
    "weight_kg": (1, 100, 20, "log1p"),
    "stat": [1, 2, 3, 4, 5],
    "ventilation": [0, 1],
    "cicu_days": (0, 60, 15, "log1p"),
    "died": [0, 1],
    "readmitted": [0, 1],
    "death_day": (0, 365, 12),
}


def synthesise(
    key, data: pd.DataFrame, options: Mapping[str, Any], model=None, params=None
) -> tuple[pd.DataFrame, dict]:
    """Synthetic surgical pathways (``options["n"]`` episodes, default as many as
    ``data``)."""
    del model, params
    from phems_clinical.privacy.synth import pathways as pw

    fitted = pw.fit_pathways(data)
    n = int(options.get("n") or data["episode_id"].nunique())
    return pw.sample_pathways(key, fitted, n), {"n": n}


def utility(
    key,
    source: pd.DataFrame,
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    model=None,
    reference=None,
) -> dict[str, float]:
    """The multi-state model fitted on ``source``, scored on the real holdout."""
    del key, train, model, reference
    return ut.cardiac_utility(source, holdout)


def load_sites(omop: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Each site's sojourn table and its load report (OMOP and pathway checks)."""
    sojourns, reports = {}, {}
    for site, db in site_databases(omop).items():
        tables, report = load_site(db)
        soj, preport = episodes(tables, site=site)
        if soj.empty:
            raise ValueError(
                f"site {site}: no usable cardiac surgery episode in {db} "
                f"({preport.summary()})"
            )
        sojourns[site] = soj
        reports[site] = {
            **report_json(report),
            "episodes": int(preport.n_episodes),
            "excluded_episodes": {str(k): int(v) for k, v in preport.counts().items()},
        }
    return sojourns, reports


def load(omop, model=None) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Each site's sojourn table and load report."""
    del model
    return load_sites(omop)


def site_names(n_sites: int) -> list[str]:
    return [f"hospital_{i + 1}" for i in range(n_sites)]


def simulate(key, n_sites: int, n_per_site: int, model=None) -> dict:
    """``n_sites`` hospitals of ``n_per_site`` surgical episodes as OMOP tables,
    cycling through the simulator's case mixes (hospitals a, b, c)."""
    del model
    from phems_clinical.data.cardiac.simulate import SITE_CASE_MIX, simulate_sites

    mixes = list(SITE_CASE_MIX.values())
    spec = {name: mixes[i % 3] for i, name in enumerate(site_names(n_sites))}
    return {
        s: c.tables
        for s, c in simulate_sites(key, n_episodes=n_per_site, sites=spec).items()
    }


def simulate_default(key, n: int | None, product: str = "") -> dict:
    """The simulator's default hospitals (``n`` episodes each, default 500), with
    the simulator's truth."""
    del product
    from phems_clinical.data.cardiac import simulate_sites

    return {
        name: (c.tables, c.truth)
        for name, c in simulate_sites(key, n_episodes=n or 500).items()
    }


#: Days since surgery at which the occupation curves are drawn.
OCCUPATION_DAYS = tuple(float(d) for d in range(0, 31)) + tuple(
    float(d) for d in range(35, 366, 5)
)


def _occupation(tables: Mapping[str, pd.DataFrame]) -> tuple[bytes, str]:
    from phems_clinical.evaluation.plots import occupation_figure

    png = occupation_figure(
        tables, ms.DEFAULT_SPEC.states, OCCUPATION_DAYS, xlabel="days since surgery"
    )
    return png, (
        "Share of each source's surgical episodes in each state over the "
        "first year (Aalen-Johansen estimate from the sojourns, which "
        "allows for censoring), episodes pooled over the training "
        "hospitals."
    )


def _covariates(tables: Mapping[str, pd.DataFrame]) -> tuple[bytes, str]:
    from phems_clinical.evaluation.plots import covariate_figure, edges_from_bounds

    png = covariate_figure(
        tables,
        ["age_days", "weight_kg", "sex"],
        unit=(PLOT_SITE, "episode_id"),
        bins={
            "age_days": edges_from_bounds((0, 6575, 8, "log1p")),
            "weight_kg": edges_from_bounds((1, 100, 8, "log1p")),
            "sex": PROFILE_BOUNDS["sex"],
        },
        labels={"age_days": "age at surgery (days)", "weight_kg": "weight (kg)"},
    )
    return png, (
        "Age, weight and sex of each source's surgical episodes: share per "
        "public bin (cells of fewer than 5 episodes are not drawn)."
    )


USE_CASE = UseCase(
    name="cardiac",
    unit="surgical episode",
    roles=ROLES,
    profile=cardiac_profile,
    profile_bounds=PROFILE_BOUNDS,
    may_be_missing=frozenset({"death_day"}),
    attack_columns=(("age_days", "sex", "weight_kg", "stat"), "died"),
    generator="pathway",
    synthesise=synthesise,
    utility=utility,
    load=load,
    simulate=simulate,
    site_names=site_names,
    simulate_default=simulate_default,
    task=TASK,
    outcome=("died", ("age_days", "sex", "weight_kg", "stat", "ventilation")),
    plots={
        "State occupation by source": _occupation,
        "Covariates by source": _covariates,
    },
)
"""Paediatric cardiac surgical pathways (see the module docstring)."""
