"""PK virtual patients.

A pharmacometric virtual population built from a real PK dataset and a population
model:

1. **Covariates**: one row per subject (the model's covariates plus every other
   time-constant column, e.g. ``SEX``, ``HT``, ``SITE``) is modelled by the Gaussian
   copula of :mod:`phems_clinical.privacy.synth.copula` and sampled afresh.
2. **Sampling designs**: each source subject's design (dose times, amounts,
   infusion durations and occasions; observation times, LLOQs and occasions, all
   relative to the first dose) is kept in a list and resampled *independently* of
   the covariates, so no synthetic patient carries a real patient's covariates and
   design together. When ``WT`` is a column, amounts are kept as IU/kg and rescaled
   by the synthetic weight (rounded up to the model's smallest vial, as the
   simulator does), so weight-based dosing stays weight-based.
3. **Individual parameters** are drawn from the population model given the
   synthetic covariates: ``TV(cov) * exp(eta + kappa)`` with ``eta ~ N(0, Omega)``
   and ``kappa ~ N(0, omega_iov)``; they are never copied from real subjects.
4. **Concentrations** are predicted with :func:`phems_clinical.pk.model.predict`,
   combined residual error is added and samples below the LLOQ are flagged BLQ
   exactly as :func:`phems_clinical.pk.simulate.simulate_cohort` does.

Optional ``individual`` (a table of ``ID`` and ``ETA_<param>`` per subject, e.g.
empirical Bayes estimates): the etas are then modelled jointly with the covariates
in the copula, so eta-covariate dependence the model misses is kept; etas are still
synthetic draws, not copies.

Limitations: design-covariate association (e.g. sparse sampling in children) is
not kept; deterministic relations between covariates (``BMI`` from ``WT``/``HT``)
hold only approximately; the copula discloses marginals (see ``copula.py``); not
differentially private.

Layering: unlike the rest of :mod:`phems_clinical.privacy` (which depends only on
``data``), this module imports the PK engine, because the population model *is*
the generator. Imports stay one-way (``pk`` never imports ``privacy``); the
observations come from :func:`phems_clinical.pk.simulate.simulate_observations`,
the same function the cohort simulator uses.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from phems_clinical._typing import Key
from phems_clinical.data.cohort import stack_subjects
from phems_clinical.data.nonmem import PKData, read_nonmem
from phems_clinical.pk.model import PopParams
from phems_clinical.pk.simulate import round_dose, simulate_observations
from phems_clinical.pk.spec import PopModel
from phems_clinical.privacy.synth.copula import CopulaModel, fit_copula, sample_copula

MIN_SUBJECTS = 10
_EVENT_COLUMNS = frozenset(
    {
        "ROW",
        "ID",
        "TIME",
        "EVID",
        "MDV",
        "AMT",
        "RATE",
        "DUR",
        "DV",
        "BLQ",
        "LLOQ",
        "OCC",
        "DVUNIT",
        "NOTE",
    }
)
_MAX_CODED_LEVELS = 10  # integer columns with at most this many levels: categorical


class VirtualPopulationError(ValueError):
    """The virtual population cannot be fitted or sampled (says why)."""


class Design(NamedTuple):
    """Sampling design of one source subject (times in h after its first dose).

    ``dose_amt`` is IU, or IU/kg when ``per_kg``; ``obs_lloq`` NaN = unknown.
    """

    dose_time: np.ndarray
    dose_amt: np.ndarray
    dose_dur: np.ndarray
    dose_occ: np.ndarray
    obs_time: np.ndarray
    obs_lloq: np.ndarray
    obs_occ: np.ndarray
    per_kg: bool


class VirtualPopulationModel(NamedTuple):
    """Fitted virtual population: covariate copula, design list, model and params.

    ``covariate_columns``: columns of the synthetic covariate rows (model covariates
    first); ``eta_columns``: ``ETA_<param>`` columns modelled in the copula (empty:
    etas drawn from ``N(0, Omega)``); ``source_ids``: original IDs (never emitted,
    kept to guarantee synthetic IDs differ).
    """

    model: PopModel
    params: PopParams
    copula: CopulaModel
    covariate_columns: tuple[str, ...]
    eta_columns: tuple[str, ...]
    designs: tuple[Design, ...]
    vials: tuple[float, ...]
    source_ids: frozenset


def _as_pkdata(events) -> PKData:
    if isinstance(events, PKData):
        return events
    if isinstance(events, pd.DataFrame):
        return read_nonmem(events)
    raise VirtualPopulationError(
        f"events must be a DataFrame or PKData, got {type(events).__name__}"
    )


def _first_value(g: pd.Series):
    v = g.dropna()
    return v.iloc[0] if len(v) else np.nan


def _covariate_table(ev: pd.DataFrame, model: PopModel) -> pd.DataFrame:
    names = [c.upper() for c in model.covariate_names]
    absent = [c for c in names if c not in ev.columns]
    if absent:
        raise VirtualPopulationError(
            "model covariate(s) missing from the events: " + ", ".join(absent)
        )
    groups = ev.groupby("ID", sort=False)
    extra = []
    for c in ev.columns:
        if c in _EVENT_COLUMNS or c in names:
            continue
        if int(groups[c].nunique(dropna=True).max()) <= 1:  # time-constant
            extra.append(c)
    table = groups[names + extra].agg(_first_value)
    empty = [c for c in names if table[c].isna().any()]
    if empty:
        bad = table.index[table[empty].isna().any(axis=1)].tolist()
        raise VirtualPopulationError(
            "model covariate(s) without a value for some subjects: "
            f"{', '.join(empty)} (subjects {', '.join(map(str, bad[:5]))})"
        )
    for c in names:
        table[c] = pd.to_numeric(table[c], errors="raise").astype(float)
    return table


def _designs(ev: pd.DataFrame, wt: pd.Series | None) -> list[Design]:
    out = []
    for sid, g in ev.groupby("ID", sort=False):
        d = g[g["EVID"] == 1]
        o = g[g["EVID"] == 0]
        t0 = float(d["TIME"].min())
        amt = d["AMT"].to_numpy(float)
        per_kg = wt is not None and float(wt.loc[sid]) > 0
        if per_kg:
            amt = amt / float(wt.loc[sid])
        out.append(
            Design(
                dose_time=d["TIME"].to_numpy(float) - t0,
                dose_amt=amt,
                dose_dur=d["DUR"].to_numpy(float),
                dose_occ=d["OCC"].to_numpy(int) - 1,
                obs_time=o["TIME"].to_numpy(float) - t0,
                obs_lloq=o["LLOQ"].to_numpy(float),
                obs_occ=o["OCC"].to_numpy(int) - 1,
                per_kg=per_kg,
            )
        )
    return out


def fit_virtual_population(
    events,
    model: PopModel,
    params: PopParams,
    *,
    individual: pd.DataFrame | None = None,
) -> VirtualPopulationModel:
    """Fit a virtual population to a PK dataset.

    Parameters
    ----------
    events : pandas.DataFrame or PKData
        NONMEM-style events (anything :func:`read_nonmem` accepts as a frame), or
        its output.
    model : PopModel
        Population model; its covariates must be columns of ``events``.
    params : PopParams
        Population parameters used to draw individual parameters (e.g.
        ``fit_focei(...).params`` or ``initial_params(model)``).
    individual : pandas.DataFrame, optional
        ``ID`` and ``ETA_<param>`` for every IIV parameter (e.g. EBEs): etas are
        then sampled jointly with the covariates by the copula.

    Raises
    ------
    VirtualPopulationError
        Fewer than 10 subjects, model covariates absent or without a value (named),
        or ``individual`` not matching the subjects / IIV parameters.
    """
    data = _as_pkdata(events)
    ev = data.events
    n_subj = int(ev["ID"].nunique())
    if n_subj < MIN_SUBJECTS:
        raise VirtualPopulationError(
            f"need at least {MIN_SUBJECTS} subjects to fit a virtual population, "
            f"got {n_subj}"
        )
    table = _covariate_table(ev, model)
    eta_cols: tuple[str, ...] = ()
    if individual is not None:
        eta_cols = tuple(f"ETA_{p}" for p in model.iiv_parameters)
        ind = individual.copy()
        ind.columns = [str(c).upper() for c in ind.columns]
        miss = [c for c in ("ID", *eta_cols) if c not in ind.columns]
        if miss:
            raise VirtualPopulationError(
                "individual is missing column(s): " + ", ".join(miss)
            )
        ind = ind.assign(ID=ind["ID"].astype(str)).drop_duplicates("ID")
        ind = ind.set_index("ID")
        lost = [i for i in table.index if i not in ind.index]
        if lost:
            raise VirtualPopulationError(
                "individual has no row for subject(s): " + ", ".join(map(str, lost[:5]))
            )
        table = table.join(ind[list(eta_cols)].astype(float))
    coded = [
        c
        for c in table.columns
        if c not in eta_cols
        and pd.api.types.is_numeric_dtype(table[c])
        and np.all(np.mod(table[c].dropna(), 1) == 0)
        and table[c].nunique() <= _MAX_CODED_LEVELS
    ]
    cop = fit_copula(
        table.reset_index(drop=True), categorical=coded, min_rows=MIN_SUBJECTS
    )
    wt = table["WT"] if "WT" in table.columns else None
    vials = tuple(float(v) for v in model.metadata.get("vial_sizes_IU", [250.0]))
    return VirtualPopulationModel(
        model=model,
        params=params,
        copula=cop,
        covariate_columns=tuple(c for c in table.columns if c not in eta_cols),
        eta_columns=eta_cols,
        designs=tuple(_designs(ev, wt)),
        vials=vials,
        source_ids=frozenset(str(i) for i in table.index),
    )


def _synthetic_ids(n: int, taken: frozenset) -> list[str]:
    prefix = "VP"
    while True:
        ids = [f"{prefix}{i + 1}" for i in range(n)]
        if not taken.intersection(ids):
            return ids
        prefix += "X"


def sample_virtual_population(
    key: Key, vpm: VirtualPopulationModel, n: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draw ``n`` virtual patients.

    Returns
    -------
    events : pandas.DataFrame
        ``ID, TIME, AMT, DUR, DV, MDV, EVID, BLQ, LLOQ, OCC`` and the covariate
        columns, accepted by :func:`read_nonmem`; IDs ``VP1..`` (never a source ID).
    truth : pandas.DataFrame
        ``ID``, the individual parameters of the first occasion and ``ETA_<param>``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise VirtualPopulationError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    model, p = vpm.model, vpm.params
    k_cov, k_design, k_eta, k_kappa, k_eps = jax.random.split(key, 5)
    synth = sample_copula(k_cov, vpm.copula, n)
    names = [c.upper() for c in model.covariate_names]
    cov = synth[names].to_numpy(dtype=float)
    pick = np.asarray(jax.random.randint(k_design, (n,), 0, len(vpm.designs)))
    subjects = []
    for i, j in enumerate(pick):
        d = vpm.designs[int(j)]
        amt = d.dose_amt
        if d.per_kg:
            wt = float(synth["WT"].iloc[i])
            amt = np.array([round_dose(a * wt, list(vpm.vials)) for a in amt])
        subjects.append(
            dict(
                dose_time=d.dose_time,
                dose_amt=amt,
                dose_dur=d.dose_dur,
                dose_occ=d.dose_occ,
                obs_time=d.obs_time,
                obs_dv=np.zeros(len(d.obs_time)),
                obs_blq=np.zeros(len(d.obs_time), bool),
                obs_lloq=np.nan_to_num(d.obs_lloq),
                obs_occ=d.obs_occ,
                covariates=cov[i],
            )
        )
    cohort = stack_subjects(subjects)
    n_occ = max(
        1,
        max(int(np.max(s["dose_occ"], initial=0)) + 1 for s in subjects),
        max(int(np.max(s["obs_occ"], initial=0)) + 1 for s in subjects),
    )
    if vpm.eta_columns:
        eta = jnp.asarray(synth[list(vpm.eta_columns)].to_numpy(dtype=float))
    elif model.n_eta:
        eta = jax.random.multivariate_normal(
            k_eta, jnp.zeros(model.n_eta), p.omega, (n,)
        )
    else:
        eta = jnp.zeros((n, 0))
    y, indiv = simulate_observations(k_kappa, k_eps, model, p, cohort, eta, n_occ)

    ids = _synthetic_ids(n, vpm.source_ids)
    rows = []
    for i, s in enumerate(subjects):
        covs = {c: synth[c].iloc[i] for c in vpm.covariate_columns}
        for t, a, du, occ in zip(
            s["dose_time"], s["dose_amt"], s["dose_dur"], s["dose_occ"], strict=True
        ):
            rows.append(
                dict(
                    ID=ids[i],
                    TIME=round(float(t), 4),
                    AMT=float(a),
                    DUR=float(du),
                    DV=np.nan,
                    MDV=1,
                    EVID=1,
                    BLQ=0,
                    LLOQ=np.nan,
                    OCC=int(occ) + 1,
                    **covs,
                )
            )
        lloqs = vpm.designs[int(pick[i])].obs_lloq
        for j, (t, occ) in enumerate(zip(s["obs_time"], s["obs_occ"], strict=True)):
            value, lloq = float(y[i, j]), float(lloqs[j])
            blq = bool(np.isfinite(lloq) and value < lloq)
            rows.append(
                dict(
                    ID=ids[i],
                    TIME=round(float(t), 4),
                    AMT=0.0,
                    DUR=0.0,
                    DV=np.nan if blq else round(value, 4),
                    MDV=0,
                    EVID=0,
                    BLQ=int(blq),
                    LLOQ=lloq,
                    OCC=int(occ) + 1,
                    **covs,
                )
            )
    events = pd.DataFrame(rows)
    events["_SUBJ"] = events["ID"].map({sid: i for i, sid in enumerate(ids)})
    events = events.sort_values(
        ["_SUBJ", "TIME", "EVID"], ascending=[True, True, False], kind="stable"
    )
    events = events.drop(columns="_SUBJ").reset_index(drop=True)
    truth = pd.DataFrame(indiv, columns=list(model.structural))
    truth.insert(0, "ID", ids)
    for k, name in enumerate(model.iiv_parameters):
        truth[f"ETA_{name}"] = np.asarray(eta)[:, k]
    return events, truth


__all__ = [
    "Design",
    "VirtualPopulationError",
    "VirtualPopulationModel",
    "fit_virtual_population",
    "sample_virtual_population",
]
