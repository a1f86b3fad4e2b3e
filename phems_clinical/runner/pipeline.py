"""One experiment run, for any use case.

1. Each training hospital splits its patients into training and held-out real
   patients (:func:`phems_clinical.evaluation.sources.split_patients`) and derives
   every configured source (real, anonymised, synthetic...) from its training
   patients, locally (:func:`phems_clinical.evaluation.sources.derive`). A source
   that cannot be produced (k too large, too few patients) fails here, before any
   training.
2. Each training hospital scores all its derived sources side by side (fidelity
   and privacy) against its own held-out patients
   (:func:`phems_clinical.evaluation.sources.score_sources`): one scorecard per site.
3. Per source, the use case's model (its ``task``, :mod:`phems_clinical.usecases`) is
   trained
   federatedly over the hospitals' derived data (:mod:`phems_clinical.runner.
   training`; only the algorithm's messages leave a site).
4. The model is scored on the held-out real patients of every training hospital
   and on every patient of the held-out hospital.

:func:`run_pipeline` returns plain tables (:class:`SourceRun` per source, one
scorecard per site); :mod:`phems_clinical.runner.results` makes ``results.nc``.
With a checkpoint folder every finished step is kept, and a rerun with the same
arguments resumes where the interrupted one stopped, to identical results.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd
import xarray as xr

from phems_clinical import usecases
from phems_clinical.evaluation.sources import (
    SourceSpec,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.federation.engine import CheckpointError
from phems_clinical.outputs import replaced_file, write_atomic
from phems_clinical.progress import ProgressFn, begin, end, note, silent, step, within
from phems_clinical.runner.training import (
    FederationSettings,
    check_flower_model,
    check_settings,
    train,
    train_flower,
)
from phems_clinical.usecases.base import PLOT_SITE
from phems_clinical.usecases.task import Task, stack_sites


class SourceRun(NamedTuple):
    """What one source gave: the model's named estimates, its scores per
    evaluation site (``{site: {metric: value}}``), rounds, convergence (the
    strategy's stopping rule met at a finite objective), the DP guarantee of
    training (``{}`` when not DP), why training stopped and, where the fit gives
    them, the estimates' standard errors."""

    estimates: dict[str, float]
    utility: dict[str, dict[str, float]]
    rounds: int
    converged: bool
    privacy: dict[str, Any]
    stopped_by: str = ""
    se: dict[str, float] = {}


class PipelineRun(NamedTuple):
    """Every source's :class:`SourceRun` and each training site's scorecard (all
    sources side by side); ``tables``: each source derived in this run (and the
    real training data as ``real``), the training sites' tables stacked with the
    column :data:`phems_clinical.usecases.base.PLOT_SITE` (the report's figures;
    kept in memory only)."""

    sources: dict[str, SourceRun]
    scorecards: dict[str, xr.Dataset]
    train_sites: list[str]
    holdout_site: str
    tables: dict[str, pd.DataFrame] = {}


def resolve_source(spec: SourceSpec, use_case: str) -> SourceSpec:
    """``synthetic`` with method ``default`` means the use case's generator."""
    if spec.kind == "synthetic" and spec.method in ("default", "none"):
        return dataclasses.replace(spec, method=usecases.get(use_case).generator)
    return spec


def _save_source(run: SourceRun, folder: Path) -> None:
    """The ``done.json`` marker of a finished source (written last of its files,
    atomically: a kill leaves no marker or a whole one). NaN scores are kept as
    JSON's NaN extension, so a resumed run reads back exactly what it saved."""
    write_atomic(folder / "done.json", json.dumps(run._asdict()))


def _load_source(folder: Path) -> SourceRun | None:
    """The finished source kept in ``folder``, or None; a marker that cannot be
    read is an error naming it, never a silent rerun or a half-read result."""
    done = folder / "done.json"
    if not done.exists():
        return None
    try:
        return SourceRun(**json.loads(done.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {done}: cannot be read ({err}); remove "
            f"the folder {folder} to rerun this source"
        ) from None


def _load_card(path: Path) -> xr.Dataset:
    try:
        return xr.open_dataset(path, engine="h5netcdf").load()
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read "
            f"({type(err).__name__}); remove it to rescore this "
            f"site"
        ) from None


def _dp_statement(privacy: list[dict] | None, calibration: dict) -> dict:
    """The run's patient-level guarantee: the largest ε over sites (sites hold
    disjoint patients: parallel composition), its δ and unit."""
    if not privacy:
        return {}
    eps = [float(p["epsilon"]) for p in privacy]
    return {
        "epsilon": max(eps),
        "delta": float(privacy[0]["delta"]),
        "unit": privacy[0]["unit"],
        "accountant": privacy[0]["accountant"],
        "noise_multiplier": float(calibration.get("noise_multiplier", np.nan)),
        "steps": int(privacy[0]["steps"]),
        "clip": privacy[0]["clip"],
        "noise_source": privacy[0].get("noise_source", ""),
    }


def run_pipeline(
    key,
    task: Task,
    sites: Mapping[str, pd.DataFrame],
    model: Any,
    sources: Sequence[SourceSpec],
    *,
    holdout_site: str,
    federation: FederationSettings | None = None,
    train_sites: Sequence[str] | None = None,
    test_fraction: float = 0.5,
    n_attacks: int = 100,
    progress: ProgressFn | None = None,
    checkpoint_dir: str | Path | None = None,
) -> PipelineRun:
    """Derive, score, train federatedly and evaluate every source.

    ``sites``: each hospital's analysis table (events, hourly table or sojourns);
    ``holdout_site`` takes no part in training and is evaluated whole;
    ``train_sites``: the hospitals that train (default: all the others);
    ``model``: the task's model (``task.model_from_config``);
    ``progress``: listener of :mod:`phems_clinical.progress` events (tasks
    ``derive``: sources x sites, ``score``: sites x sources, ``train``: sources,
    ``rounds``: each federated fit; notes say what each stage gave). It only
    observes: the results are the same with any listener or none.
    """
    use_case = task.use_case
    uc = usecases.get(use_case)
    if holdout_site not in sites:
        raise ValueError(
            f"data.holdout_site: {holdout_site!r} is not one of {sorted(sites)}"
        )
    train_sites = [s for s in (train_sites or sites) if s != holdout_site]
    unknown = sorted(set(train_sites) - set(sites))
    if unknown:
        raise ValueError(
            f"federation.sites: {unknown} are not among the sites {sorted(sites)}"
        )
    if not train_sites:
        raise ValueError(
            "federation.sites: need at least one training site besides the held-out one"
        )
    if not sources:
        raise ValueError("sources: at least one data source is needed")
    federation = federation or FederationSettings()
    strategy = federation.strategy or task.strategy
    check_settings(federation, strategy, task.strategies, use_case)
    if federation.engine == "flower":
        check_flower_model(use_case, model)
    sources = [resolve_source(s, use_case) for s in sources]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: duplicate names {names}")
    k_split, k_derive, k_fed, k_score = jax.random.split(key, 4)
    split = {
        s: split_patients(jax.random.fold_in(k_split, i), sites[s], uc, test_fraction)
        for i, s in enumerate(train_sites)
    }
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    progress = progress or silent

    # what an interrupted run finished: those sources need no derivation again
    # once every site's scorecard is saved as well
    finished = {
        spec.name: None if ckpt is None else _load_source(ckpt / spec.name)
        for spec in sources
    }
    card_path = {
        s: None if ckpt is None else ckpt / "scorecards" / f"{s}.nc"
        for s in train_sites
    }
    cards_saved = all(p is not None and p.exists() for p in card_path.values())

    # 1. every source at every site, before any training
    derived = {}
    to_derive = [
        spec
        for spec in sources
        if not (finished[spec.name] is not None and cards_saved)
    ]
    n_derive = len(to_derive) * len(train_sites)
    begin(progress, "derive", n_derive)
    for j, spec in enumerate(sources):
        if finished[spec.name] is not None and cards_saved:
            continue
        derived[spec.name] = {}
        for i, s in enumerate(train_sites):
            derived[spec.name][s] = derive(
                jax.random.fold_in(jax.random.fold_in(k_derive, j), i),
                uc,
                split[s][0],
                spec,
                pk_model=model,
            )
            step(
                progress,
                "derive",
                sum(map(len, derived.values())),
                n_derive,
                f"{spec.name} at {s}",
            )
        if any(d.data is None for d in derived[spec.name].values()):
            raise ValueError(
                f"source {spec.name!r}: {spec.method} gives one profile row per "
                f"patient only; the {use_case} model needs the full records "
                f"(use a longitudinal generator: {uc.generator!r})"
            )
        note(progress, f"derived {spec.name} at {len(train_sites)} sites")
    end(progress, "derive", n_derive, n_derive)

    tables = {
        n: pd.concat(
            [d[s].data.assign(**{PLOT_SITE: s}) for s in train_sites], ignore_index=True
        )
        for n, d in derived.items()
    }
    if "real" not in tables:
        tables = {
            "real": pd.concat(
                [split[s][0].assign(**{PLOT_SITE: s}) for s in train_sites],
                ignore_index=True,
            ),
            **tables,
        }

    # 2. one scorecard per training site, every source side by side
    cards = {}
    n_cards = len(train_sites)
    begin(progress, "score", n_cards * len(names))
    for i, s in enumerate(train_sites):
        path = card_path[s]
        if path is not None and path.exists():
            cards[s] = _load_card(path)
            step(
                progress,
                "score",
                (i + 1) * len(names),
                n_cards * len(names),
                f"{s} (kept)",
            )
            continue
        at_site = [derived[n][s] for n in names]
        if "real" not in names:  # the verbatim reference row
            at_site.insert(
                0, derive(k_derive, uc, split[s][0], SourceSpec("real", "real"))
            )
        cards[s] = score_sources(
            jax.random.fold_in(k_score, i),
            uc,
            split[s][0],
            split[s][1],
            at_site,
            n_attacks=n_attacks,
            utility=False,
            progress=within(progress, i * len(names), n_cards * len(names), f" at {s}"),
        )
        if path is not None:
            with replaced_file(path) as tmp:
                cards[s].to_netcdf(tmp, engine="h5netcdf")
        note(progress, f"scored privacy and fidelity at {s}")
    end(progress, "score", n_cards * len(names), n_cards * len(names))

    # 3-4. train on each source, evaluate on real data
    out: dict[str, SourceRun] = {}
    begin(progress, "train", len(sources))
    for j, spec in enumerate(sources):
        done = finished[spec.name]
        if done is not None:
            out[spec.name] = done
            note(
                progress,
                f"{spec.name}: finished in an earlier run ({ckpt / spec.name})",
            )
            step(progress, "train", j + 1, len(sources), f"{spec.name} (kept)")
            continue
        frames = [derived[spec.name][s].data for s in train_sites]
        if federation.engine == "pooled":
            frames = [stack_sites(frames, task.id_columns)]
        # Every engine draws from key(seed), the key the Flower apps rebuild from
        # their run config (server_app, the use case's initial weights), so a
        # stochastic strategy gives the same numbers in process and over Flower.
        seed = int(jax.random.randint(jax.random.fold_in(k_fed, j), (), 0, 2**31 - 1))
        k_prob = k_run = jax.random.key(seed)
        label = f"{spec.name} ({federation.engine}, {strategy})"
        if federation.engine == "flower":
            note(progress, f"{label}: Flower SuperLink + {len(frames)} SuperNodes")
            fitted, calibration, res = train_flower(
                task,
                k_prob,
                seed,
                frames,
                strategy,
                model,
                federation,
                (ckpt or Path(tempfile.mkdtemp(prefix="phems_flower_"))) / spec.name,
            )
            rounds, converged = int(res["rounds"]), bool(res["converged"])
            stopped = (
                str(res["result"].get("stopped_by") or "stopping rule")
                if converged
                else "rounds exhausted"
            )
            dp = _dp_statement(res.get("privacy"), calibration)
        else:
            note(
                progress,
                f"{label}: the first round compiles the federated round "
                f"(on CPU this can take minutes; JAX's compilation "
                f"cache keeps it for later runs)",
            )
            prob = task.problem(k_prob, frames, strategy, model)
            run, calibration = train(
                k_run,
                prob.build,
                prob.sites,
                federation,
                label=label,
                progress=progress,
                checkpoint_dir=None if ckpt is None else ckpt / spec.name / "federated",
            )
            fitted = prob.finish(run.result)
            rounds = int(run.rounds)
            ofv = float(np.asarray(run.result.get("ofv", 0.0)))
            # a fit whose objective was never finite has not converged, whatever
            # its stopping rule says (e.g. every trust-region step rejected)
            converged = bool(run.converged and np.isfinite(ofv))
            stopped = (
                str(run.result.get("stopped_by") or "stopping rule")
                if run.converged
                else "rounds exhausted"
            )
            if not np.isfinite(ofv):
                stopped += "; objective not finite at any step (left at its start)"
            dp = _dp_statement(run.privacy, calibration)
        utility = {s: task.evaluate(fitted, split[s][1], model) for s in train_sites}
        utility[holdout_site] = task.evaluate(fitted, sites[holdout_site], model)
        out[spec.name] = SourceRun(
            fitted.estimates, utility, rounds, converged, dp, stopped, dict(fitted.se)
        )
        if ckpt is not None:
            _save_source(out[spec.name], ckpt / spec.name)
        head = task.metrics[0]
        note(
            progress,
            f"{spec.name}: {rounds} rounds ({stopped}); "
            f"{task.labels[head]} at {holdout_site} "
            f"{utility[holdout_site][head]:.3g}",
        )
        step(
            progress,
            "train",
            j + 1,
            len(sources),
            spec.name,
            rounds=rounds,
            converged=converged,
        )
    end(progress, "train", len(sources), len(sources))
    return PipelineRun(out, cards, train_sites, holdout_site, tables)
