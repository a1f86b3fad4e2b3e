#!/usr/bin/env python
"""Real, anonymised and synthetic data side by side at one simulated hospital per
use case: every source derived from the same training patients and
scored on one scorecard against the same held-out real patients.

    python experiments/privacy_scorecard/run.py            # the committed run
    python experiments/privacy_scorecard/run.py --quick    # small cohorts

Writes ``experiments/privacy_scorecard/results/<use_case>/scorecard.{nc,html}`` and
``results/summary.md`` (headline metrics of every source, one table per use case).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

from phems_clinical import usecases  # noqa: E402
from phems_clinical.data.cardiac import simulate_cardiac  # noqa: E402
from phems_clinical.data.cardiac.pathways import episodes  # noqa: E402
from phems_clinical.data.picu import hourly_table, simulate_picu  # noqa: E402
from phems_clinical.evaluation.scorecard_report import write_scorecard  # noqa: E402
from phems_clinical.evaluation.sources import (  # noqa: E402
    default_sources,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort  # noqa: E402

HERE = Path(__file__).resolve().parent
HEADLINE = {
    "fidelity": ("column_shapes", "detection_auc", "pmse_ratio_perm"),
    "privacy": (
        "singling_out_risk",
        "linkability_risk",
        "inference_risk",
        "mia_auc",
        "k_anonymity",
        "prosecutor_risk_max",
    ),
    "haemophilia": ("pk_bias_cl", "pk_bias_v1", "forecast_mdape"),
    "picu": ("auroc", "outcome_auroc"),
    "cardiac": ("c_index", "auroc_cicu_7d", "outcome_auroc"),
}


def site_data(use_case: str, n: int, key):
    if use_case == "haemophilia":
        ev, _ = simulate_cohort(key, load_product("advate"), HospitalSpec("h", n))
        return ev
    if use_case == "picu":
        return hourly_table(simulate_picu(key, n_stays=n).tables)
    return episodes(simulate_cardiac(key, n_episodes=n).tables)[0]


def run(use_case: str, n: int, seed: int, out: Path) -> tuple[str, float]:
    key = jax.random.key(seed)
    k_data, k_split, k_derive, k_score = jax.random.split(key, 4)
    t0 = time.perf_counter()
    data = site_data(use_case, n, k_data)
    uc = usecases.get(use_case)
    train, hold = split_patients(k_split, data, uc, 0.5)
    pk = load_product("advate") if use_case == "haemophilia" else None
    derived = [
        derive(jax.random.fold_in(k_derive, i), uc, train, spec, pk_model=pk)
        for i, spec in enumerate(default_sources(uc))
    ]
    ds = score_sources(k_score, uc, train, hold, derived, pk_model=pk, seed=seed)
    write_scorecard(
        ds, out / use_case, title=f"{use_case}: real, anonymised and synthetic data"
    )
    metrics = [m for g in ("fidelity", use_case, "privacy") for m in HEADLINE[g]]
    v = ds["value"].sel(metric=metrics).to_pandas().T
    lines = [
        f"### {use_case} ({n} simulated patients; 50 % held out)",
        "",
        "| metric | " + " | ".join(v.columns) + " |",
        "|---|" + "---|" * len(v.columns),
    ]
    for m, row in v.iterrows():
        lines.append(
            f"| {ds['label'].sel(metric=m).item()} | "
            + " | ".join(
                "n/a" if row[c] != row[c] else f"{row[c]:.3g}" for c in v.columns
            )
            + " |"
        )
    eps = ds["epsilon"].to_pandas()
    lines += [
        "",
        "epsilon: "
        + ", ".join(f"{s} {'not DP' if e != e else f'{e:g}'}" for s, e in eps.items()),
        "",
    ]
    return "\n".join(lines), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = (
        {"haemophilia": 60, "picu": 200, "cardiac": 300}
        if args.quick
        else {"haemophilia": 200, "picu": 1000, "cardiac": 2000}
    )
    out = HERE / "results"
    parts = [
        f"# Scorecard summary (seed {args.seed})",
        "",
        f"Command: `python experiments/privacy_scorecard/run.py"
        f"{' --quick' if args.quick else ''}`",
        "",
    ]
    for uc, n in sizes.items():
        text, sec = run(uc, n, args.seed, out)
        parts += [text, f"({sec:.0f} s)", ""]
        print(text, file=sys.stderr)
    (out / "summary.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
