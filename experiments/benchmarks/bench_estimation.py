#!/usr/bin/env python
"""Estimation benchmark: FOCEI, SVI and NUTS of ``phems_clinical`` vs a NumPy FOCEI.

Prints one markdown table (dataset x method x cold/warm) and writes it, with the
device, the command and the targets, to ``experiments/benchmarks/estimation_<dev>.md``
(``<dev>`` = ``cpu`` or ``gpu``; ``--out`` to change). Run from the repository root:

    python experiments/benchmarks/bench_estimation.py            # full (10-30 min CPU)
    python experiments/benchmarks/bench_estimation.py --quick    # smoke test (~2 min)
    python experiments/benchmarks/bench_estimation.py --sizes 50 200 --methods focei ref

Data sets
    ``pheno``: NONMEM's phenobarbital example (59 subjects, 155 observations;
    ``tests/reference/nonmem_pheno``), FOCEI and the NumPy reference only.
    ``advate-N``: cohorts simulated from the Advate library model with a fixed key
    (rich 10-sample washout design below ``--sparse-from`` patients, the 3-sample
    ISTH "sparse" design from there on; LLOQ 0.05 IU/dL so that the cohorts the
    reference fits have no BLQ samples, which it does not support).

Timing
    cold = first call in the process for that model object and cohort shapes (JIT
    compilation included); warm = an identical second call. Every call is timed
    by wall clock; the JAX compile time inside it (tracing + lowering + XLA
    compilation, from ``jax.monitoring``) is reported in the notes, which shows
    whether a "warm" call recompiled. The reference is plain NumPy (no
    compilation); its time is reported under warm_s. ratio = reference time / our
    warm time (FOCEI rows where the reference fit was run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import sys
import time
from pathlib import Path

import _bench  # noqa: E402  (experiments/benchmarks/_bench.py)

_bench.choose_device()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _bench import Timed, log  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__ next to the benchmark

import reference_focei as ref  # noqa: E402

from phems_clinical.data.nonmem import read_nonmem, to_cohort  # noqa: E402

# imported up front so that the whole run uses one snapshot of the estimators
from phems_clinical.pk.bayes import fit_nuts, fit_svi  # noqa: E402
from phems_clinical.pk.focei import fit_focei  # noqa: E402
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort  # noqa: E402
from phems_clinical.pk.spec import load_model  # noqa: E402
from phems_clinical.provenance import (  # noqa: E402
    code_state,
    device_info,
    load_average,
    versions,
)
from phems_clinical.resources import configs_dir  # noqa: E402

PHENO_DIR = ROOT / "tests" / "reference" / "nonmem_pheno"
# pheno.ext / pheno.lst (NONMEM 7.5.1, FOCEI): final estimates, OFV, timings
NONMEM_OFV = 586.27605628520962
NONMEM_THETA = np.array([4.69555e-03, 9.84258e-01, 1.58920e-01])
NONMEM_OMEGA = np.array([2.93508e-02, 2.79060e-02])
NONMEM_SIGMA = 1.32410e-02
NONMEM_EST_S, NONMEM_COV_S, NONMEM_NFEV = 0.26, 0.25, 111

TARGET_FOCEI_PHENO_S = 1.0
TARGET_NUTS_200_S = 60.0


# ---------------------------------------------------------------------------
# Device description


# ---------------------------------------------------------------------------
# Data sets


class Dataset:
    def __init__(self, name, make_model, cohort, ref_subjects, note=""):
        self.name, self.make_model, self.cohort = name, make_model, cohort
        self.ref_subjects, self.note = ref_subjects, note
        self.n_sub = int(cohort.n_subjects)
        self.n_obs = int(np.asarray(cohort.obs_mask).sum())


def pheno_dataset() -> Dataset:
    path = configs_dir() / "model" / "pheno.yaml"
    model = load_model(path)
    data = read_nonmem(PHENO_DIR / "pheno.dta", dv_unit=None)
    cohort, _ = to_cohort(data, model.covariate_names)
    raw = pd.read_csv(PHENO_DIR / "pheno.dta", sep=r"\s+")
    subs = ref.subjects_from_events(raw, model.covariate_names)
    return Dataset(
        "pheno",
        lambda: load_model(path),
        cohort,
        subs,
        "NONMEM example pheno_real (Grasela & Donn 1985), 1-cmt IV bolus",
    )


def advate_dataset(n: int, design: str, seed: int) -> Dataset:
    model = load_product("advate")
    key = jax.random.fold_in(jax.random.PRNGKey(seed), n)
    events, _ = simulate_cohort(
        key, model, HospitalSpec(f"advate{n}", n, design=design, lloq_IU_dL=0.05)
    )
    # The reference has no M3, so the (rare, < 0.05 IU/dL) BLQ samples are removed
    # from the data set that every method sees.
    n_blq = int(events["BLQ"].sum())
    events = events[events["BLQ"] == 0].reset_index(drop=True)
    data = read_nonmem(events, required_covariates=model.covariate_names)
    cohort, _ = to_cohort(data, model.covariate_names)
    subs = ref.subjects_from_events(events, model.covariate_names)
    note = (
        f"simulated from the Advate library model (2-cmt, 10-min infusion), "
        f"{design} design, key fold_in(PRNGKey({seed}), {n})"
        + (f", {n_blq} BLQ samples removed" if n_blq else "")
    )
    return Dataset(f"advate-{n}", lambda: load_product("advate"), cohort, subs, note)


# ---------------------------------------------------------------------------
# Runners


def fmt(x, digits=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}"


def run_focei(ds: Dataset, rows: list, args, results: dict) -> None:
    model = ds.make_model()
    log(f"{ds.name}: FOCEI cold")
    cold = Timed(fit_focei, model, ds.cohort, covariance=False, maxiter=args.maxiter)
    log(f"{ds.name}: FOCEI warm ({cold.seconds:.1f} s cold)")
    warm = Timed(fit_focei, model, ds.cohort, covariance=False, maxiter=args.maxiter)
    cov1 = Timed(fit_focei, model, ds.cohort, covariance=True, maxiter=args.maxiter)
    cov = Timed(fit_focei, model, ds.cohort, covariance=True, maxiter=args.maxiter)
    r = warm.value
    # one warm OFV + exact-gradient evaluation (the optimiser's unit of work)
    per_eval = _our_eval_seconds(model, ds.cohort)
    results[(ds.name, "focei")] = dict(
        warm=warm.seconds,
        ofv=r.ofv,
        per_eval=per_eval,
        n_free=len(r.natural_names),
        fit=r,
    )
    status = "converged" if r.converged else f"NOT CONVERGED: {r.message}"
    notes = [
        f"{r.n_iterations} BFGS it., {status}",
        cold.note("cold"),
        warm.note("warm"),
        f"with $COV: {cov.seconds:.2f} s warm ({cov1.seconds:.2f} s on its "
        f"first call, {cov1.compile_s:.1f} s of it compiling)",
    ]
    if per_eval is not None:
        notes.append(f"OFV+grad eval {per_eval * 1e3:.1f} ms")
    if cold.value.ofv != r.ofv:
        notes.append(f"cold OFV {cold.value.ofv:.4f} != warm")
    if ds.name.startswith("advate"):
        notes.append(_cl_note(r.natural_names, r.estimates))
    rows.append(
        dict(
            dataset=ds.name,
            n_sub=ds.n_sub,
            n_obs=ds.n_obs,
            method="FOCEI",
            cold=cold.seconds,
            warm=warm.seconds,
            obj=f"OFV {r.ofv:.4f}",
            notes=notes,
        )
    )


def _our_eval_seconds(model, cohort, repeats: int = 5):
    """Median time of one warm jitted OFV + gradient evaluation (private API)."""
    try:
        import jax.numpy as jnp

        from phems_clinical.pk.focei import compiled_fit_functions
        from phems_clinical.pk.model import initial_params, n_occasions
        from phems_clinical.pk.packing import build_packer

        base = initial_params(model)
        fns, with_jac = compiled_fit_functions(model, n_occasions(cohort))
        x = build_packer(model, base).pack(base)
        b0 = jnp.zeros((cohort.n_subjects, fns.n_b))
        jax.block_until_ready(with_jac(x, base, cohort, b0))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(with_jac(x, base, cohort, b0))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
    except Exception as err:  # noqa: BLE001 - private API may change
        log(f"per-evaluation timing unavailable: {err!r}")
        return None


def _cl_note(names, values) -> str:
    names = list(names)
    out = []
    for key, label in (("THETA(CL)", "CL"), ("THETA(V1)", "V1")):
        if key in names:
            out.append(f"{label} {values[names.index(key)]:.3g}")
    return "est. " + ", ".join(out) + " (true 1.93, 22.2)" if out else ""


def run_reference(ds: Dataset, rows: list, args, results: dict, fit: bool) -> None:
    model = ds.make_model()
    n_free = len(ref.Transform(model).pack(ref.Transform(model).base))
    ours = results.get((ds.name, "focei"))
    if fit:
        log(f"{ds.name}: NumPy reference FOCEI fit")
        r = ref.fit_focei_reference(model, ds.ref_subjects, maxiter=args.ref_maxiter)
        per_eval = r.seconds / max(r.n_ofv_evals, 1)
        notes = [
            f"{r.n_iterations} L-BFGS-B it., {r.n_ofv_evals} OFV evals "
            f"({per_eval * 1e3:.0f} ms each; FD gradient = {2 * n_free + 1})",
            "converged" if r.converged else f"stopped: {r.message}",
        ]
        if ours is not None:
            notes.append(f"OFV − ours {r.ofv - ours['ofv']:+.2e}")
            ratio = r.seconds / ours["warm"]
            ours["ratio"] = ratio
            rows_ours = [
                x for x in rows if x["dataset"] == ds.name and x["method"] == "FOCEI"
            ]
            for x in rows_ours:
                x["ratio"] = ratio
                if ours["per_eval"]:
                    speedup = (2 * n_free + 1) * per_eval / ours["per_eval"]
                    x["notes"].append(f"per OFV+grad eval ×{speedup:.0f} vs ref")
        if ds.name.startswith("advate"):
            notes.append(
                _cl_note(
                    ("THETA(CL)", "THETA(V1)"), [r.params.theta[0], r.params.theta[1]]
                )
            )
        rows.append(
            dict(
                dataset=ds.name,
                n_sub=ds.n_sub,
                n_obs=ds.n_obs,
                method="NumPy ref. FOCEI",
                cold=None,
                warm=r.seconds,
                obj=f"OFV {r.ofv:.4f}",
                ratio=1.0,
                notes=notes,
            )
        )
        return
    # too slow to fit here: time single OFV evaluations at the specification values
    log(f"{ds.name}: NumPy reference, per-evaluation timing only")
    tr = ref.Transform(model)
    t0 = time.perf_counter()
    _, _, eta = ref.focei_ofv(model, ds.ref_subjects, tr.base)
    t_cold = time.perf_counter() - t0
    x = tr.pack(tr.base)
    x[0] += 1e-4
    t0 = time.perf_counter()
    ref.focei_ofv(model, ds.ref_subjects, tr.unpack(x), eta)
    t_fd = time.perf_counter() - t0
    notes = [
        f"fit skipped (too slow); one OFV eval {t_cold:.2f} s from eta=0, "
        f"{t_fd:.2f} s warm-started (an FD-gradient point)"
    ]
    if ours is not None and ours["per_eval"]:
        notes.append(
            f"OFV+grad: ref {(2 * n_free + 1) * t_fd:.1f} s vs ours "
            f"{ours['per_eval'] * 1e3:.0f} ms "
            f"(×{(2 * n_free + 1) * t_fd / ours['per_eval']:.0f})"
        )
    rows.append(
        dict(
            dataset=ds.name,
            n_sub=ds.n_sub,
            n_obs=ds.n_obs,
            method="NumPy ref. (1 eval)",
            cold=None,
            warm=None,
            obj="—",
            notes=notes,
        )
    )


def fixed_linear_effects(model):
    """``model`` with the coefficients of its linear covariate effects fixed."""
    import dataclasses

    names = {e.theta for e in model.covariate_effects if e.effect == "linear"}
    return dataclasses.replace(
        model,
        thetas=tuple(
            dataclasses.replace(t, fixed=True) if t.name in names else t
            for t in model.thetas
        ),
    ), sorted(names)


def run_svi(ds: Dataset, rows: list, args, results: dict) -> None:
    model = ds.make_model()
    key = jax.random.PRNGKey(args.seed)
    label = f"SVI ({args.svi_steps} steps)"
    notes = []
    log(f"{ds.name}: SVI cold ({args.svi_steps} steps)")
    try:
        cold = Timed(fit_svi, key, model, ds.cohort, num_steps=args.svi_steps)
    except Exception as err:  # noqa: BLE001 - report, then retry a variant
        msg = str(err).splitlines()[0][:120]
        log(f"{ds.name}: SVI FAILED: {msg}")
        model, fixed = fixed_linear_effects(model)
        if not fixed:
            raise
        notes.append(
            f"library model FAILED ({type(err).__name__}: {msg}); timed with "
            f"{', '.join(fixed)} fixed at its spec value"
        )
        label = f"SVI ({args.svi_steps} steps)*"
        log(f"{ds.name}: SVI cold, {', '.join(fixed)} fixed")
        cold = Timed(fit_svi, key, model, ds.cohort, num_steps=args.svi_steps)
    log(f"{ds.name}: SVI warm ({cold.seconds:.1f} s cold)")
    warm = Timed(fit_svi, key, model, ds.cohort, num_steps=args.svi_steps)
    r = warm.value
    loss = float(np.mean(r.elbo[-min(100, len(r.elbo)) :]))
    summ = r.summary
    notes += [cold.note("cold"), warm.note("warm")]
    if warm.n_compiles and warm.compile_s > 0.2 * warm.seconds:
        notes.append("warm call RECOMPILES")
    notes.append(_cl_note(summ.index, summ["mean"].to_numpy()))
    rows.append(
        dict(
            dataset=ds.name,
            n_sub=ds.n_sub,
            n_obs=ds.n_obs,
            method=label,
            cold=cold.seconds,
            warm=warm.seconds,
            obj=f"−ELBO {loss:.2f}",
            notes=notes,
        )
    )


def run_nuts(ds: Dataset, rows: list, args, results: dict) -> None:
    model = ds.make_model()
    key = jax.random.PRNGKey(args.seed)
    nw, ns = args.nuts_warmup, args.nuts_samples
    notes = []
    prev = results.get("nuts_rate")  # seconds per (iteration x observation)
    if prev is not None:
        predicted = prev * (nw + ns) * ds.n_obs
        while predicted > args.nuts_budget_s and nw + ns > 400:
            nw, ns = max(200, nw // 2), max(200, ns // 2)
            predicted = prev * (nw + ns) * ds.n_obs
        if (nw, ns) != (args.nuts_warmup, args.nuts_samples):
            notes.append(
                f"reduced to {nw}+{ns}: {args.nuts_warmup}+{args.nuts_samples}"
                f" predicted > {args.nuts_budget_s:.0f} s"
            )
    log(f"{ds.name}: NUTS cold (1 chain, {nw}+{ns})")
    cold = Timed(
        fit_nuts, key, model, ds.cohort, num_warmup=nw, num_samples=ns, num_chains=1
    )
    results["nuts_rate"] = (cold.seconds - cold.compile_s) / ((nw + ns) * ds.n_obs)
    warm = None
    if ds.n_sub <= args.nuts_warm_max:
        log(f"{ds.name}: NUTS warm ({cold.seconds:.1f} s cold)")
        warm = Timed(
            fit_nuts, key, model, ds.cohort, num_warmup=nw, num_samples=ns, num_chains=1
        )
    r = (warm or cold).value
    s = r.summary
    # fit_nuts(parameterization="auto"): centred when the median subject has >= 4
    # quantified samples
    per_subject = np.sum(np.asarray(ds.cohort.obs_mask & ~ds.cohort.obs_blq), axis=-1)
    param = "centred" if np.median(per_subject) >= 4 else "non-centred"
    worst = s["ess_bulk"].idxmin() if s["ess_bulk"].notna().any() else "?"
    notes += [
        f"auto → {param}; R-hat max {np.nanmax(s['r_hat']):.3f}, ESS bulk min "
        f"{np.nanmin(s['ess_bulk']):.0f} ({worst}), {r.n_divergent} divergent",
        cold.note("cold"),
    ]
    if warm is not None:
        notes.append(warm.note("warm"))
        if warm.n_compiles and warm.compile_s > 0.2 * warm.seconds:
            notes.append("warm call RECOMPILES")
    else:
        notes.append(
            f"warm not run (> {args.nuts_warm_max} patients); cold minus "
            f"compile = {cold.seconds - cold.compile_s:.1f} s"
        )
    notes.append(_cl_note(s.index, s["mean"].to_numpy()))
    results[(ds.name, "nuts")] = dict(
        cold=cold.seconds, warm=warm and warm.seconds, compile=cold.compile_s
    )
    rows.append(
        dict(
            dataset=ds.name,
            n_sub=ds.n_sub,
            n_obs=ds.n_obs,
            method=f"NUTS (1 chain, {nw}+{ns})",
            cold=cold.seconds,
            warm=None if warm is None else warm.seconds,
            obj="—",
            notes=notes,
        )
    )


# ---------------------------------------------------------------------------
# Report


def table(rows: list) -> str:
    head = (
        "| dataset | n_subjects | n_obs | method | cold_s | warm_s | OFV / −ELBO | "
        "ratio vs ref | NONMEM 7.5.1 (lit.) | notes |"
    )
    out = [head, "|" + "---|" * 10]
    for r in rows:
        lit = (
            f"{NONMEM_EST_S} s est. (+{NONMEM_COV_S} s $COV), OFV {NONMEM_OFV:.4f}"
            if r["dataset"] == "pheno" and r["method"] == "FOCEI"
            else ""
        )
        ratio = r.get("ratio")
        out.append(
            "| "
            + " | ".join(
                [
                    r["dataset"],
                    str(r["n_sub"]),
                    str(r["n_obs"]),
                    r["method"],
                    fmt(r["cold"]),
                    fmt(r["warm"]),
                    r["obj"],
                    "—" if ratio is None else f"{ratio:.1f}×",
                    lit,
                    "; ".join(n for n in r["notes"] if n),
                ]
            )
            + " |"
        )
    return "\n".join(out)


def targets(results: dict) -> list[str]:
    lines = []
    f = results.get(("pheno", "focei"))
    if f:
        ok = f["warm"] < TARGET_FOCEI_PHENO_S
        lines.append(
            f"- warm FOCEI on pheno (59 subjects, 155 obs) < "
            f"{TARGET_FOCEI_PHENO_S:.0f} s on CPU (NONMEM 7.5.1: "
            f"{NONMEM_EST_S} s): **{f['warm']:.2f} s — "
            f"{'met' if ok else 'NOT met'}**"
        )
    n = results.get(("advate-200", "nuts"))
    if n:
        if n["warm"] is not None:
            best, how = n["warm"], "warm"
        else:
            best, how = n["cold"], f"cold, incl. {n['compile']:.1f} s compilation"
        ok = best < TARGET_NUTS_200_S
        lines.append(
            f"- NUTS on 200 patients < {TARGET_NUTS_200_S:.0f} s on CPU: "
            f"**{best:.1f} s ({how}) — {'met' if ok else 'NOT met'}**"
        )
    return lines


def write_report(
    path: Path,
    info: dict,
    args,
    rows,
    results,
    checks,
    started,
    load0,
    partial: bool,
    datasets=(),
) -> str:
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    )
    plat_env = os.environ.get("JAX_PLATFORMS", "(unset)")
    lines = [
        f"# Estimation benchmark — {info['device']}"
        + (" (PARTIAL, still running)" if partial else ""),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (local), total wall time "
        f"{(time.time() - started.timestamp()) / 60:.1f} min",
        f"- command: `{cmd}` (from the repository root; JAX_PLATFORMS={plat_env})",
        f"- device: {info['device']} ({info['n_devices']} device(s)); CPU: "
        f"{info['cpu']}, {info['cores']} cores",
        f"- load average (1/5/15 min) at start: {load0}; at end: {load_average()}",
        f"- {info['versions']}; float64 (jax_enable_x64)",
        f"- code: {info['code']}",
        f"- settings: seed {args.seed}; SVI {args.svi_steps} steps; NUTS 1 chain "
        f"{args.nuts_warmup}+{args.nuts_samples}; FOCEI maxiter {args.maxiter} "
        f"(covariance=False in cold/warm); reference L-BFGS-B maxiter "
        f"{args.ref_maxiter}",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "## Results",
        "",
        *[
            f"- `{d.name}`: {d.n_sub} subjects, {d.n_obs} observations"
            + (f"; {d.note}" if d.note else "")
            for d in datasets
        ],
        "",
        table(rows),
        "",
        "## Self-check of the NumPy reference",
        "",
        *[f"- {c}" for c in checks],
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ---------------------------------------------------------------------------


def reference_self_check_nonmem(pheno: Dataset) -> list[str]:
    """NumPy reference OFV at NONMEM's final estimates vs NONMEM's OFV."""
    model = pheno.make_model()
    theta = model.theta_values.copy()
    free = [i for i, t in enumerate(model.thetas) if not t.fixed]
    theta[free] = NONMEM_THETA
    p = ref.RefParams(
        theta, np.diag(NONMEM_OMEGA), np.array([0.0, math.sqrt(NONMEM_SIGMA)])
    )
    ofv = ref.focei_ofv(model, pheno.ref_subjects, p)[0]
    rel = abs(ofv / NONMEM_OFV - 1.0)
    assert rel < 1e-6, f"reference OFV {ofv} vs NONMEM {NONMEM_OFV}: rel {rel:.2e}"
    return [
        f"pheno at NONMEM's estimates: reference OFV {ofv:.8f}, NONMEM "
        f"{NONMEM_OFV:.8f} (rel. diff {rel:.1e}, required < 1e-6)"
    ]


def reference_self_check_ours(ds: Dataset, at: str) -> str:
    """NumPy reference OFV vs our JAX ``focei_objective`` at the same parameters."""
    import jax.numpy as jnp

    from phems_clinical.pk.focei import focei_objective
    from phems_clinical.pk.model import PopParams, initial_params

    model = ds.make_model()
    if at == "nonmem":
        theta = model.theta_values.copy()
        free = [i for i, t in enumerate(model.thetas) if not t.fixed]
        theta[free] = NONMEM_THETA
        p = ref.RefParams(
            theta, np.diag(NONMEM_OMEGA), np.array([0.0, math.sqrt(NONMEM_SIGMA)])
        )
    else:
        p = ref.Transform(model).base
    ours = float(
        focei_objective(
            model,
            ds.cohort,
            PopParams(
                jnp.asarray(p.theta),
                jnp.asarray(p.omega),
                initial_params(model).omega_iov,
                jnp.asarray(p.sigma),
                jnp.asarray(0.0),
            ),
        )[0]
    )
    mine = ref.focei_ofv(model, ds.ref_subjects, p)[0]
    rel = abs(mine / ours - 1.0)
    assert rel < 1e-6, f"{ds.name}: reference OFV {mine} vs ours {ours}: rel {rel:.2e}"
    where = "NONMEM's estimates" if at == "nonmem" else "the specification values"
    return (
        f"{ds.name} at {where}: reference OFV {mine:.8f}, ours (JAX "
        f"`focei_objective`) {ours:.8f} (rel. diff {rel:.1e}, required < 1e-6)"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[50, 200, 1000],
        help="simulated Advate cohort sizes (default 50 200 1000)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["focei", "svi", "nuts", "ref"],
        choices=["focei", "svi", "nuts", "ref"],
    )
    ap.add_argument("--no-pheno", action="store_true", help="skip the pheno data set")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 20 patients, 50 SVI steps, NUTS 20+20, "
        "reference capped at 3 iterations",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default experiments/benchmarks/"
        "estimation_<cpu|gpu>[_quick].md)",
    )
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument(
        "--sparse-from",
        type=int,
        default=500,
        help="cohorts with at least this many patients use the sparse "
        "design (default 500)",
    )
    ap.add_argument("--maxiter", type=int, default=1000, help="FOCEI BFGS maxiter")
    ap.add_argument("--svi-steps", type=int, default=2000)
    ap.add_argument("--nuts-warmup", type=int, default=500)
    ap.add_argument("--nuts-samples", type=int, default=500)
    ap.add_argument(
        "--nuts-warm-max",
        type=int,
        default=50,
        help="run a second (warm) NUTS call up to this many patients",
    )
    ap.add_argument(
        "--nuts-budget-s",
        type=float,
        default=900.0,
        help="halve NUTS warmup/samples (down to 200+200) when the time "
        "predicted from the previous size exceeds this",
    )
    ap.add_argument(
        "--ref-max-n",
        type=int,
        default=60,
        help="fit the NumPy reference up to this many subjects; above, "
        "time single OFV evaluations only",
    )
    ap.add_argument("--ref-maxiter", type=int, default=500)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = [20]
        args.svi_steps, args.nuts_warmup, args.nuts_samples = 50, 20, 20
        args.ref_maxiter = 3
    started = _dt.datetime.now()
    load0 = load_average()
    info = device_info()
    packages = ("jax", "jaxlib", "numpyro", "numpy", "scipy")
    info["versions"] = ", ".join(f"{k} {v}" for k, v in versions(packages).items())
    info["code"] = code_state()
    dev = "gpu" if info["platform"] in ("gpu", "cuda", "rocm") else info["platform"]
    out = args.out or HERE / f"estimation_{dev}{'_quick' if args.quick else ''}.md"
    log(f"device {info['device']}; CPU {info['cpu']}; {info['cores']}; writing {out}")

    rows: list = []
    results: dict = {}
    checks: list = []
    datasets = [] if args.no_pheno else [pheno_dataset()]
    if datasets:
        checks += reference_self_check_nonmem(datasets[0])
        log(checks[-1])
    for n in args.sizes:
        design = "sparse" if n >= args.sparse_from else "rich"
        datasets.append(advate_dataset(n, design, args.seed))

    def flush(partial=True):
        return write_report(
            out, info, args, rows, results, checks, started, load0, partial, datasets
        )

    for ds in datasets:
        log(f"== {ds.name}: {ds.n_sub} subjects, {ds.n_obs} observations {ds.note}")
        bayes_ok = ds.name != "pheno"  # pheno: FOCEI and the reference only
        todo = [("focei", "FOCEI", run_focei)]
        todo.append(
            (
                "ref",
                "NumPy ref. FOCEI",
                lambda d, r, a, res: run_reference(
                    d, r, a, res, fit=d.n_sub <= a.ref_max_n
                ),
            )
        )
        if bayes_ok:
            todo += [("svi", "SVI", run_svi), ("nuts", "NUTS", run_nuts)]
        for key, label, fn in todo:
            if key not in args.methods:
                continue
            t0 = time.perf_counter()
            try:
                fn(ds, rows, args, results)
            except Exception as err:  # noqa: BLE001 - a failure is a result too
                import traceback

                traceback.print_exc()
                msg = " ".join(str(err).split())[:160]
                log(f"{ds.name}: {label} FAILED: {msg}")
                rows.append(
                    dict(
                        dataset=ds.name,
                        n_sub=ds.n_sub,
                        n_obs=ds.n_obs,
                        method=label,
                        cold=None,
                        warm=None,
                        obj="FAILED",
                        notes=[
                            f"{type(err).__name__}: {msg} (after "
                            f"{time.perf_counter() - t0:.0f} s)"
                        ],
                    )
                )
            flush()
    # cross-check against our JAX objective last (it compiles; keep "cold" cold)
    if datasets:
        if datasets[0].name == "pheno":
            checks.append(reference_self_check_ours(datasets[0], "nonmem"))
            log(checks[-1])
        for ds in datasets:
            if ds.name.startswith("advate") and ds.n_sub <= args.ref_max_n:
                checks.append(reference_self_check_ours(ds, "spec"))
                log(checks[-1])
                break
    text = flush(partial=False)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
