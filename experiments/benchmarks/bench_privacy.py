#!/usr/bin/env python
"""Anonymisation and synthetic-data benchmark: fit and sample
times of each generator, and the anonymiser's time, on N patients per use case.
Prints one markdown table, device named.

Run from the repository root (writes ``experiments/benchmarks/privacy_<dev>.md``):

    python experiments/benchmarks/bench_privacy.py            # 5,000 per use case
    python experiments/benchmarks/bench_privacy.py --n 500    # quick

Rows per use case (one site; haemophilia: N Advate patients, sparse designs; PICU:
N stays; cardiac: N surgical episodes):

* **anonymise** (:func:`phems_clinical.privacy.release.anonymise`): k = 5 with up
  to 5 % of patients suppressed, optimal lattice search and Mondrian; the whole
  call (patient table, search, writing back onto every row, date shift,
  pseudonyms).
* **longitudinal generator**: PK virtual population (population parameters = the
  library model's published values; the FOCEI fit a site would run first is not
  timed here), PICU hourly sequences, cardiac pathways: fit, then sample N.
* **profiles** (one row per patient, :mod:`phems_clinical.evaluation.profiles`):
  our Gaussian copula and our MST (epsilon = 1, delta = 1e-6); and the optional
  comparators, each run in its own virtual environment when named:
  SDV 2.0 GaussianCopula (``PHEMS_SDV_PYTHON``; BUSL-1.1) and smartnoise-synth's
  MST (``PHEMS_SNSYNTH_PYTHON``; needs mbi < 2; given the same public domain).
  Times of a first call include JAX compilation (noted).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench  # noqa: E402  (experiments/benchmarks/_bench.py)

_bench.choose_device()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from _bench import Timed, log  # noqa: E402

HERE = Path(__file__).resolve().parent

from phems_clinical import usecases  # noqa: E402
from phems_clinical.data.cardiac import simulate_cardiac  # noqa: E402
from phems_clinical.data.cardiac.pathways import episodes  # noqa: E402
from phems_clinical.data.picu import hourly_table, simulate_picu  # noqa: E402
from phems_clinical.evaluation.profiles import profile  # noqa: E402
from phems_clinical.evaluation.sources import PROFILE_BOUNDS, profile_domain  # noqa: E402
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.model import initial_params  # noqa: E402
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort  # noqa: E402
from phems_clinical.privacy.release import anonymise  # noqa: E402
from phems_clinical.privacy.synth import (  # noqa: E402
    fit_copula,
    fit_mst,
    fit_pathways,
    sample_copula,
    sample_mst,
    sample_pathways,
)
from phems_clinical.privacy.synth import picu_sequences as ps  # noqa: E402
from phems_clinical.privacy.synth import pk_virtual as pv  # noqa: E402

KEY = jax.random.key(0)


def _data(use_case: str, n: int):
    if use_case == "haemophilia":
        ev, _ = simulate_cohort(
            KEY, load_product("advate"), HospitalSpec("h", n, design="sparse")
        )
        return ev, "ID"
    if use_case == "picu":
        return hourly_table(simulate_picu(KEY, n_stays=n).tables), "stay_id"
    return episodes(simulate_cardiac(KEY, n_episodes=n).tables)[0], "episode_id"


def _generator(use_case: str, data, n: int):
    if use_case == "haemophilia":
        model = load_product("advate")
        fit = Timed(pv.fit_virtual_population, data, model, initial_params(model))
        smp = Timed(lambda: pv.sample_virtual_population(KEY, fit.value, n)[0])
        return "PK virtual population", fit, smp
    if use_case == "picu":
        fit = Timed(ps.fit_picu_sequences, data)
        return (
            "PICU hourly sequences",
            fit,
            Timed(ps.sample_picu_sequences, KEY, fit.value, n),
        )
    fit = Timed(fit_pathways, data)
    return "cardiac pathways", fit, Timed(sample_pathways, KEY, fit.value, n)


def _comparator(env: str, script: str, prof, n: int, extra: list[str]):
    python = os.environ.get(env)
    if not python:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.csv"
        prof.to_csv(src, index=False)
        res = subprocess.run(
            [
                python,
                str(HERE / "comparators" / script),
                str(src),
                str(n),
                str(Path(tmp) / "out.csv"),
                *extra,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if res.returncode:
        log(f"{script} failed: {res.stderr[-500:]}")
        return {"error": res.stderr.strip().splitlines()[-1][:120]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(use_case: str, n: int, rows: list) -> None:
    data, unit = _data(use_case, n)
    n_pat = data[unit].nunique()
    tag = f"{use_case} ({n_pat:,} patients, {len(data):,} rows)"
    for method in ("lattice", "mondrian"):
        t = Timed(
            anonymise,
            KEY,
            data,
            usecases.get(use_case).roles,
            k=5,
            max_suppression=0.05,
            method=method,
        )
        r = t.value.report
        rows.append(
            (
                tag,
                f"anonymise, {method} k=5",
                f"{t.seconds:.2f}",
                "",
                f"k={r['k']}, {r['patients_suppressed']} suppressed, levels "
                + ", ".join(
                    f"{c}={q['level']}" for c, q in r["quasi_identifiers"].items()
                ),
            )
        )
    log(f"{use_case}: anonymiser done")
    name, fit, smp = _generator(use_case, data, n_pat)
    rows.append(
        (
            tag,
            name,
            f"{fit.seconds:.2f}",
            f"{smp.seconds:.2f}",
            f"{len(smp.value):,} rows sampled; "
            + fit.note("fit")
            + "; "
            + smp.note("sample"),
        )
    )
    log(f"{use_case}: generator done")
    prof = profile(usecases.get(use_case), data)
    cat = [
        c
        for c in prof.columns
        if prof[c].dtype == object
        or c in ("SEX", "BGO", "died", "culture", "stat", "ventilation", "readmitted")
    ]
    cop = Timed(fit_copula, prof, categorical=cat)
    cs = Timed(sample_copula, KEY, cop.value, len(prof))
    ptag = f"{use_case} profiles ({len(prof):,} x {prof.shape[1]})"
    rows.append(
        (ptag, "Gaussian copula (ours)", f"{cop.seconds:.2f}", f"{cs.seconds:.2f}", "")
    )
    mst = Timed(fit_mst, KEY, prof, profile_domain(use_case), epsilon=1.0, delta=1e-6)
    ms_ = Timed(sample_mst, KEY, mst.value, len(prof))
    rows.append(
        (
            ptag,
            "MST (ours, mbi 2.0), epsilon 1",
            f"{mst.seconds:.2f}",
            f"{ms_.seconds:.2f}",
            mst.note("fit"),
        )
    )
    sdv = _comparator("PHEMS_SDV_PYTHON", "sdv_gaussian_copula.py", prof, len(prof), [])
    if sdv is not None:
        rows.append(
            (
                ptag,
                f"SDV {sdv.get('version', '')} GaussianCopula (comparator)",
                f"{sdv.get('fit_s', float('nan')):.2f}",
                f"{sdv.get('sample_s', float('nan')):.2f}",
                sdv.get("error", "separate venv"),
            )
        )
    dom = Path(tempfile.mkdtemp()) / "domain.json"
    dom.write_text(
        json.dumps(
            {
                c: ({"cat": list(v)} if isinstance(v, list) else v)
                for c, v in PROFILE_BOUNDS[use_case].items()
            }
        )
    )
    sn = _comparator(
        "PHEMS_SNSYNTH_PYTHON", "smartnoise_mst.py", prof, len(prof), ["1.0", str(dom)]
    )
    if sn is not None:
        rows.append(
            (
                ptag,
                "smartnoise-synth MST, epsilon 1 (comparator)",
                f"{sn.get('fit_s', float('nan')):.2f}",
                f"{sn.get('sample_s', float('nan')):.2f}",
                sn.get("error", "separate venv; same public domain"),
            )
        )
    log(f"{use_case}: profiles done")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="patients per use case")
    ap.add_argument("--use-cases", default="haemophilia,picu,cardiac")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows: list = []
    t0 = time.perf_counter()
    for uc in args.use_cases.split(","):
        bench(uc, args.n, rows)
    dev, tag = _bench.device_line()
    lines = [
        f"# Anonymisation and synthetic-data benchmark ({_dt.date.today()})",
        "",
        f"Device: {dev}. Command: `python {shlex.join(sys.argv)}`. "
        f"Total {time.perf_counter() - t0:.0f} s.",
        "",
        "| data | method | fit / run (s) | sample (s) | notes |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else HERE / f"privacy_{tag}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
