"""Haemophilia: federated population PK, scored by the dosing tool's forecast.

Analysis table: NONMEM-style factor VIII/IX events (one row per dose or level;
``ID``, ``TIME`` h, ``AMT`` IU, ``DV`` IU/dL, covariates ``AGE`` y, ``WT`` kg,
``HT`` cm, ``SEX``, ``BGO``), read from each site's OMOP database by
:func:`phems_clinical.data.omop.omop_to_pk`. Profile: one row per patient
(:func:`phems_clinical.evaluation.profiles.pk_profile`); synthetic data: a PK
virtual population (:mod:`phems_clinical.privacy.synth.pk_virtual`).

The prior of ``phems dose`` is the population the federation fitted; each real
held-out patient's MAP estimate from their first 2 levels predicts their later
levels (:func:`phems_clinical.evaluation.utility.pk_forecast_accuracy`).
Strategies: every algorithm of :mod:`phems_clinical.federation.registry`
(federated FOCEI by default). Flower engine: :func:`flower_fitted` reads the
result of :func:`phems_clinical.runner.training.train_flower`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from phems_clinical.data.demographics import fat_free_mass, lean_body_weight
from phems_clinical.data.omop import pk_to_omop
from phems_clinical.evaluation import utility as ut
from phems_clinical.evaluation.profiles import pk_profile
from phems_clinical.evaluation.sources import SourceError
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
from phems_clinical.privacy.hierarchies import (
    height_cm,
    lifespan_age,
    suppress_only,
    weight_kg,
)
from phems_clinical.privacy.perturb import LongitudinalRoles, ValueColumn
from phems_clinical.privacy.release import Roles
from phems_clinical.usecases.base import PLOT_SITE, UseCase
from phems_clinical.usecases.omop_sites import model_factor, pk_events_from_omop
from phems_clinical.usecases.task import Fitted, Problem, Task

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
        prior = (
            result["params"]
            if "params" in result
            else packer.unpack(np.asarray(result["x"]))
        )
        table = estimates_table(model, result)
        return Fitted(
            prior,
            {k: v["estimate"] for k, v in table.items()},
            {k: v["se"] for k, v in table.items() if "se" in v},
        )

    return finish


def problem(
    key, frames: Sequence[pd.DataFrame], strategy: str, model: PopModel
) -> Problem:
    del key  # the model's initial values are deterministic
    _, cohorts = cohorts_by_site(_events(frames), model)
    n_occ = n_occasions_all(cohorts)

    def build(options: dict):
        return build_algorithm(
            strategy, model, n_sites=len(cohorts), n_occ=n_occ, options=options
        )

    return Problem(build, pad_sites(cohorts), _finish(model))


def evaluate(fitted: Fitted, test: pd.DataFrame, model: PopModel) -> dict[str, float]:
    return pk_forecast_accuracy(
        fitted.model, test.drop(columns="SITE", errors="ignore"), model
    )


def flower_fitted(result: Mapping[str, Any], settings, sums, model: PopModel) -> Fitted:
    """The :class:`Fitted` population of a Flower run's result JSON."""
    del settings, sums
    result = dict(result)
    if isinstance(result.get("params"), dict):  # PopParams, as JSON
        result["params"] = PopParams(
            **{k: np.asarray(v, float) for k, v in result["params"].items()}
        )
    return _finish(model)(result)


def model_from_config(spec: Mapping[str, Any]) -> PopModel:
    return parse_model(dict(spec))


def flower_model(model: PopModel) -> tuple[str, str]:
    """The Flower apps load the population model by its library product name."""
    return model.name, ""


def check_flower_model(model: PopModel) -> None:
    """Refuse, by name, a model that is not exactly a library product: the Flower
    apps load it by product name, so an edited or own model would be silently
    replaced."""
    import pickle

    from phems_clinical.pk.library import load_product

    try:
        library = load_product(model.name)
    except (KeyError, ValueError, FileNotFoundError, OSError):
        library = None
    if library is None or pickle.dumps(library) != pickle.dumps(model):
        raise ValueError(
            f"model: federation.engine flower loads the population "
            f"model by product name, and {model.name!r} is not "
            f"exactly a library product (configs/model); use engine "
            f"inprocess for an edited or own model"
        )


TASK = Task(
    use_case="haemophilia",
    strategy="fed_focei",
    strategies=ALGORITHMS,
    metrics=METRICS,
    lower_is_better=frozenset({"mdape"}),
    labels={
        "mdape": "forecast MDAPE (%)",
        "mpe": "forecast median bias (%)",
        "within20": "share of patients forecast within 20 %",
    },
    id_columns=("ID",),
    model_from_config=model_from_config,
    model_label=lambda m: m.name,
    problem=problem,
    evaluate=evaluate,
    flower_fitted=flower_fitted,
    flower_model=flower_model,
    check_flower_model=check_flower_model,
)


# ------------------------------------------------------------ data and sources
def recompute(df: pd.DataFrame) -> pd.DataFrame:
    """BMI, LBW, FFM from the released WT / HT / SEX / AGE (data.demographics)."""
    out = df.copy()
    if "HT" not in out.columns:
        return out.drop(columns=[c for c in ("BMI", "LBW", "FFM") if c in out])
    wt, ht = out["WT"].to_numpy(float), out["HT"].to_numpy(float)
    sex = out["SEX"].to_numpy(float) if "SEX" in out else np.zeros(len(out))
    if "BMI" in out:
        out["BMI"] = wt / (ht / 100.0) ** 2
    if "LBW" in out:
        out["LBW"] = np.asarray(lean_body_weight(wt, ht, sex), float)
    if "FFM" in out:
        out["FFM"] = np.asarray(
            fat_free_mass(wt, ht, sex, out["AGE"].to_numpy(float)), float
        )
    return out


ROLES = Roles(
    use_case="haemophilia",
    patient_id="ID",
    identifiers=("ID",),
    quasi_identifiers={
        "AGE": lambda: lifespan_age("years", "AGE"),
        "WT": lambda: weight_kg("WT"),
        "SEX": lambda: suppress_only("SEX"),
    },
    optional_qis={"HT": lambda: height_cm("HT")},
    sensitive=("BGO",),
    sensitive_rule={"BGO": "first"},
    derived=("BMI", "LBW", "FFM"),
    recompute=recompute,
    # factor levels (IU/dL) and the per-patient lab covariates (VWF IU/dL, HCT %)
    # get proportional noise; sample and dose times (h) are coarsened
    longitudinal=LongitudinalRoles(
        course="ID",
        times=("TIME",),
        time_unit="h",
        values={
            "DV": ValueColumn("multiplicative", lower=0.0),
            "VWF": ValueColumn("multiplicative", per="course", lower=0.0),
            "HCT": ValueColumn("multiplicative", per="course", lower=0.0, upper=100.0),
        },
    ),
)

#: Public bounds of the profile columns (clinical ranges, never read from data).
PROFILE_BOUNDS = {
    "AGE": (0, 80, 16),
    "WT": (0, 150, 15),
    "HT": (40, 210, 17),
    "SEX": [0, 1],
    "BGO": [0, 1],
    "dose_iu_kg": (0, 100, 10),
    "n_levels": (0, 12, 12),
    "level_first": (0, 250, 25),
    "time_first": (0, 48, 12),
    "log_slope": (-0.3, 0.0, 15),
}


def synthesise(
    key,
    data: pd.DataFrame,
    options: Mapping[str, Any],
    model: PopModel | None,
    params=None,
) -> tuple[pd.DataFrame, dict]:
    """A PK virtual population: covariates by copula, resampled designs,
    individual parameters drawn from the population model fitted on ``data`` by
    FOCEI (``params``: that fit, when already made)."""
    from phems_clinical.privacy.synth import pk_virtual

    if model is None:
        raise SourceError(
            "haemophilia 'virtual' synthesis needs the population "
            "model (pk_model=, e.g. --model advate)"
        )
    if params is None:
        params = ut.fit_population(data, model).params
    vpm = pk_virtual.fit_virtual_population(data, model, params)
    n = int(options.get("n") or data["ID"].nunique())
    ev, _ = pk_virtual.sample_virtual_population(key, vpm, n)
    return ev, {
        "n": n,
        "generator": "PK virtual population (copula covariates, "
        "resampled designs, individual parameters drawn from the "
        "population model fitted on the source by FOCEI)",
    }


def utility(
    key,
    source: pd.DataFrame,
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    model: PopModel | None,
    reference=None,
) -> dict[str, float]:
    """Population-parameter bias against the real training data's fit
    (``reference``) and the dosing forecast on the real holdout; none without a
    population model."""
    del key
    if model is None:
        return {}
    return {
        **ut.pk_parameter_bias(source, train, model, real_fit=reference),
        **ut.pk_forecast_accuracy(source, holdout, model),
    }


def load(
    omop, model: PopModel | None = None
) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Each site's events (factor of ``model``: FVIII by default) and load
    report."""
    factor = model_factor(model) if model is not None else "FVIII"
    events, reports = pk_events_from_omop(omop, factor=factor)
    return ({s: d.reset_index(drop=True) for s, d in events.groupby("SITE")}, reports)


def site_names(n_sites: int) -> list[str]:
    return [f"hospital_{i + 1}" for i in range(n_sites)]


def simulate(key, n_sites: int, n_per_site: int, model: PopModel) -> dict:
    """``n_sites`` hospitals of ``n_per_site`` patients as OMOP tables."""
    from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals

    events, _ = simulate_hospitals(
        key, model, [HospitalSpec(name, n_per_site) for name in site_names(n_sites)]
    )
    return {
        site: pk_to_omop(
            rows.drop(columns="SITE"),
            product=model.name,
            site=site,
            factor=model_factor(model),
        )
        for site, rows in events.groupby("SITE", sort=False)
    }


def simulate_default(key, n: int | None, product: str) -> dict:
    """The simulator's default hospitals (``3 n`` patients in all, default 90)
    with their true parameters."""
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.simulate import default_hospitals, simulate_hospitals

    model = load_product(product)
    factor = model_factor(model)
    events, truth = simulate_hospitals(key, model, default_hospitals(3 * (n or 30)))
    out = {}
    for site, rows in events.groupby("SITE", sort=False):
        tables = pk_to_omop(
            rows.drop(columns="SITE"), product=product, site=site, factor=factor
        )
        out[site] = (
            tables,
            truth[truth["ID"].isin(rows["ID"])] if "ID" in truth else None,
        )
    return out


#: Time-after-dose bins (h) of the concentration-time figure.
TAD_EDGES = (
    0.0,
    1.0,
    3.0,
    6.0,
    12.0,
    18.0,
    24.0,
    30.0,
    36.0,
    48.0,
    60.0,
    72.0,
    96.0,
    120.0,
)


def time_after_dose(events: pd.DataFrame, unit: Sequence[str]) -> pd.DataFrame:
    """The quantified levels (``EVID`` 0, ``BLQ`` 0, ``DV`` present) with ``TAD``:
    hours since the start of the unit's latest dose at or before the sample."""
    unit = list(unit)
    obs = events[(events.EVID == 0) & (events.BLQ == 0) & events.DV.notna()]
    doses = events.loc[events.EVID == 1, [*unit, "TIME"]].rename(
        columns={"TIME": "DOSE_TIME"}
    )
    out = pd.merge_asof(
        obs.sort_values("TIME"),
        doses.sort_values("DOSE_TIME"),
        left_on="TIME",
        right_on="DOSE_TIME",
        by=unit,
    )
    return out.assign(TAD=out.TIME - out.DOSE_TIME).dropna(subset=["TAD"])


def _concentration_time(tables: Mapping[str, pd.DataFrame]) -> tuple[bytes, str]:
    from phems_clinical.evaluation.plots import band_figure

    unit = (PLOT_SITE, "ID")
    png = band_figure(
        {n: time_after_dose(t, unit) for n, t in tables.items()},
        "TAD",
        "DV",
        edges=TAD_EDGES,
        unit=unit,
        xlabel="time after dose (h)",
        ylabels="factor level (IU/dL)",
        log_y=True,
    )
    return png, (
        "Factor level against time after dose (log scale), each source's "
        "training patients pooled over the training hospitals: median per "
        "time bin and the 10-90 % band (bins with fewer than 5 patients "
        "are left out; no single level is drawn)."
    )


def _covariates(tables: Mapping[str, pd.DataFrame]) -> tuple[bytes, str]:
    from phems_clinical.evaluation.plots import covariate_figure, edges_from_bounds

    png = covariate_figure(
        tables,
        ["AGE", "WT"],
        unit=(PLOT_SITE, "ID"),
        bins={c: edges_from_bounds(PROFILE_BOUNDS[c]) for c in ("AGE", "WT")},
        labels={"AGE": "age (y)", "WT": "weight (kg)"},
    )
    return png, (
        "Age and weight of each source's patients: share per public bin "
        "(cells of fewer than 5 patients are not drawn)."
    )


USE_CASE = UseCase(
    name="haemophilia",
    unit="patient",
    roles=ROLES,
    profile=pk_profile,
    profile_bounds=PROFILE_BOUNDS,
    may_be_missing=frozenset({"level_first", "time_first", "log_slope"}),
    attack_columns=(("AGE", "WT", "SEX"), "level_first"),
    generator="virtual",
    synthesise=synthesise,
    utility=utility,
    load=load,
    simulate=simulate,
    site_names=site_names,
    simulate_default=simulate_default,
    task=TASK,
    reference_fit=ut.fit_population,
    default_model="advate",
    plots={
        "Concentration-time by source": _concentration_time,
        "Covariates by source": _covariates,
    },
)
"""Haemophilia A/B population PK (see the module docstring)."""
