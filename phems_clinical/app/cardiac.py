"""``phems cardiac``: paediatric cardiac pathways from each hospital's OMOP database,
a federated multi-state model, evaluated per site and on a held-out hospital.

1. Each site reads its OMOP database (``<site>.duckdb``) with the loaders'
   validation, and turns the ``visit_detail`` chains into post-operative sojourns
   (:func:`phems_clinical.data.cardiac.pathways.episodes`); excluded records are
   counted by reason in ``result.json``.
2. Each training site keeps a random ``test_fraction`` of its episodes aside; the
   model (piecewise-constant transition hazards with age, weight, STAT category and
   ventilation, :mod:`phems_clinical.models.multistate`) is trained federatedly
   on the rest with FedAdam (default; reaches the pooled optimum in 300 rounds)
   or FedAvg (:func:`phems_clinical.evaluation.cardiac_eval.train_federated`).
3. Evaluation on each site's held-out episodes and on the held-out hospital:
   C-index for death, IPCW Brier scores, calibration, AUROC for a CICU stay > 7 d.
   ``--compare-pooled`` adds the centralised Newton fit on the same training
   episodes as the reference.

Writes ``result.json``, ``metrics.csv``, ``hazard_ratios.csv`` and
``occupation.png`` (predicted vs Aalen-Johansen state occupation at the held-out
hospital) into a temporary folder beside ``--out``, renamed into place at the end
(:func:`phems_clinical.outputs.staged_dir`); a non-empty ``--out`` is refused
before any work unless ``--overwrite``. Undefined metrics are ``null`` in
``result.json`` (strict JSON).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from phems_clinical.app.omop import holdout_split, round_printer
from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.evaluation.survival import aalen_johansen_multistate
from phems_clinical.models import multistate as ms
from phems_clinical.outputs import check_out, staged_dir
from phems_clinical.provenance import code_state, versions
from phems_clinical.usecases.cardiac import load_sites


def _occupation_figure(params, sojourns: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = ms.DEFAULT_SPEC
    times = np.linspace(0.5, 60.0, 40)
    x = np.asarray(ms.site_examples(sojourns, spec).data["x"])
    pred = np.asarray(ms.occupation(params, x, times, spec)).mean(axis=0)
    emp = aalen_johansen_multistate(sojourns, list(spec.states), times)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, state in enumerate(spec.states):
        (line,) = ax.plot(times, pred[:, j], label=f"{state} (model)")
        ax.plot(
            times,
            emp[:, j],
            ls="--",
            color=line.get_color(),
            label=f"{state} (Aalen-Johansen)",
        )
    ax.set_xlabel("days since surgery")
    ax.set_ylabel("probability of being in state")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cardiac(
    omop: str | Path,
    out: str | Path,
    *,
    holdout: str | None = None,
    strategy: str = "fedadam",
    rounds: int = 300,
    seed: int = 0,
    test_fraction: float = 0.25,
    learning_rate: float | None = None,
    compare_pooled: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train and evaluate the cardiac multi-state model; writes ``out`` (missing
    or empty unless ``overwrite``)."""
    out = check_out(out, overwrite=overwrite)
    sojourns, reports = load_sites(omop)
    names = list(sojourns)
    k_split, k_run = jax.random.split(jax.random.key(seed))
    holdout, train, test = holdout_split(
        k_split, sojourns, "episode_id", holdout, test_fraction
    )
    train_names = list(train)
    lr = {"learning_rate": learning_rate} if learning_rate else {}
    if strategy == "fedadam" and not lr:
        lr = {"learning_rate": 0.1}
    fields: set[str] = set()
    t0 = time.perf_counter()
    params, run, _ = ce.train_federated(
        k_run,
        train,
        strategy=strategy,
        rounds=rounds,
        **lr,
        on_round=round_printer("cardiac", len(train)) if progress else None,
        on_message=lambda r, k, p: fields.update(p),
    )
    seconds = time.perf_counter() - t0
    rows = [
        {"site": n, "split": "test", **ce.evaluate(params, test[n])}
        for n in train_names
    ]
    rows.append(
        {
            "site": holdout,
            "split": "held-out hospital",
            **ce.evaluate(params, sojourns[holdout]),
        }
    )
    metrics = pd.DataFrame(rows)
    result: dict[str, Any] = {
        "use_case": "cardiac",
        "model": "multi-state, piecewise-constant hazards",
        "strategy": strategy,
        "rounds": run.rounds,
        "seconds": round(seconds, 3),
        "seed": seed,
        "holdout": holdout,
        "test_fraction": test_fraction,
        "sites": {
            n: {
                "training_episodes": int(train[n]["episode_id"].nunique())
                if n in train
                else 0,
                **reports[n],
            }
            for n in names
        },
        "metrics": metrics.to_dict(orient="records"),
        "messages": {
            "fields": sorted(fields),
            "checked_against": "data_schemas/federation_message.schema.json",
        },
        "privacy": run.privacy,
        "versions": versions(),
        "code": code_state("phems_clinical/models"),
    }
    if compare_pooled:
        ref = ce.pooled_fit(train)
        ex = ms.stack_examples([ms.site_examples(v) for v in train.values()])
        nll = {
            k: float(
                ms.penalised_nll(
                    p,
                    ex,
                    ridge=1e-3,
                    prior_sd_alpha=3.0,
                    prior_mean_alpha=float(np.log(0.05)),
                )
            )
            for k, p in (("federated", params), ("pooled", ref.params))
        }
        result["pooled"] = {
            "objective": nll,
            "objective_gap": nll["federated"] - nll["pooled"],
            "max_abs_log_hr_difference": float(
                np.max(np.abs(np.asarray(params.beta) - np.asarray(ref.params.beta)))
            ),
        }
    spec = ms.DEFAULT_SPEC
    beta = np.asarray(params.beta)
    from phems_clinical.outputs import strict_json  # NaN -> null

    result = strict_json(result)
    with staged_dir(out, overwrite=overwrite) as tmp:
        metrics.to_csv(tmp / "metrics.csv", index=False)
        pd.DataFrame(
            [
                {
                    "transition": f"{spec.states[a]}->{spec.states[b]}",
                    "covariate": c,
                    "log_hr": beta[k, p],
                    "hr": float(np.exp(beta[k, p])),
                }
                for k, (a, b) in enumerate(spec.transitions)
                for p, c in enumerate(spec.covariates)
            ]
        ).to_csv(tmp / "hazard_ratios.csv", index=False)
        _occupation_figure(
            params,
            sojourns[holdout],
            tmp / "occupation.png",
            f"held-out hospital {holdout}: state occupation",
        )
        (tmp / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def add_cardiac_parser(subparsers):
    """Register ``phems cardiac``."""
    c = subparsers.add_parser(
        "cardiac",
        help="cardiac pathways: federated multi-state model from each "
        "site's OMOP database, evaluated per site and on a "
        "held-out hospital",
    )
    c.add_argument(
        "--omop",
        required=True,
        help="folder of <site>.duckdb files (phems omop simulate --use-case cardiac)",
    )
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument(
        "--holdout",
        default=None,
        help="site kept out of training (default: the last site)",
    )
    c.add_argument(
        "--strategy",
        default="fedadam",
        choices=("fedadam", "fedavg"),
        help="federated strategy: fedadam (Adam on the server, default) "
        "or fedavg (weighted mean)",
    )
    c.add_argument(
        "--rounds", type=int, default=300, help="federated rounds (default 300)"
    )
    c.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="local SGD step (default 0.1 FedAdam, 0.15 FedAvg)",
    )
    c.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="share of each training site's episodes held out",
    )
    c.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    c.add_argument(
        "--compare-pooled",
        action="store_true",
        help="also fit the pooled training episodes centrally (Newton)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out as a whole (refused otherwise)",
    )
    c.set_defaults(func=_cardiac_cmd)
    return c


def _cardiac_cmd(args) -> int:
    res = run_cardiac(
        args.omop,
        args.out,
        holdout=args.holdout,
        strategy=args.strategy,
        rounds=args.rounds,
        seed=args.seed,
        test_fraction=args.test_fraction,
        learning_rate=args.learning_rate,
        compare_pooled=args.compare_pooled,
        overwrite=args.overwrite,
    )
    print(pd.DataFrame(res["metrics"]).round(3).to_string(index=False))
    if "pooled" in res:
        print(f"objective gap to the pooled fit: {res['pooled']['objective_gap']:.2e}")
    print(
        f"wrote {args.out}/result.json, metrics.csv, hazard_ratios.csv, occupation.png"
    )
    return 0


__all__ = ["add_cardiac_parser", "load_sites", "run_cardiac"]
