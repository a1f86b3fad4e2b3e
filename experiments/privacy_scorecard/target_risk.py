#!/usr/bin/env python
"""Target-risk search at the scorecard study's simulated hospitals: for each use
case, the least-loss anonymisation whose singling-out risk (upper end of the 95 %
interval) is at most the stated target, measured by the scorecard's own attacks
on patient profiles (released training half vs held-out half as control); then
the utility paid for it: the scorecard (``score_sources``, utility included) of
the real training data, the QI-only release (k = 5) and the chosen setting,
derived as ``anonymised`` sources with its options.

    python experiments/privacy_scorecard/target_risk.py            # study sizes
    python experiments/privacy_scorecard/target_risk.py --quick    # small cohorts

Writes ``results/target_risk.md`` (every setting tried, its loss and risks; the
utility and risks of real, k = 5 only and the chosen setting).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

from phems_clinical import usecases  # noqa: E402
from phems_clinical.evaluation import scorecard as sc  # noqa: E402
from phems_clinical.evaluation.sources import (  # noqa: E402
    SourceSpec,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.privacy.target_risk import (  # noqa: E402
    Setting,
    search_target_risk,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import HEADLINE, site_data  # noqa: E402

SHOWN = (
    "singling_out_risk",
    "singling_out_risk_multivariate",
    "linkability_risk",
    "inference_risk",
    "mia_auc",
)
#: Ladders per use case (the search orders them by measured IL1s loss).
LADDERS = {
    "haemophilia": [
        Setting(5),
        Setting(5, None, 0.05),
        Setting(5, None, 0.1),
        Setting(5, None, 0.0, 1.0),
        Setting(5, None, 0.05, 1.0),
        Setting(5, None, 0.1, 1.0),
        Setting(5, 5, 0.1, 1.0),
        Setting(5, None, 0.2, 6.0),
        Setting(10, 10, 0.2, 6.0),
    ],
    "picu": [
        Setting(5),
        Setting(5, None, 0.05),
        Setting(5, None, 0.1),
        Setting(5, None, 0.2),
        Setting(5, 3),
        Setting(5, 5),
        Setting(5, 10),
        Setting(5, 5, 0.1),
        Setting(5, 10, 0.2),
        Setting(10, 10, 0.4),
    ],
    "cardiac": [
        Setting(5),
        Setting(5, None, 0.0, 1.0),
        Setting(5, None, 0.0, 7.0),
        Setting(5, None, 0.0, 30.0),
        Setting(10, None, 0.0, 30.0),
    ],
}


def search(name: str, n: int, seed: int, target: float):
    """The search's result, and the site's (train, holdout) split it used."""
    uc = usecases.get(name)
    k_data, k_split, k_search = jax.random.split(jax.random.key(seed), 3)
    data = site_data(name, n, k_data)
    train, hold = split_patients(k_split, data, uc, 0.5)
    tp, hp = uc.profile(train), uc.profile(hold)
    aux, secret = uc.attack_columns

    def measure(key, released):
        return sc.privacy_scores(
            key,
            tp,
            hp,
            uc.profile(released)[list(tp.columns)],
            aux_cols=list(aux),
            secret=secret,
            n_attacks=200,
        )

    res = search_target_risk(
        k_search,
        train,
        uc,
        {"singling_out_risk": target},
        measure,
        ladder=LADDERS[name],
    )
    return res, train, hold


#: Risks shown next to the utility (the target's and what it leaves).
COST_RISKS = ("singling_out_risk", "linkability_risk", "mia_auc")


def utility_cost(name: str, res, train, hold, seed: int):
    """Scorecard of real, the QI-only release and the chosen setting (same
    training patients, same held-out real patients), utility included."""
    uc = usecases.get(name)
    k_derive, k_score = jax.random.split(jax.random.fold_in(jax.random.key(seed), 7))
    s = res.setting
    chosen = {
        "k": s.k,
        "micro_k": s.micro_k,
        "noise": s.noise,
        "time_grid": s.time_grid,
    }
    specs = [
        SourceSpec("real", "real"),
        SourceSpec("k=5 only", "anonymised", "lattice", {"k": 5}),
        SourceSpec("chosen", "anonymised", "lattice", chosen),
    ]
    pk = load_product("advate") if name == "haemophilia" else None
    derived = [
        derive(jax.random.fold_in(k_derive, i), uc, train, spec, pk_model=pk)
        for i, spec in enumerate(specs)
    ]
    return score_sources(k_score, uc, train, hold, derived, pk_model=pk, seed=seed)


def cost_table(ds, name: str) -> list[str]:
    metrics = [*HEADLINE[name], *COST_RISKS]
    src = list(ds.source.values)
    lines = ["| metric | " + " | ".join(src) + " |", "|---|" + "---|" * len(src)]
    for m in metrics:
        cells = []
        for c in src:
            v, lo, hi = (
                float(ds[x].sel(metric=m, source=c))
                for x in ("value", "ci_low", "ci_high")
            )
            cells.append(
                "n/a"
                if v != v
                else f"{v:.3g}"
                if lo != lo
                else f"{v:.3g} ({lo:.3g}-{hi:.3g})"
            )
        lines.append(
            f"| {ds['label'].sel(metric=m).item()} | " + " | ".join(cells) + " |"
        )
    return lines


def table(res, unit: str) -> list[str]:
    lines = [
        "| setting | IL1s | suppressed | " + " | ".join(SHOWN) + " |",
        "|---|---|---|" + "---|" * len(SHOWN),
    ]
    for st in res.steps:
        if st.error:
            lines.append(f"| {st.setting.describe(unit)} | not made: {st.error} |")
            continue
        risks = [
            (
                ""
                if m not in st.risks
                else f"{st.risks[m][0]:.2f} ({st.risks[m][1]:.2f}-{st.risks[m][2]:.2f})"
            )
            for m in SHOWN
        ]
        mark = " **chosen**" if st.meets else ""
        lines.append(
            f"| {st.setting.describe(unit)}{mark} | {st.loss:.3f} | "
            f"{st.suppressed_share:.1%} | " + " | ".join(risks) + " |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.2)
    args = ap.parse_args(argv)
    sizes = (
        {"haemophilia": 60, "picu": 200, "cardiac": 300}
        if args.quick
        else {"haemophilia": 200, "picu": 1000, "cardiac": 2000}
    )
    parts = [
        f"# Target-risk search: singling-out <= {args.target:g} (seed {args.seed})",
        "",
        "Command: `python experiments/privacy_scorecard/target_risk.py"
        f"{' --quick' if args.quick else ''}`",
        "",
        "Risks: value (95 % interval), scorecard attacks on patient profiles, "
        "released training half vs held-out half. Rows in the order tried "
        "(least IL1s first); settings after the chosen one were not measured.",
        "Then the utility paid: one scorecard (utility included) of the real "
        "training half, the QI-only release (k = 5) and the chosen setting, "
        "each tested on the held-out real half; value (95 % interval).",
        "",
    ]
    for name, n in sizes.items():
        t0 = time.perf_counter()
        res, train, hold = search(name, n, args.seed, args.target)
        unit = usecases.get(name).roles.longitudinal.time_unit
        t1 = time.perf_counter()
        parts += [
            f"## {name} ({n} simulated patients; 50 % held out)",
            "",
            res.message,
            "",
            *table(res, unit),
            "",
            f"(search {t1 - t0:.0f} s)",
            "",
        ]
        print(res.message, file=sys.stderr)
        if res.met:
            ds = utility_cost(name, res, train, hold, args.seed)
            parts += [
                f"Utility paid for {res.setting.describe(unit)}:",
                "",
                *cost_table(ds, name),
                "",
                f"(scorecard {time.perf_counter() - t1:.0f} s)",
                "",
            ]
    out = HERE / "results" / "target_risk.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
