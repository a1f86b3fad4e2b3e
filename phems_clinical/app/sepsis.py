"""``phems sepsis``: PICU sepsis risk from each hospital's OMOP database, trained
federatedly, evaluated per site and on a held-out hospital.

1. Each site reads its OMOP database with the loaders' validation (excluded
   records counted by reason in ``result.json``), builds the hourly table
   (:func:`phems_clinical.data.picu.hourly_table`) and labels every stay with its
   Phoenix sepsis onset (:func:`phems_clinical.models.scores.sepsis_onset`:
   Phoenix Sepsis Score >= 2 with suspected infection; Schlapbach et al., JAMA
   2024).
2. Each training site keeps a random ``test_fraction`` of its stays aside. The
   model (``logistic`` on windowed features, or ``tcn`` on the hourly sequence;
   :mod:`phems_clinical.models.sepsis`) predicts onset within the next
   ``horizon_h`` hours and is trained over the training sites with FedAdam or
   FedAvg (:mod:`phems_clinical.evaluation.sepsis_eval`).
3. The alarm threshold maximises the CinC 2019 normalised utility on the training
   stays; each site's held-out stays and the held-out hospital are scored with
   AUROC, AUPRC, calibration slope / intercept, ECE, Brier score and the utility.

Writes ``result.json``, ``metrics.csv`` and ``calibration.png`` into a temporary
folder beside ``--out``, renamed into place at the end
(:func:`phems_clinical.outputs.staged_dir`); a non-empty ``--out`` is refused
before any work unless ``--overwrite``. Undefined metrics (e.g. AUROC at a site
without an onset) are ``null`` in ``result.json`` (strict JSON) and empty in
``metrics.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from phems_clinical.app.omop import holdout_split, round_printer
from phems_clinical.evaluation import sepsis_eval as se
from phems_clinical.outputs import check_out, staged_dir
from phems_clinical.provenance import code_state, versions
from phems_clinical.usecases.picu import load_sites

TEST = ":test"
"""Suffix of a training site's held-out stays in the metrics."""


def _calibration_figure(probs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for name, (p, y) in probs.items():
        if y.size == 0:
            continue
        edges = np.quantile(p, np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
        mp = [p[idx == b].mean() for b in range(10) if np.any(idx == b)]
        my = [y[idx == b].mean() for b in range(10) if np.any(idx == b)]
        ax.plot(mp, my, marker="o", label=name)
        top = max(top, *mp, *my)
    top = 1.1 * top if top > 0 else 1.0  # hourly risks are small: zoom to the data
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted probability (decile means)")
    ax.set_ylabel("observed onset within horizon")
    ax.set_title("calibration on held-out stays")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sepsis(
    omop: str | Path,
    out: str | Path,
    *,
    holdout: str | None = None,
    model: str = "tcn",
    algorithm: str = "fedadam",
    rounds: int = 50,
    horizon_h: int = 6,
    seed: int = 0,
    test_fraction: float = 0.25,
    progress: bool = True,
    overwrite: bool = False,
    **train_kw,
) -> dict:
    """Train and evaluate the sepsis model over the sites in ``omop``; writes
    ``out`` (missing or empty unless ``overwrite``)."""
    out = check_out(out, overwrite=overwrite)
    hourly, onsets, reports = load_sites(omop)
    if horizon_h < 1:
        raise ValueError(f"--horizon: {horizon_h} h; expected at least 1 hour")
    k_split, k_run = jax.random.split(jax.random.key(seed))
    holdout, train, test = holdout_split(
        k_split, hourly, "stay_id", holdout, test_fraction
    )
    train_names = list(train)
    parts, onset_parts = {}, {}
    for n in train_names:
        parts[n], parts[n + TEST] = train[n], test[n]
        onset_parts[n] = onset_parts[n + TEST] = onsets[n]
    parts[holdout], onset_parts[holdout] = hourly[holdout], onsets[holdout]
    held_out = [n + TEST for n in train_names] + [holdout]
    fields: set[str] = set()
    run_kw = {
        "on_round": round_printer("sepsis", len(train_names)) if progress else None,
        "on_message": lambda r, k, p: fields.update(p),
    }
    res = se.cross_site_evaluation(
        k_run,
        parts,
        onset_parts,
        held_out=held_out,
        model=model,
        horizon_h=horizon_h,
        algorithm=algorithm,
        rounds=rounds,
        run_kw=run_kw,
        **train_kw,
    )
    rows = []
    for name, m in res["metrics"].items():
        site, split = (
            (name[: -len(TEST)], "test")
            if name.endswith(TEST)
            else (name, "held-out hospital" if name == holdout else "train")
        )
        rows.append({"site": site, "split": split, **m})
    metrics = pd.DataFrame(rows)
    result: dict[str, Any] = {
        "use_case": "picu_sepsis",
        "model": model,
        "algorithm": algorithm,
        "target": f"Phoenix sepsis onset within the next {horizon_h} h",
        "rounds": res["rounds"],
        "seconds_train": round(res["seconds_train"], 3),
        "seed": seed,
        "holdout": holdout,
        "test_fraction": test_fraction,
        "threshold": res["threshold"],
        "train_utility": res["train_utility"],
        "sites": reports,
        "metrics": metrics.to_dict(orient="records"),
        "messages": {
            "fields": sorted(fields),
            "checked_against": "data_schemas/federation_message.schema.json",
        },
        "privacy": res["privacy"],
        "versions": versions(),
        "code": code_state("phems_clinical/models"),
    }
    from phems_clinical.outputs import strict_json  # NaN -> null

    result = strict_json(result)
    with staged_dir(out, overwrite=overwrite) as tmp:
        metrics.to_csv(tmp / "metrics.csv", index=False)
        _calibration_figure(
            {n: res["probs"][n] for n in held_out}, tmp / "calibration.png"
        )
        (tmp / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def add_sepsis_parser(subparsers):
    """Register ``phems sepsis``."""
    s = subparsers.add_parser(
        "sepsis",
        help="PICU sepsis risk: federated model from each site's OMOP "
        "database, evaluated per site and on a held-out hospital",
    )
    s.add_argument(
        "--omop",
        required=True,
        help="folder of <site>.duckdb files (phems omop simulate --use-case picu)",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument(
        "--model",
        default="tcn",
        choices=("tcn", "logistic"),
        help="tcn (default; held-out AUROC 0.74 on the default sites) or "
        "logistic (fast, weak: 0.51)",
    )
    s.add_argument(
        "--algorithm",
        default="fedadam",
        choices=("fedadam", "fedavg"),
        help="federated strategy: fedadam (Adam on the server, default) "
        "or fedavg (weighted mean)",
    )
    s.add_argument(
        "--rounds", type=int, default=50, help="federated rounds (default 50)"
    )
    s.add_argument(
        "--horizon",
        type=int,
        default=6,
        help="predict Phoenix sepsis onset within this many hours",
    )
    s.add_argument(
        "--holdout",
        default=None,
        help="site kept out of training (default: the last site)",
    )
    s.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="share of each training site's stays held out",
    )
    s.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out as a whole (refused otherwise)",
    )
    s.set_defaults(func=_sepsis_cmd)
    return s


def _sepsis_cmd(args) -> int:
    res = run_sepsis(
        args.omop,
        args.out,
        holdout=args.holdout,
        model=args.model,
        algorithm=args.algorithm,
        rounds=args.rounds,
        horizon_h=args.horizon,
        seed=args.seed,
        test_fraction=args.test_fraction,
        overwrite=args.overwrite,
    )
    cols = [
        "site",
        "split",
        "n_stays",
        "auroc",
        "auprc",
        "calibration_slope",
        "calibration_intercept",
        "ece",
        "utility",
    ]
    print(pd.DataFrame(res["metrics"])[cols].round(3).to_string(index=False))
    print(f"wrote {args.out}/result.json, metrics.csv, calibration.png")
    return 0


__all__ = ["add_sepsis_parser", "load_sites", "run_sepsis"]
