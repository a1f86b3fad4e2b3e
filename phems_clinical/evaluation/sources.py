"""Real, anonymised and synthetic versions of one site's data, and their scorecard.

Everything here runs inside one hospital: :func:`derive` turns the site's analysis
table into a data source; :func:`score_sources` scores every source the same way
into one xarray Dataset (:mod:`.scorecard`). The site's patients are split first
(:func:`split_patients`): sources are derived from the *training* part only, and
the *holdout* part serves as the control set of the privacy attacks and as the
real test data of the utility metrics (anonymeter's design; Giomi et al., PoPETs
2023).

Sources (:class:`SourceSpec`; ``kind`` is what the report and ``results.nc`` call
it):

- ``real``: the training data as they are (the reference row: releasing them is
  a verbatim copy, so its privacy risks show the worst case).
- ``anonymised``: :func:`phems_clinical.privacy.release.anonymise` (method
  ``lattice`` or ``mondrian``; options k, l, t, max_suppression). With any of
  the options ``micro_k``, ``noise``, ``time_grid`` the measured values and event
  times are perturbed too
  (:func:`~phems_clinical.privacy.release.anonymise_longitudinal`);
  with ``target`` (risk name -> upper bound) the least-loss setting meeting the
  bounds is searched on the site's own training data
  (:func:`~phems_clinical.privacy.target_risk.search_target_risk`; see
  :data:`ANONYMISED_OPTIONS`).
- ``synthetic`` with the use case's longitudinal generator (its ``generator``:
  ``virtual`` for haemophilia PK, ``sequence`` for PICU hours, ``pathway`` for
  cardiac pathways), ``copula``: a Gaussian copula of the patient profiles
  (:mod:`.profiles`), or ``mst``: differentially private marginals (MST) of the
  patient profiles, with its epsilon and delta; unit of
  privacy one patient (one profile row per patient, or per episode/stay where a
  patient has several: then the unit is the episode/stay; said in the metadata).

Every function takes the use case as an object (``use_case``: a
:class:`phems_clinical.usecases.UseCase`, e.g. ``phems_clinical.usecases.get(
"picu")``) and asks it for its roles, profile, generator and utility metrics;
nothing here branches on a use case's name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd

from phems_clinical.data.split import split_ids
from phems_clinical.evaluation import scorecard as sc
from phems_clinical.evaluation.classification import auroc
from phems_clinical.evaluation.profiles import profile
from phems_clinical.privacy.fidelity import logistic_transfer
from phems_clinical.privacy.release import (
    BAND_SUFFIX,
    anonymise,
    anonymise_longitudinal,
    patient_table,
)
from phems_clinical.privacy.target_risk import default_ladder, search_target_risk
from phems_clinical.progress import ProgressFn, silent, step

__all__ = [
    "ANONYMISED_OPTIONS",
    "TARGET_RISKS",
    "Derived",
    "SourceError",
    "SourceSpec",
    "default_sources",
    "derive",
    "profile_domain",
    "score_sources",
    "split_patients",
]


class SourceError(ValueError):
    """A data source cannot be produced (names the option and what was expected)."""


def _use_case(use_case):
    """``use_case`` when it is a use-case object; a name is refused (this layer
    never looks names up: the caller passes ``phems_clinical.usecases.get(name)``)."""
    if isinstance(use_case, str):
        raise SourceError(
            f"use case {use_case!r}: pass the use-case object "
            f"(phems_clinical.usecases.get({use_case!r})), not its name"
        )
    return use_case


@dataclass(frozen=True)
class SourceSpec:
    """One data source: ``name`` (unique label), ``kind`` ('real', 'anonymised',
    'synthetic'), ``method`` (see the module docstring) and its ``options``."""

    name: str
    kind: str
    method: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)


def default_sources(
    use_case,
    *,
    k: int = 5,
    max_suppression: float = 0.05,
    epsilon: float = 1.0,
    delta: float = 1e-6,
) -> list[SourceSpec]:
    """real, anonymised (lattice, k), synthetic (longitudinal generator) and
    synthetic-mst (epsilon, delta) for ``use_case``."""
    use_case = _use_case(use_case)
    return [
        SourceSpec("real", "real"),
        SourceSpec(
            "anonymised",
            "anonymised",
            "lattice",
            {"k": k, "max_suppression": max_suppression},
        ),
        SourceSpec("synthetic", "synthetic", use_case.generator),
        SourceSpec(
            "synthetic-mst", "synthetic", "mst", {"epsilon": epsilon, "delta": delta}
        ),
    ]


class Derived(NamedTuple):
    """A derived source: the analysis table (``None`` for profile-level sources),
    its patient profiles, metadata (kind, method, epsilon, delta, unit, sizes,
    seconds) and the method's report (what changed, or what was fitted)."""

    spec: SourceSpec
    data: pd.DataFrame | None
    profile: pd.DataFrame
    meta: dict
    report: dict


def split_patients(
    key, data: pd.DataFrame, use_case, holdout: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split one site's table by patient into (train, holdout)."""
    if not 0.0 < holdout < 1.0:
        raise SourceError(f"holdout: expected a share in (0, 1), got {holdout!r}")
    pid = _use_case(use_case).patient_id
    n_ids = int(data[pid].nunique())
    n_hold = int(round(holdout * n_ids))
    if n_hold < 5 or n_ids - n_hold < 10:
        raise SourceError(
            f"holdout={holdout}: {n_ids} patients give {n_hold} "
            f"held out and {n_ids - n_hold} for training; need >= 5 "
            f"and >= 10"
        )
    _, hold = split_ids(key, data[pid], holdout)
    mask = data[pid].isin(hold).to_numpy()
    return data[~mask].reset_index(drop=True), data[mask].reset_index(drop=True)


# -------------------------------------------------------------------- MST domain
def profile_domain(use_case) -> dict:
    """The public MST domain of a use case's profile columns (its
    ``profile_bounds``: clinical ranges, never read from the data; on the MST
    scale: ``log1p`` for the skewed ones; ``may_be_missing`` columns get a missing
    cell)."""
    from phems_clinical.privacy.synth import mst

    use_case = _use_case(use_case)
    out = {}
    for col, spec in use_case.profile_bounds.items():
        miss = col in use_case.may_be_missing
        if isinstance(spec, list):
            out[col] = mst.Categorical(tuple(spec), missing=miss)
            continue
        lo, hi, bins = float(spec[0]), float(spec[1]), int(spec[2])
        if len(spec) > 3:  # bins equal on the log1p scale: fine where data crowd
            lo, hi = np.log1p(lo), np.log1p(hi)
        out[col] = mst.Numeric(lo, hi, bins, missing=miss)
    return out


# -------------------------------------------------------------------- derive
def _meta(
    spec: SourceSpec,
    use_case: str,
    n_in: int,
    prof: pd.DataFrame,
    seconds: float,
    **extra,
) -> dict:
    return {
        "kind": spec.kind,
        "method": spec.method,
        "epsilon": float("nan"),
        "delta": float("nan"),
        "unit_of_privacy": "",
        "n_patients_source": n_in,
        "n_profiles": len(prof),
        "seconds": seconds,
        **extra,
    }


def derive(
    key,
    use_case,
    data: pd.DataFrame,
    spec: SourceSpec,
    *,
    pk_model=None,
    pk_params=None,
    noise=None,
) -> Derived:
    """Derive one source from a site's (training) analysis table.

    ``pk_model`` (a :class:`phems_clinical.pk.spec.PopModel`) is needed for the
    haemophilia ``virtual`` generator; ``pk_params`` (population parameters) are
    fitted on ``data`` by FOCEI when not given. ``noise`` is the MST noise
    generator (default: fresh OS-CSPRNG draws nobody keeps); pass
    ``secret_generator(s)`` with a secret ``s`` kept at the site only to replay a
    release exactly (see :func:`phems_clinical.privacy.synth.mst.fit_mst`).
    """
    use_case = _use_case(use_case)
    n_in = int(data[use_case.patient_id].nunique())
    t0 = time.perf_counter()
    opts = dict(spec.options)
    if spec.kind == "real":
        out, report = data, {}
    elif spec.kind == "anonymised":
        method = "lattice" if spec.method == "none" else spec.method
        qi, lon, target = _anonymised_options(spec, use_case)
        if target:
            rel = _target_release(key, use_case, data, spec.name, method, qi, target)
        elif lon:
            rel = anonymise_longitudinal(
                key, data, use_case.roles, method=method, **qi, **lon
            )
        else:  # QI generalisation only (the default)
            rel = anonymise(key, data, use_case.roles, method=method, **qi)
        out, report = rel.data, rel.report
    elif spec.kind == "synthetic" and spec.method == "mst":
        from phems_clinical.privacy.synth import mst

        prof = profile(use_case, data)
        eps = opts.get("epsilon", 1.0)
        delta = opts.get("delta", 1e-6)
        k_fit, k_sample = jax.random.split(key)
        logs = use_case.log_columns
        scaled = prof.assign(**{c: np.log1p(prof[c].astype(float)) for c in logs})
        model = mst.fit_mst(
            k_fit,
            scaled,
            profile_domain(use_case),
            epsilon=eps,
            delta=delta,
            noise=noise,
        )
        n = int(opts.get("n") or max(1, round(model.n_estimate)))
        syn = mst.sample_mst(k_sample, model, n)
        for c in logs:
            back = np.expm1(syn[c].astype(float))
            syn[c] = (
                back.round().astype(prof[c].dtype)
                if pd.api.types.is_integer_dtype(prof[c])
                else back
            )
        meta = _meta(
            spec,
            use_case,
            n_in,
            syn,
            time.perf_counter() - t0,
            epsilon=float(eps),
            delta=float(delta),
            unit_of_privacy=use_case.unit,
        )
        b = model.budget
        report = {
            "generator": "MST (McKenna et al. 2021) on patient profiles",
            "rho_zcdp": b.rho,
            "sigma_one_way": b.sigma_one_way,
            "sigma_two_way": b.sigma_two_way,
            "tree": [list(map(str, e)) for e in model.tree],
            "n_rows_noisy": float(model.n_estimate),
            "noise_source": model.noise_source,
        }
        return Derived(spec, None, syn, meta, report)
    elif spec.kind == "synthetic" and spec.method == "copula":
        from phems_clinical.privacy.synth import fit_copula, sample_copula

        prof = profile(use_case, data)
        model = fit_copula(prof, categorical=use_case.categorical)
        syn = sample_copula(key, model, int(opts.get("n") or len(prof)))
        meta = _meta(spec, use_case, n_in, syn, time.perf_counter() - t0)
        return Derived(
            spec,
            None,
            syn,
            meta,
            {
                "generator": "Gaussian copula on patient profiles (not DP: its "
                "marginals are the data's quantiles)"
            },
        )
    elif spec.kind == "synthetic":
        out, report = _synthesise(
            key, use_case, data, spec.method, opts, pk_model, pk_params
        )
    else:
        raise SourceError(
            f"source {spec.name!r}: kind {spec.kind!r} is not one of "
            f"'real', 'anonymised', 'synthetic'"
        )
    prof = profile(use_case, out)
    unit = "patient (k-anonymity)" if spec.kind == "anonymised" else ""
    return Derived(
        spec,
        out,
        prof,
        _meta(
            spec, use_case, n_in, prof, time.perf_counter() - t0, unit_of_privacy=unit
        ),
        report,
    )


#: Options of an ``anonymised`` source: the QI generalisation of
#: :func:`phems_clinical.privacy.release.anonymise`, then the perturbation of the
#: longitudinal values and times (:mod:`phems_clinical.privacy.perturb`):
#: ``micro_k`` (MDAV group size of each course's level, >= 2), ``noise`` (CV of
#: the log-normal noise of concentrations and labs; SD, as a fraction of the
#: column SD, of the normal noise of vital signs), ``time_grid`` (event times
#: rounded up, in the use case's time unit), or ``target``: risk name -> upper
#: bound of its 95 % interval, for which the least-loss setting is searched.
ANONYMISED_OPTIONS = {
    "qi": (
        "k",
        "l",
        "t",
        "sensitive",
        "max_suppression",
        "metric",
        "suppression",
        "max_shift_days",
    ),
    "longitudinal": ("micro_k", "noise", "time_grid"),
    "search": ("target",),
}

#: Risks a ``target`` may bound (names of :func:`.scorecard.privacy_scores`).
TARGET_RISKS = (
    "singling_out_risk",
    "singling_out_risk_multivariate",
    "linkability_risk",
    "inference_risk",
    "mia_auc",
)

#: Share of the site's training patients held out as the attacks' control set
#: during a target-risk search (the scorecard's own holdout is never used).
TARGET_CONTROL = 0.5


def _number(
    name: str, opt: str, x, *, minimum: float, strict: bool, integer: bool = False
):
    """``x`` checked as a finite number (an integer if ``integer``) >= or >
    ``minimum``; the error names the source and option."""
    ok = not isinstance(x, bool) and isinstance(
        x, (int, np.integer) if integer else (int, float, np.integer, np.floating)
    )
    ok = ok and bool(np.isfinite(x)) and (x > minimum if strict else x >= minimum)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise SourceError(
            f"source {name!r}: option {opt!r}: expected {what} "
            f"{'>' if strict else '>='} {minimum:g}, got {x!r}"
        )
    return int(x) if integer else float(x)


def _anonymised_options(spec: SourceSpec, use_case) -> tuple[dict, dict, dict]:
    """(QI options, longitudinal options, risk targets) of an ``anonymised``
    source, checked; longitudinal options left unset (None, or noise 0) are
    dropped, so a spec without them gives today's QI-only release."""
    opts = dict(spec.options)
    known = [o for g in ANONYMISED_OPTIONS.values() for o in g]
    bad = [o for o in opts if o not in known]
    if bad:
        raise SourceError(
            f"source {spec.name!r}: option(s) {bad} are not options "
            f"of an anonymised source; expected some of {known}"
        )
    qi = {o: opts[o] for o in ANONYMISED_OPTIONS["qi"] if o in opts}
    lon: dict = {}
    if opts.get("micro_k") is not None:
        lon["micro_k"] = _number(
            spec.name, "micro_k", opts["micro_k"], minimum=2, strict=False, integer=True
        )
    if opts.get("noise") is not None:
        noise = _number(spec.name, "noise", opts["noise"], minimum=0, strict=False)
        if noise > 0:
            lon["noise"] = noise
    if opts.get("time_grid") is not None:
        lon["time_grid"] = _number(
            spec.name, "time_grid", opts["time_grid"], minimum=0, strict=True
        )
    target = opts.get("target")
    if target is not None:
        if not isinstance(target, Mapping) or not target:
            raise SourceError(
                f"source {spec.name!r}: option 'target': expected a "
                f"mapping of risk name -> upper bound, e.g. "
                f"{{singling_out_risk: 0.2}}, got {target!r}"
            )
        bad = [t for t in target if t not in TARGET_RISKS]
        if bad:
            raise SourceError(
                f"source {spec.name!r}: option 'target': {bad} are not "
                f"risks it can bound; expected some of {TARGET_RISKS}"
            )
        target = {
            str(t): _number(spec.name, f"target.{t}", v, minimum=0, strict=False)
            for t, v in target.items()
        }
        over = [t for t, v in target.items() if v > 1]
        if over:
            raise SourceError(
                f"source {spec.name!r}: option 'target': bounds of "
                f"{over} must be risks in [0, 1]"
            )
        if lon:
            raise SourceError(
                f"source {spec.name!r}: option 'target' chooses "
                f"micro_k, noise and time_grid itself; drop "
                f"{sorted(lon)} or the target"
            )
    used = [*lon, *(["target"] if target else [])]
    if used and use_case.roles.longitudinal is None:
        raise SourceError(
            f"source {spec.name!r}: option(s) {used} need the "
            f"longitudinal columns of {use_case.name}, and its roles "
            f"declare none"
        )
    return qi, lon, target or {}


def _target_release(
    key, use_case, data: pd.DataFrame, name: str, method: str, qi: dict, target: dict
):
    """The release of ``data`` with the least-loss setting (QI ``k`` as stated;
    :func:`~phems_clinical.privacy.target_risk.default_ladder` of micro_k, noise,
    time grid) whose attack risks meet ``target``, searched on the site's own
    training data: the patients are split (:data:`TARGET_CONTROL` held out), each
    setting's release of the inner part is attacked with the held-out part as
    control (:func:`.scorecard.privacy_scores`, anonymeter's design; Giomi et al.,
    PoPETs 2023), then the chosen setting is applied to all of ``data``. No
    setting meeting the bounds is an error naming the bound and the best reached
    (nothing is released)."""
    k_split, k_search, k_rel = jax.random.split(key, 3)
    try:
        inner, control = split_patients(k_split, data, use_case, TARGET_CONTROL)
    except SourceError as e:
        raise SourceError(
            f"source {name!r}: option 'target' needs enough patients "
            f"to attack its own releases: {e}"
        ) from None
    inner_p, control_p = profile(use_case, inner), profile(use_case, control)
    aux, secret = use_case.attack_columns
    n_att = int(min(200, len(inner_p), len(control_p)))

    def measure(k, released):
        got = profile(use_case, released)[list(inner_p.columns)]
        return sc.privacy_scores(
            k,
            inner_p,
            control_p,
            got,
            aux_cols=list(aux),
            secret=secret,
            n_attacks=n_att,
        )

    k = qi.get("k", 5)
    rest = {o: v for o, v in qi.items() if o != "k"}
    res = search_target_risk(
        k_search,
        inner,
        use_case.roles,
        target,
        measure,
        ladder=default_ladder(use_case.roles, k=(k,)),
        method=method,
        **rest,
    )
    if not res.met:
        raise SourceError(f"source {name!r}: option 'target': {res.message}")
    s = res.setting
    rel = anonymise_longitudinal(
        k_rel,
        data,
        use_case.roles,
        method=method,
        **{**qi, "k": s.k},
        micro_k=s.micro_k,
        noise=s.noise,
        time_grid=s.time_grid,
    )
    steps = [
        {
            "setting": st.setting._asdict(),
            "information_loss": st.loss,
            "suppressed_share": st.suppressed_share,
            "risks": {r: list(v) for r, v in st.risks.items()},
            "meets": st.meets,
            "error": st.error,
        }
        for st in res.steps
    ]
    search = {
        "targets": res.targets,
        "setting": s._asdict(),
        "message": res.message,
        "control_share": TARGET_CONTROL,
        "patients_searched": int(inner[use_case.patient_id].nunique()),
        "steps": steps,
    }
    return rel._replace(report={**rel.report, "target_risk": search})


def _synthesise(key, use_case, data, method, opts, pk_model, pk_params):
    want = use_case.generator
    if method != want:
        raise SourceError(
            f"synthetic method {method!r} does not apply to "
            f"{use_case.name}; use {want!r}, 'copula' or 'mst'"
        )
    return use_case.synthesise(key, data, opts, pk_model, pk_params)


# -------------------------------------------------------------------- scoring
#: Tabular train-on-source, test-on-real check that every source gets, profile-level
#: ones (MST) included: a ridge logistic model of death from the profile features
#: of the use case's ``outcome`` (features known before the outcome only: follow-up
#: time would leak death).
OUTCOME_METRIC = {
    "outcome_auroc": sc.MetricSpec(
        "utility",
        "higher",
        float("nan"),
        -0.05,
        float("inf"),
        "relative_to_real",
        "Death model AUROC (patient profiles)",
        "A simple model of death, trained on this source's patient summaries and "
        "tested on held-out real patients: area under the ROC curve (0.5 = chance; "
        "compare with the real data's value).",
        "Rankin et al., JMIR Med Inform 2020;8:e18910 (train on synthetic, test on "
        "real); flag limit 0.05 below real is ours",
    ),
}


def outcome_auroc(
    source_profile: pd.DataFrame,
    test_profile: pd.DataFrame,
    outcome: str,
    features: Sequence[str],
) -> float:
    """AUROC on ``test_profile`` of a ridge logistic model of ``outcome`` from
    ``features``, fitted on ``source_profile`` (NaN when the source has a single
    outcome class)."""
    y = source_profile[outcome].to_numpy(float)
    ok = ~np.isnan(y)
    if len(np.unique(y[ok])) < 2:
        return float("nan")
    feats = list(features)
    p = logistic_transfer(source_profile.loc[ok, feats], y[ok], test_profile[feats])
    return auroc(test_profile[outcome].to_numpy(float), p)


def _utility(
    key, use_case, src: Derived, train, holdout, hold_p, pk_model, real_fit
) -> dict:
    out: dict = {}
    if use_case.outcome is not None:
        outcome, feats = use_case.outcome
        out["outcome_auroc"] = outcome_auroc(src.profile, hold_p, outcome, feats)
    if src.data is None or use_case.utility is None:  # profile-level source: no
        return out  # model of the full data
    out.update(
        sc.utility_scores(
            use_case.utility(key, src.data, train, holdout, pk_model, real_fit)
        )
    )
    return out


def score_sources(
    key,
    use_case,
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    derived: Sequence[Derived],
    *,
    n_attacks: int = 200,
    utility: bool = True,
    pk_model=None,
    seed: int = 0,
    progress: ProgressFn = silent,
):
    """Score every derived source the same way; an xarray Dataset (source, metric).

    Fidelity compares each source's patient profiles with the real training
    profiles; the privacy attacks target the training patients with the holdout
    as control (the attacker knows a patient's original values); utility trains on
    the source and tests on the holdout (real patients); anonymised sources also
    get k, l, t and re-identification risks of their released patient table.
    ``progress``: one ``score`` step per source scored
    (:mod:`phems_clinical.progress`).
    """
    use_case = _use_case(use_case)
    real_p = profile(use_case, train)
    hold_p = profile(use_case, holdout)
    aux, secret = use_case.attack_columns
    n_att = int(min(n_attacks, len(hold_p), len(real_p)))
    real_fit = None
    if utility and use_case.reference_fit is not None and pk_model is not None:
        real_fit = use_case.reference_fit(train, pk_model)
    scores, meta = {}, {}
    for i, src in enumerate(derived):
        k_f, k_p, k_u = jax.random.split(jax.random.fold_in(key, i), 3)
        s: dict = {}
        syn_p = src.profile[list(real_p.columns)]
        # the real source is the training data itself: its fidelity is shown as
        # that of the holdout, i.e. how far two real samples of the site differ
        s.update(
            sc.fidelity_scores(
                k_f, real_p, hold_p if src.spec.kind == "real" else syn_p
            )
        )
        s.update(
            sc.privacy_scores(
                k_p,
                real_p,
                hold_p,
                syn_p,
                aux_cols=list(aux),
                secret=secret,
                n_attacks=n_att,
            )
        )
        if src.spec.kind == "anonymised":
            cfg = src.report["config"]
            qis = cfg["quasi_identifiers"]
            sens = cfg.get("sensitive") or (use_case.roles.sensitive or (None,))[0]
            pt = _release_patients(src.data, use_case, qis, sens)
            s.update(sc.anonymity_scores(pt, [q + BAND_SUFFIX for q in qis], sens))
        if utility:
            s.update(
                _utility(k_u, use_case, src, train, holdout, hold_p, pk_model, real_fit)
            )
        scores[src.spec.name] = s
        meta[src.spec.name] = dict(src.meta)
        step(progress, "score", i + 1, len(derived), src.spec.name)
    return sc.build_scorecard(
        scores,
        sources_meta=meta,
        use_case=use_case.name,
        seed=int(seed),
        extra_metrics=OUTCOME_METRIC,
    )


def _release_patients(data, use_case, qis, sensitive):
    """One row per released patient: the QI labels and the sensitive value."""
    pid = use_case.patient_id
    bands = [q + BAND_SUFFIX for q in qis]
    pt = data.groupby(pid, sort=False)[bands].first()
    if sensitive is not None:
        pt[sensitive] = patient_table(data, use_case.roles)[sensitive].reindex(pt.index)
    return pt.reset_index(drop=True)
