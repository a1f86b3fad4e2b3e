#!/usr/bin/env python
"""Validation of the dosing tool's Bayesian forecasting on simulated patients.

Question: from 1, 2 or 3 levels taken in the ISTH windows after one PK infusion,
how accurately and how honestly (interval coverage) does the MAP-Laplace forecast
of ``phems_clinical.pk.forecast`` recover a patient's clearance, terminal half-life
and time to 1 IU/dL, against Preijers et al.'s limited-sampling figures?

For each scenario, ``--n`` virtual patients (default 1000) are simulated with
:func:`phems_clinical.pk.simulate.simulate_cohort` (washout PK study, 50 IU/kg
rounded up to whole vials, 10-min infusion, the simulator's 3-sample ``sparse``
design in ISTH windows, LLOQ 1 IU/dL, ages within the validated range of the
model(s) involved). Each patient is then forecast with the prior model from
0 (prior only), 1 (last sample), 2 (first + last) and 3 (all) samples:
``fit_map_batch`` (one vmapped compile per model) and ``--draws`` Laplace draws per
patient (standard normals times the Cholesky factor of each covariance). The
reported point estimate is the median of the draws and the interval the 5-95 %
quantiles, as in ``phems dose`` (``app/dose.py``). Truth is computed with
``phems_clinical.pk.derived`` from the simulator's true individual parameters.

Scenarios: advate, eloctate and alprolix (prior = simulation model), and three
misspecified ones (patients simulated from another published model, forecast with
a library prior): kovaltry -> advate, chelle2019 -> advate, koopman2024 -> alprolix.
For the first three, ``--nuts-n`` patients (default 100) are also fitted by
``fit_nuts_individual`` (its defaults) on the 3- and 1-sample designs, to compare
the MAP-Laplace summaries with the full posterior.

As in ``phems dose``, BLQ levels always enter the forecast by M3, whatever the
library entry says (eloctate's ``blq: drop``); one diagnostic scenario shows the
effect of dropping them instead.

Run from the repository root:

    python experiments/dosing_validation/validate.py            # full, ~6-7 min CPU
    python experiments/dosing_validation/validate.py --quick    # smoke run, ~4 min
    python experiments/dosing_validation/validate.py --n 2000 --seed 7 --out /tmp/v

Writes ``results.md`` and ``results.csv`` (tidy: one metric a row; ``results_quick.*``
with ``--quick``) next to this script (``--out DIR`` to change) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import inspect
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

if "JAX_PLATFORMS" not in os.environ:
    # the numbers do not depend on the device; pin the CPU quietly unless asked
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

from phems_clinical.data.nonmem import read_nonmem, to_cohort  # noqa: E402
from phems_clinical.pk.derived import (  # noqa: E402
    effective_half_life,
    terminal_half_life,
    time_to_threshold,
)
from phems_clinical.pk.dosing import recommend, validated_range  # noqa: E402
from phems_clinical.pk.focei import build_focei  # noqa: E402
from phems_clinical.pk.forecast import fit_map_batch, fit_nuts_individual  # noqa: E402
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.model import individual_parameters, initial_params  # noqa: E402
from phems_clinical.pk.simulate import (  # noqa: E402
    SPARSE_EHL,
    SPARSE_SHL,
    HospitalSpec,
    simulate_cohort,
)
from phems_clinical.pk.spec import PopModel  # noqa: E402
from phems_clinical.provenance import device_info  # noqa: E402

# ---------------------------------------------------------------------------
# Set-up

THRESHOLD = 1.0  # IU/dL
DOSE_IU_KG = 50.0
LLOQ = 1.0  # IU/dL, the simulator's default
DEFAULT_MAX_AGE = 65.0  # when a model gives no upper age (eloctate: ">= 12 y")
QUANTITIES = ("CL", "t_half", "t_1")  # headline quantities
LABELS = {"CL": "CL", "t_half": "t½", "t_1": "time to 1 IU/dL",
          "CL_occ": "CL of the PK occasion", "t_half_eff": "effective t½"}

# which of the 3 sparse samples each design keeps (0 = prior only)
DESIGN_SAMPLES = {0: (), 1: (2,), 2: (0, 2), 3: (0, 1, 2)}

# Preijers et al. (rFIX, 5000 simulated patients, 100 IU/kg, 11 designs with 1-3
# samples within 80 h; pk_models.md section 2): mean bias and imprecision, %.
PREIJERS = {"CL": ((-1.5, 1.4), (6.4, 11.9)), "t_half": ((-4.5, -0.7), (10.3, 15.6)),
            "t_1": ((-2.9, 0.0), (7.3, 10.9))}


class Scenario(NamedTuple):
    name: str
    sim: str  # model the patients are simulated from
    prior: str  # library model used as the prior
    nuts: bool  # run the MAP-vs-NUTS comparison
    group: str  # report table: "main" or "robust"
    cohort: int  # simulation key index: equal -> the same virtual patients
    blq: str = "m3"  # how BLQ levels enter the forecast


SCENARIOS = (
    Scenario("advate", "advate", "advate", True, "main", 0),
    Scenario("eloctate", "eloctate", "eloctate", True, "main", 1),
    # diagnostic: the same patients with their BLQ levels dropped, as the library
    # entry says (blq: drop, how Nestorov fitted) and as the tool did before it
    # forced M3
    Scenario("eloctate, BLQ dropped (diagnostic)", "eloctate", "eloctate", False,
             "main", 1, "drop"),
    Scenario("alprolix", "alprolix", "alprolix", True, "main", 2),
    Scenario("kovaltry → advate", "kovaltry", "advate", False, "robust", 3),
    Scenario("chelle2019 → advate", "chelle2019", "advate", False, "robust", 4),
    Scenario("koopman2024 → alprolix", "koopman2024", "alprolix", False, "robust", 5),
)

_MODELS: dict[tuple, PopModel] = {}


def model(name: str, blq: str | None = None) -> PopModel:
    """One model object per (product, BLQ handling), so compiled code is reused.

    ``blq="m3"`` is the forecasting model of ``phems dose``: BLQ levels always enter
    by M3 (``app/dose.py``, ``_for_forecasting``); ``None`` is the library entry.
    """
    key = (name, blq)
    if key not in _MODELS:
        m = load_product(name)
        _MODELS[key] = m if blq is None else dataclasses.replace(m, blq=blq)
    return _MODELS[key]


def prior_model(sc: Scenario) -> PopModel:
    return model(sc.prior, sc.blq)


def nuts_defaults() -> str:
    sig = inspect.signature(fit_nuts_individual).parameters
    return (f"{sig['num_chains'].default} chains, {sig['num_warmup'].default} warm-up"
            f" + {sig['num_samples'].default} draws each")


def age_range(*models: PopModel) -> tuple[float, float]:
    """Intersection of the validated age ranges (65 y where none gives an upper
    bound)."""
    lo, hi = 0.0, math.inf
    for m in models:
        a, b = validated_range(m)["AGE"]
        lo = max(lo, float(a) if a is not None else 0.0)
        hi = min(hi, float(b) if b is not None else math.inf)
    return lo, (hi if math.isfinite(hi) else DEFAULT_MAX_AGE)


def design_label(k: int, m: PopModel) -> str:
    t = [f"{w[0]:g}" for w in (SPARSE_EHL if m.extended_half_life else SPARSE_SHL)]
    if k == 0:
        return "0 (prior only)"
    return f"{k} ({'/'.join(t[i] for i in DESIGN_SAMPLES[k])} h)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Quantities: the same definitions as pk.dosing.recommend


def _quantities(m: PopModel, own, occ, dose_time, dose_amt, dose_dur, baseline):
    """CL, terminal and effective t½ of the patient's own parameters (IOV kappa = 0)
    and the time to 1 IU/dL after the end of the infusion with that occasion's
    parameters (``occ``: (n_par,), one occasion). ``CL_occ``: the occasion's CL."""
    n = m.n_cmt
    end = jnp.max(jnp.where(dose_amt > 0, dose_time + dose_dur, -jnp.inf))
    per_dose = jnp.broadcast_to(occ, (dose_time.shape[0], occ.shape[0]))
    t1 = time_to_threshold(THRESHOLD, end, dose_time, dose_amt, dose_dur, per_dose,
                           n, baseline) - end
    return {"CL": own[0], "t_half": terminal_half_life(own, n), "t_1": t1,
            "CL_occ": occ[0], "t_half_eff": effective_half_life(own, n)}


def _from_b(m: PopModel, theta, b, cov, dt, da, dd, baseline):
    """Quantities of one draw ``b = (eta, kappa of the single occasion)``."""
    eta = b[:m.n_eta]
    kappa = b[m.n_eta:].reshape(1, m.n_kappa)
    own = individual_parameters(m, theta, eta, jnp.zeros((1, m.n_kappa)), cov)[0]
    occ = individual_parameters(m, theta, eta, kappa, cov)[0]
    return _quantities(m, own, occ, dt, da, dd, baseline)


_JIT: dict = {}


def draws_fn(m: PopModel):
    """jit(vmap over patients of vmap over draws) of :func:`_from_b`."""
    key = ("draws", id(m))
    if key not in _JIT:
        one = jax.vmap(lambda th, b, c, dt, da, dd, base: _from_b(m, th, b, c, dt, da,
                                                                  dd, base),
                       in_axes=(None, 0, None, None, None, None, None))
        _JIT[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0, None)))
    return _JIT[key]


def truth_fn(m: PopModel):
    key = ("truth", id(m))
    if key not in _JIT:
        _JIT[key] = jax.jit(jax.vmap(
            lambda own, occ, dt, da, dd, base: _quantities(m, own, occ, dt, da, dd,
                                                           base),
            in_axes=(0, 0, 0, 0, 0, None)))
    return _JIT[key]


def draw_quantities(m, params, cohort, b, chunk=250):
    """Quantities for b (n_pat, n_draws, n_b), in chunks of patients (memory)."""
    f = draws_fn(m)
    out: dict[str, list] = {}
    n = b.shape[0]
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        q = f(params.theta, b[sl], cohort.covariates[sl], cohort.dose_time[sl],
              cohort.dose_amt[sl], cohort.dose_dur[sl], params.baseline)
        for k, v in q.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}


def log_weights_fn(m: PopModel):
    """Importance log-weights of Laplace draws against the exact posterior:
    ``-O(b)/2 - log N(b; b_hat, cov)`` (up to a constant per patient), with ``O``
    the forecast's objective (``build_focei(...).inner_objective``)."""
    key = ("logw", id(m))
    if key not in _JIT:
        inner = build_focei(m, 1).inner_objective

        def one(b, b_hat, cov, params, subject):
            d = b - b_hat
            lq = -0.5 * jnp.einsum("ki,ij,kj->k", d, jnp.linalg.inv(cov), d)
            o = jax.vmap(inner, in_axes=(0, None, None))(b, params, subject)
            return -0.5 * o - lq

        _JIT[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, 0)))
    return _JIT[key]


def importance_weights(m, params, cohort, res, b, chunk=250):
    """Self-normalised weights (n_pat, n_draws) and their effective sample size."""
    f = log_weights_fn(m)
    out = []
    for s in range(0, b.shape[0], chunk):
        sl = slice(s, min(b.shape[0], s + chunk))
        out.append(np.array(f(b[sl], res.b[sl], res.cov[sl], params,
                              take_slice(cohort, sl))))
    lw = np.concatenate(out)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    w = np.exp(lw - lw.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return w, 1.0 / np.sum(w ** 2, axis=1)


def weighted_quantiles(x, w, probs):
    """Per-row quantiles of ``x`` (n, k) under weights ``w`` (n, k): the smallest
    value whose cumulative weight reaches each probability."""
    order = np.argsort(x, axis=1)
    xs = np.take_along_axis(x, order, axis=1)
    cw = np.cumsum(np.take_along_axis(w, order, axis=1), axis=1)
    rows = np.arange(x.shape[0])
    return [xs[rows, np.minimum(np.sum(cw < p, axis=1), x.shape[1] - 1)]
            for p in probs]


# ---------------------------------------------------------------------------
# One scenario


def simulate(key, sc: Scenario, n: int):
    """Events -> prior-model cohort, and the true quantities per patient."""
    sim, prior = model(sc.sim), prior_model(sc)
    ages = age_range(sim, prior)
    events, truth = simulate_cohort(key, sim, HospitalSpec(
        sc.sim, n, age_range=ages, design="sparse", dose_IU_per_kg=DOSE_IU_KG,
        washout_fraction=1.0, occasions=1, lloq_IU_dL=LLOQ))
    need = sorted(set(prior.covariate_names) | set(sim.covariate_names))
    data = read_nonmem(events, required_covariates=need)
    cohort, ids = to_cohort(data, prior.covariate_names)
    sim_cohort, ids2 = to_cohort(data, sim.covariate_names)
    assert ids == ids2 and len(ids) == n
    assert cohort.obs_time.shape[1] == 3 and bool(jnp.all(cohort.obs_mask))
    truth = truth.set_index(truth["ID"].astype(str)).loc[ids]

    # The truth table holds the parameters of the (single) occasion:
    # TV * exp(eta + kappa). The patient's own parameters have kappa = 0.
    ps = initial_params(sim)
    eta = jnp.asarray(truth[[f"ETA_{p}" for p in sim.iiv_parameters]].to_numpy())
    occ = jnp.asarray(truth[list(sim.structural)].to_numpy())
    no_kappa = jnp.zeros((1, sim.n_kappa))
    own = jax.vmap(lambda e, c: individual_parameters(sim, ps.theta, e, no_kappa,
                                                      c)[0])(eta, sim_cohort.covariates)
    ratio = np.log(np.asarray(occ) / np.asarray(own))
    iov_cols = [sim.structural.index(p) for p in sim.iov_parameters]
    other = [j for j in range(len(sim.structural)) if j not in iov_cols]
    assert np.max(np.abs(ratio[:, other])) < 1e-9, "truth table != TV*exp(eta)"
    kappa_sd = {p: float(np.std(ratio[:, j]))
                for p, j in zip(sim.iov_parameters, iov_cols, strict=True)}
    tq = truth_fn(sim)(own, occ, sim_cohort.dose_time, sim_cohort.dose_amt,
                       sim_cohort.dose_dur, ps.baseline)
    tq = {k: np.asarray(v) for k, v in tq.items()}
    blq = np.asarray(cohort.obs_blq).mean(axis=0)
    info = dict(ages=ages, kappa_sd=kappa_sd, blq_by_sample=blq,
                weight=np.asarray(events.groupby("ID", sort=False)["WT"].first()
                                  .reindex([int(i) for i in ids])),
                dose_per_kg=float(np.median(np.asarray(cohort.dose_amt[:, 0])
                                            / events.groupby("ID")["WT"].first()
                                            .reindex([int(i) for i in ids]))),
                times=np.asarray(cohort.obs_time))
    return cohort, tq, info


def take(tree, i: int):
    """Patient ``i`` of a batched pytree (no leading axis)."""
    return jax.tree.map(lambda x: x[i], tree)


def take_slice(tree, sl: slice):
    return jax.tree.map(lambda x: x[sl], tree)


def take1(tree, i: int):
    """Patient ``i`` of a batched pytree, keeping a leading axis of 1."""
    return jax.tree.map(lambda x: x[i:i + 1], tree)


def with_design(cohort, k: int):
    keep = np.zeros(cohort.obs_time.shape[1], bool)
    keep[list(DESIGN_SAMPLES[k])] = True
    return cohort._replace(obs_mask=cohort.obs_mask & jnp.asarray(keep)[None, :])


def laplace_batch(key, res, n_draws: int):
    """Draws from N(b_hat, cov) for every patient: b_hat + L z."""
    n, n_b = res.b.shape
    z = jax.random.normal(key, (n, n_draws, n_b))
    chol = jnp.linalg.cholesky(res.cov)
    return res.b[:, None, :] + jnp.einsum("nij,nkj->nki", chol, z)


def metrics(est: np.ndarray, true: np.ndarray, lo=None, hi=None) -> dict:
    rpe = (est - true) / true
    out = {"n": int(np.sum(np.isfinite(rpe))),
           "bias_mean_pct": 100 * float(np.nanmean(rpe)),
           "bias_median_pct": 100 * float(np.nanmedian(rpe)),
           "rrmse_pct": 100 * float(np.sqrt(np.nanmean(rpe ** 2))),
           "n_nonfinite": int(np.sum(~np.isfinite(rpe)))}
    if lo is not None:
        out["coverage90_pct"] = 100 * float(np.mean((lo <= true) & (true <= hi)))
        out["width90_rel_median"] = float(np.median((hi - lo) / est))
    return out


def run_scenario(idx: int, sc: Scenario, args, rows: list, notes: list) -> dict:
    # patients from the scenario's cohort key; draws from the scenario's own key
    k_sim = jax.random.fold_in(jax.random.PRNGKey(args.seed), sc.cohort)
    root = jax.random.fold_in(jax.random.PRNGKey(args.seed), 1000 + idx)
    k_draw, k_rec = jax.random.split(root)
    prior = prior_model(sc)
    params = initial_params(prior)
    t0 = time.perf_counter()
    cohort, tq, info = simulate(k_sim, sc, args.n)
    log(f"{sc.name}: simulated {args.n} patients in {time.perf_counter() - t0:.1f} s; "
        f"ages {info['ages']}; BLQ by sample {np.round(info['blq_by_sample'], 3)}")
    times = info["times"]
    notes.append(
        f"`{sc.name}`: ages {info['ages'][0]:g}-{info['ages'][1]:g} y, median "
        f"{info['dose_per_kg']:.1f} IU/kg; sample times (h) median "
        + ", ".join(f"{np.median(times[:, j]):.1f} [{times[:, j].min():.1f}-"
                    f"{times[:, j].max():.1f}]" for j in range(3))
        + "; BLQ (< 1 IU/dL) " + ", ".join(f"{100 * b:.1f}%"
                                          for b in info["blq_by_sample"])
        + (" (in the forecast: " + ("dropped" if prior.blq == "drop" else "M3") + ")")
        + ("; simulated IOV SD " + ", ".join(f"{p} {s:.3f}" for p, s in
                                             info["kappa_sd"].items())
           if info["kappa_sd"] else ""))
    out = {"truth": tq, "laplace": {}, "cohort": cohort}
    for k in DESIGN_SAMPLES:
        coh = with_design(cohort, k)
        t1 = time.perf_counter()
        res = fit_map_batch(prior, params, coh, n_occ=1)
        jax.block_until_ready(res)
        t_map = time.perf_counter() - t1
        gn = np.asarray(res.grad_norm)
        b = laplace_batch(jax.random.fold_in(k_draw, k), res, args.draws)
        q = draw_quantities(prior, params, coh, b)
        plug = draw_quantities(prior, params, coh, res.b[:, None, :])
        t_all = time.perf_counter() - t1
        w, ess = (importance_weights(prior, params, coh, res, b) if k
                  else (None, np.full(args.n, float(args.draws))))
        summ, rw = {}, {}
        for x in q:
            lo_, med_, hi_ = np.quantile(q[x], [0.05, 0.5, 0.95], axis=1)
            summ[x] = dict(lo=lo_, med=med_, hi=hi_, map=plug[x][:, 0])
            if w is not None:
                lo_, med_, hi_ = weighted_quantiles(q[x], w, (0.05, 0.5, 0.95))
            rw[x] = dict(lo=lo_, med=med_, hi=hi_)
        out["laplace"][k] = dict(summ=summ, res=res, b=b)
        # patients with a BLQ level among the samples used
        blq = np.asarray(jnp.any(coh.obs_blq & coh.obs_mask, axis=1))
        for name, v in (("ess_median", float(np.median(ess))),
                        ("ess_min", float(np.min(ess))),
                        ("n_with_blq", int(blq.sum()))):
            rows.append(dict(section="importance", scenario=sc.name, sim=sc.sim,
                             prior=sc.prior, n_samples=k,
                             design=design_label(k, prior), quantity="",
                             point="reweighted", metric=name, value=v))
        n_bad = int(np.sum(~(gn < 1e-5)))
        log(f"{sc.name}: {k} sample(s): fit_map_batch {t_map:.2f} s, with "
            f"{args.draws} draws and summaries {t_all:.1f} s; max |grad| "
            f"{np.nanmax(gn):.1e}, {n_bad} not converged (|grad| >= 1e-5)")
        if n_bad:
            notes.append(f"`{sc.name}`, {k} sample(s): {n_bad} of {args.n} MAP fits "
                         f"with max |grad| >= 1e-5 (largest {np.nanmax(gn):.1e})")
        for x in summ:
            s, r = summ[x], rw[x]
            for point, est, lo_, hi_ in (("median", s["med"], s["lo"], s["hi"]),
                                         ("map", s["map"], s["lo"], s["hi"]),
                                         ("reweighted", r["med"], r["lo"], r["hi"])):
                mt = metrics(est, tq[x], lo_, hi_)
                if blq.any():
                    mt["coverage90_blq_pct"] = 100 * float(np.mean(
                        (lo_[blq] <= tq[x][blq]) & (tq[x][blq] <= hi_[blq])))
                for name, v in mt.items():
                    rows.append(dict(section="accuracy", scenario=sc.name, sim=sc.sim,
                                     prior=sc.prior, n_samples=k,
                                     design=design_label(k, prior), quantity=x,
                                     point=point, metric=name, value=v))
    notes.append(f"`{sc.name}`: simulation, {len(DESIGN_SAMPLES)} x fit_map_batch, "
                 f"draws and summaries {time.perf_counter() - t0:.0f} s")
    if not args.no_tool_check and sc.sim == sc.prior and sc.blq == "m3":
        tool_check(k_rec, sc, prior, params, cohort, out, info, notes)
    return out


def tool_check(key, sc, prior, params, cohort, out, info, notes) -> None:
    """The quantities validated here are those ``recommend`` reports: same draws,
    three patients, 3-sample design."""
    lap = out["laplace"][3]
    worst = 0.0
    for i in range(3):
        subject = take(with_design(cohort, 3), i)
        draws = lap["b"][i, :200]
        rec = recommend(key, prior, params, subject, draws, n_occ=1,
                        weight_kg=float(info["weight"][i]), thresholds=(THRESHOLD,),
                        targets=(1.0,), intervals=(48.0,))
        mine = draw_quantities(prior, params, take1(cohort, i), draws[None])
        pairs = ((rec.parameters["clearance"], mine["CL"][0]),
                 (rec.parameters["terminal_half_life"], mine["t_half"][0]),
                 (rec.parameters["effective_half_life"], mine["t_half_eff"][0]),
                 (rec.time_to_threshold[THRESHOLD], mine["t_1"][0]))
        for a, b in pairs:
            worst = max(worst, float(np.max(np.abs(a / b - 1))))
    assert worst < 1e-8, f"{sc.name}: validation quantities differ from recommend()"
    notes.append(f"`{sc.name}`: CL, t½ and time to 1 IU/dL computed here equal "
                 f"`pk.dosing.recommend`'s on the same draws (3 patients x 200 draws; "
                 f"max relative difference {worst:.1e})")


# ---------------------------------------------------------------------------
# MAP-Laplace vs NUTS


def run_nuts(idx: int, sc: Scenario, args, lap: dict, rows: list, notes: list):
    root = jax.random.fold_in(jax.random.PRNGKey(args.seed), 2000 + idx)
    k_nuts, k_sub = jax.random.split(root)
    prior = prior_model(sc)
    params = initial_params(prior)
    cohort, tq = lap["cohort"], lap["truth"]
    n_sub = min(args.nuts_n, cohort.n_subjects)
    pick = np.sort(np.asarray(jax.random.choice(k_sub, cohort.n_subjects, (n_sub,),
                                                replace=False)))
    for k in args.nuts_designs:
        coh = with_design(cohort, k)
        t0 = time.perf_counter()
        nuts_q = {x: [] for x in QUANTITIES}
        rhat, div, ess = [], 0, []
        for j, i in enumerate(pick):
            subject = take(coh, i)
            post = fit_nuts_individual(jax.random.fold_in(k_nuts, 10 * int(i) + k),
                                       prior, params, subject, n_occ=1)
            q = draw_quantities(prior, params, take1(coh, i), post.b[None])
            for x in QUANTITIES:
                nuts_q[x].append(np.quantile(q[x][0], [0.05, 0.5, 0.95]))
            rhat.append(float(np.nanmax(post.r_hat)))
            ess.append(float(np.min(post.ess)))
            div += post.n_divergent
            if j == 0:
                log(f"{sc.name}: NUTS, {k} sample(s): first patient "
                    f"{time.perf_counter() - t0:.1f} s (compile included)")
        dt = time.perf_counter() - t0
        log(f"{sc.name}: NUTS, {k} sample(s): {n_sub} patients in {dt:.1f} s; max "
            f"R-hat {max(rhat):.3f}, min ESS {min(ess):.0f}, {div} divergent")
        notes.append(f"`{sc.name}`, NUTS {k} sample(s): {n_sub} patients in {dt:.0f} s "
                     f"(first call compiles); max R-hat {max(rhat):.3f}, min bulk ESS "
                     f"{min(ess):.0f} (of {post.b.shape[0]} draws), {div} divergent "
                     "transitions")
        s_lap = lap["laplace"][k]["summ"]
        for x in QUANTITIES:
            nq = np.array(nuts_q[x])  # (n_sub, 3): q05, median, q95
            la = {f: s_lap[x][f][pick] for f in ("lo", "med", "hi", "map")}
            truth = tq[x][pick]
            res = {
                "map_vs_nuts_median_absreldiff_pct":
                    100 * float(np.median(np.abs(la["map"] / nq[:, 1] - 1))),
                "map_minus_nuts_median_signed_mean_pct":
                    100 * float(np.mean(la["map"] / nq[:, 1] - 1)),
                "laplace_vs_nuts_median_absreldiff_pct":
                    100 * float(np.median(np.abs(la["med"] / nq[:, 1] - 1))),
                "width_ratio_laplace_over_nuts_median":
                    float(np.median((la["hi"] - la["lo"]) / (nq[:, 2] - nq[:, 0]))),
                "coverage90_laplace_pct":
                    100 * float(np.mean((la["lo"] <= truth) & (truth <= la["hi"]))),
                "coverage90_nuts_pct":
                    100 * float(np.mean((nq[:, 0] <= truth) & (truth <= nq[:, 2]))),
                "endpoint_absreldiff_median_pct": 100 * float(np.median(np.abs(
                    np.concatenate([la["lo"] / nq[:, 0], la["hi"] / nq[:, 2]]) - 1))),
                "n": n_sub,
            }
            for name, v in res.items():
                rows.append(dict(section="map_vs_nuts", scenario=sc.name, sim=sc.sim,
                                 prior=sc.prior, n_samples=k,
                                 design=design_label(k, prior), quantity=x,
                                 point="", metric=name, value=v))


# ---------------------------------------------------------------------------
# Report


def _get(df, **kw):
    sel = df
    for k, v in kw.items():
        sel = sel[sel[k] == v]
    return sel.set_index("metric")["value"]


def accuracy_table(df: pd.DataFrame, scenarios, quantities=QUANTITIES,
                   preijers=True) -> str:
    head = ["scenario", "samples (h)"]
    for x in quantities:
        lab = LABELS[x]
        head += [f"{lab} bias %", f"{lab} imprec. %", f"{lab} cov90 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc in scenarios:
        for k in DESIGN_SAMPLES:
            sel = df[(df.section == "accuracy") & (df.scenario == sc.name)
                     & (df.n_samples == k) & (df.point == "median")]
            if sel.empty:
                continue
            cells = [sc.name, sel["design"].iloc[0]]
            for x in quantities:
                m = _get(sel, quantity=x)
                cells += [f"{m['bias_mean_pct']:+.1f}", f"{m['rrmse_pct']:.1f}",
                          f"{m['coverage90_pct']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    if preijers:
        cells = ["Preijers et al. (rFIX, 1-3 samples)", "1-3 (10 min-80 h)"]
        for x in quantities:
            (b0, b1), (i0, i1) = PREIJERS[x]
            cells += [f"{b0:+.1f} to {b1:+.1f}", f"{i0:.1f}-{i1:.1f}", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nuts_table(df: pd.DataFrame) -> str:
    head = ["scenario", "samples (h)", "quantity", "n",
            "MAP vs NUTS median: median abs. rel. diff. %",
            "MAP − NUTS median: mean signed rel. diff. %",
            "Laplace vs NUTS median %", "90% width Laplace/NUTS (median)",
            "90% endpoints: median abs. rel. diff. %",
            "cov90 Laplace %", "cov90 NUTS %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sel = df[df.section == "map_vs_nuts"]
    for (scn, _, x), g in sel.groupby(["scenario", "n_samples", "quantity"],
                                      sort=False):
        m = g.set_index("metric")["value"]
        lines.append("| " + " | ".join([
            scn, g["design"].iloc[0], LABELS[x], f"{int(m['n'])}",
            f"{m['map_vs_nuts_median_absreldiff_pct']:.2f}",
            f"{m['map_minus_nuts_median_signed_mean_pct']:+.2f}",
            f"{m['laplace_vs_nuts_median_absreldiff_pct']:.2f}",
            f"{m['width_ratio_laplace_over_nuts_median']:.3f}",
            f"{m['endpoint_absreldiff_median_pct']:.2f}",
            f"{m['coverage90_laplace_pct']:.0f}", f"{m['coverage90_nuts_pct']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def calibration_table(df: pd.DataFrame, scenarios) -> str:
    """90 % coverage of the Laplace intervals and of the same draws reweighted by
    importance sampling; coverage among patients with a BLQ level."""
    head = ["scenario", "samples (h)"]
    head += [f"{LABELS[x]} cov90 % Laplace → reweighted" for x in QUANTITIES]
    head += ["patients with a BLQ level", "their time to 1 cov90 % Laplace → "
             "reweighted", "importance ESS median (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc in scenarios:
        for k in DESIGN_SAMPLES:
            if k == 0:
                continue
            sel = df[(df.section == "accuracy") & (df.scenario == sc.name)
                     & (df.n_samples == k)]
            if sel.empty:
                continue
            imp = _get(df[df.section == "importance"], scenario=sc.name, n_samples=k)
            la, rw = sel[sel.point == "median"], sel[sel.point == "reweighted"]
            cells = [sc.name, la["design"].iloc[0]]
            for x in QUANTITIES:
                cells.append(f"{_get(la, quantity=x)['coverage90_pct']:.1f} → "
                             f"{_get(rw, quantity=x)['coverage90_pct']:.1f}")
            n_blq = int(imp["n_with_blq"])
            cells.append(f"{n_blq}")
            if n_blq:
                cells.append(f"{_get(la, quantity='t_1')['coverage90_blq_pct']:.1f} → "
                             f"{_get(rw, quantity='t_1')['coverage90_blq_pct']:.1f}")
            else:
                cells.append("—")
            cells.append(f"{imp['ess_median']:.0f} ({imp['ess_min']:.0f})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extra_table(df: pd.DataFrame, scenarios) -> str:
    """Median-based bias, the MAP plug-in, effective t½ and the occasion CL."""
    head = ["scenario", "samples (h)", "CL median rPE %", "t½ median rPE %",
            "time to 1 median rPE %", "t½ imprec. (MAP plug-in) %",
            "time to 1 imprec. (MAP plug-in) %",
            "effective t½ bias / imprec. / cov90 %",
            "CL of the PK occasion bias / imprec. / cov90 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc in scenarios:
        for k in DESIGN_SAMPLES:
            sel = df[(df.section == "accuracy") & (df.scenario == sc.name)
                     & (df.n_samples == k)]
            if sel.empty:
                continue
            med = sel[sel.point == "median"]
            mp = sel[sel.point == "map"]
            cells = [sc.name, med["design"].iloc[0]]
            cells += [f"{_get(med, quantity=x)['bias_median_pct']:+.1f}"
                      for x in QUANTITIES]
            cells += [f"{_get(mp, quantity=x)['rrmse_pct']:.1f}"
                      for x in ("t_half", "t_1")]
            for x in ("t_half_eff", "CL_occ"):
                m = _get(med, quantity=x)
                cells.append(f"{m['bias_mean_pct']:+.1f} / {m['rrmse_pct']:.1f} / "
                             f"{m['coverage90_pct']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_line() -> str:
    info = device_info()
    return (f"{info['platform']} ({info['device_kind']}); CPU {info['cpu']}, "
            f"{info['usable_cores']} usable cores")


def write_report(out_dir: Path, df: pd.DataFrame, args, notes, started, wall_s) -> str:
    import numpyro

    cmd = "python " + " ".join(shlex.quote(a) for a in
                               [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    done = set(df["scenario"])
    main = [s for s in SCENARIOS if s.group == "main" and s.name in done]
    robust = [s for s in SCENARIOS if s.group == "robust" and s.name in done]
    text = "\n".join([
        "# Dosing-tool validation: MAP-Laplace forecasting from 1-3 sparse levels"
        + (" (QUICK smoke run)" if args.quick else ""),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (local); wall time {wall_s / 60:.1f} min",
        f"- command: `{cmd}` (from the repository root)",
        f"- device: {device_line()}",
        f"- python {platform.python_version()}, jax {jax.__version__}, numpyro "
        f"{numpyro.__version__}, numpy {np.__version__}; float64",
        "- forecast model: the library entry with BLQ levels by M3 (as `phems dose`"
        "), except the diagnostic row marked 'BLQ dropped'",
        f"- settings: seed {args.seed}; {args.n} patients per scenario; "
        f"{args.draws} Laplace draws per patient; NUTS on {args.nuts_n} patients per "
        f"product ({', '.join(map(str, args.nuts_designs))} sample designs; "
        f"fit_nuts_individual defaults: {nuts_defaults()})",
        "- patients: washout PK study, one 10-min infusion of 50 IU/kg rounded up to "
        "whole vials, the simulator's sparse ISTH design (4 ± 1, 24 ± 4, 48 ± 4 h for "
        "standard half-life FVIII; 4 ± 1, 48 ± 4, 72 ± 4 h for EHL and FIX), LLOQ 1 "
        "IU/dL, ages uniform on the validated range of the model(s)",
        "- estimate = median of the Laplace draws (what `phems dose` reports), "
        "interval = their 5-95 % quantiles; bias = mean relative prediction error "
        "(est − true)/true, imprecision = relative RMSE = sqrt(mean(rPE²)); cov90 = "
        "% of patients whose true value lies in the 90 % interval",
        "- truth: CL and t½ (terminal) of the patient's own parameters TV·exp(η) "
        "(IOV κ = 0), time to 1 IU/dL after the end of the infusion with that "
        "occasion's parameters TV·exp(η + κ) (the simulator's truth table), as in "
        "`pk.dosing.recommend`",
        "",
        "## Accuracy and calibration (prior = simulation model)",
        "",
        accuracy_table(df, main),
        "",
        "## Robustness: patients from another published model",
        "",
        accuracy_table(df, robust, preijers=False),
        "",
        "## MAP-Laplace vs full posterior (NUTS), same patients",
        "",
        nuts_table(df) if (df.section == "map_vs_nuts").any() else "(not run)",
        "",
        "## Calibration: Laplace intervals and importance reweighting (diagnostic)",
        "",
        "The same Laplace draws, reweighted by importance sampling against the exact "
        "posterior (weights ∝ exp(−O(b)/2) / N(b; b̂, Σ)); not what `phems dose` "
        "reports, a check of where the Gaussian approximation loses coverage.",
        "",
        calibration_table(df, [s for s in SCENARIOS if s.name in done]),
        "",
        "## Other views (same runs)",
        "",
        extra_table(df, [s for s in SCENARIOS if s.name in done]),
        "",
        "## Run notes",
        "",
        *[f"- {n}" for n in notes],
        "",
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "results_quick" if args.quick else "results"
    (out_dir / f"{stem}.md").write_text(text)
    df.to_csv(out_dir / f"{stem}.csv", index=False, float_format="%.6g")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="patients per scenario")
    ap.add_argument("--draws", type=int, default=1000,
                    help="Laplace draws per patient (default 1000)")
    ap.add_argument("--nuts-n", type=int, default=100,
                    help="patients per product fitted by NUTS (0: skip)")
    ap.add_argument("--nuts-designs", type=int, nargs="+", default=[3, 1],
                    choices=[1, 2, 3])
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--scenarios", nargs="+", default=None, metavar="NAME",
                    help="run only the scenarios whose name starts with one of these "
                         "(e.g. advate alprolix kovaltry); default all")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 100 patients, 200 draws, NUTS on 5 patients")
    ap.add_argument("--no-tool-check", action="store_true",
                    help="skip the check against pk.dosing.recommend")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: this folder); files results.md "
                         "and results.csv (results_quick.* with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.draws, args.nuts_n = min(args.n, 100), min(args.draws, 200), \
            min(args.nuts_n, 5)
    out_dir = args.out or HERE
    started = _dt.datetime.now()
    t0 = time.perf_counter()
    log(f"device {device_line()}; writing {out_dir}")
    rows: list = []
    notes: list = []
    for idx, sc in enumerate(SCENARIOS):
        if args.scenarios and not any(sc.name.startswith(x) for x in args.scenarios):
            continue
        lap = run_scenario(idx, sc, args, rows, notes)
        if sc.nuts and args.nuts_n > 0:
            run_nuts(idx, sc, args, lap, rows, notes)
    df = pd.DataFrame(rows)
    text = write_report(out_dir, df, args, notes, started, time.perf_counter() - t0)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
