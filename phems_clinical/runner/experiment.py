"""``phems run``: one experiment run, from the composed config to the outputs.

Each site's OMOP database (simulated into ``<run dir>/omop`` when ``data.omop`` is
null) -> each site's analysis table -> :func:`.pipeline.run_pipeline` ->
``results.nc`` (:mod:`.results`), ``utility.png``, ``report.html``
(:mod:`.report`), ``scorecards/<site>/`` and ``result.json`` in the Hydra run
directory (which also holds the composed config in ``.hydra/``).

Everything that can be checked without training is checked first (use case,
model, strategy, engine, DP settings, OMOP path, sources), so bad input fails in
seconds with a message naming the setting.

Interrupted? Run the same command with ``hydra.run.dir=<that run's directory>``:
finished steps are taken from ``checkpoints/`` and the federated fit that was under
way resumes from its last round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phems_clinical import usecases
from phems_clinical.progress import ProgressFn
from phems_clinical.provenance import git_revision, versions

#: The runner's logger (``phems_clinical.runner``): the terminal and runner.log.
LOG = logging.getLogger("phems_clinical.runner")


def simulate_sites(
    use_case: str, key, n_sites: int, n_per_site: int, model: Any, folder: Path
) -> None:
    """``n_sites`` simulated hospitals of ``n_per_site`` patients (PK), stays
    (PICU) or surgical episodes (cardiac) as ``folder/<site>.duckdb``, by the use
    case's ``simulate`` (names: its ``site_names``)."""
    from phems_clinical.usecases.omop_sites import write_site

    uc = usecases.get(use_case)
    if n_sites < 2:
        raise ValueError(
            f"data.n_sites: need at least 2 hospitals (one is held out), got {n_sites}"
        )
    if n_per_site < 10:
        raise ValueError(
            f"data.n_per_site: need at least 10 per hospital, got {n_per_site}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for site, t in uc.simulate(key, n_sites, n_per_site, model).items():
        write_site(folder / f"{site}.duckdb", t)


def _settings(cfg: DictConfig):
    from phems_clinical.runner.training import DPTarget, FederationSettings

    f, d = cfg.federation, cfg.federation.dp
    dp = (
        None
        if d.epsilon is None
        else DPTarget(
            float(d.epsilon),
            None if d.delta is None else float(d.delta),
            float(d.clip),
            str(d.accountant),
            float(d.sampling_rate),
        )
    )
    return FederationSettings(
        engine=f.engine,
        strategy=cfg.inference.strategy,
        options=OmegaConf.to_container(cfg.inference.options, resolve=True) or {},
        secagg=bool(f.secagg),
        min_sites=f.min_sites,
        dp=dp,
    )


def _setup_lines(
    cfg: DictConfig,
    task,
    model_name: str,
    fed,
    sites: dict,
    holdout: str,
    train_sites: list[str],
) -> list[str]:
    unit = f"{usecases.get(task.use_case).unit}s"
    strategy = fed.strategy or task.strategy
    dp = (
        "off"
        if fed.dp is None
        else f"patient-level DP-SGD at each site, target ε = {fed.dp.epsilon:g}"
    )
    return [
        f"Use case {task.use_case}; model {model_name}; seed {cfg.seed}.",
        f"{len(train_sites)} training hospitals ("
        + ", ".join(f"{s}: {sites[s]} {unit}" for s in train_sites)
        + f"); each keeps {cfg.data.test_fraction:.0%} of its patients out of "
        f"training to score the models.",
        f"Held-out hospital {holdout} ({sites[holdout]} {unit}) takes "
        f"no part in training.",
        "Sources: "
        + "; ".join(
            f"{n} ({s.kind}"
            + (f", {s.method}" if s.method not in ("default", "none") else "")
            + (f", {dict(s.options)}" if s.options else "")
            + ")"
            for n, s in cfg.sources.items()
        )
        + ". Each hospital derives them from "
        "its own training patients.",
        f"Training: strategy {strategy}, engine {fed.engine}, secure aggregation "
        f"{'on' if fed.secagg else 'off'}, DP {dp}.",
    ]


def run_experiment(
    cfg: DictConfig, out: Path, *, progress: ProgressFn | None = None
) -> dict:
    """Run the configured experiment into ``out``; returns ``result.json``.

    What happened (data loaded and excluded, each stage, the files written) goes
    to the logger ``phems_clinical.runner``; ``progress``: listener of the
    pipeline's events (:mod:`phems_clinical.progress`; default silent).
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    from phems_clinical.evaluation.scorecard_report import write_scorecard
    from phems_clinical.evaluation.sources import SourceSpec
    from phems_clinical.pk.spec import parameter_units
    from phems_clinical.runner.pipeline import run_pipeline
    from phems_clinical.runner.report import utility_figure, write_report
    from phems_clinical.runner.results import to_dataset
    from phems_clinical.runner.training import check_flower_model, check_settings

    # everything checkable before data are touched
    uc = usecases.get(cfg.use_case)
    task = uc.task
    model = task.model_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    model_name = task.model_label(model)
    fed = _settings(cfg)
    check_settings(fed, fed.strategy or task.strategy, task.strategies, task.use_case)
    if fed.engine == "flower":
        check_flower_model(task.use_case, model)
    if not cfg.sources:
        raise ValueError("sources: at least one data source is needed")
    sources = [
        SourceSpec(
            name, s.kind, s.method, OmegaConf.to_container(s.options, resolve=True)
        )
        for name, s in cfg.sources.items()
    ]
    key = jax.random.key(cfg.seed)
    k_data, k_run = jax.random.split(key)
    if cfg.data.omop is None:
        omop = out / "omop"
        if not any(omop.glob("*.duckdb")):  # a resumed run keeps its sites
            LOG.info(
                "simulating %s hospitals x %s into %s",
                cfg.data.n_sites,
                cfg.data.n_per_site,
                omop,
            )
            simulate_sites(
                task.use_case,
                k_data,
                int(cfg.data.n_sites),
                int(cfg.data.n_per_site),
                model,
                omop,
            )
    else:
        omop = Path(cfg.data.omop)
        if not omop.exists():
            raise FileNotFoundError(
                f"data.omop: {omop} does not exist (expected a "
                f"folder of <site>.duckdb OMOP databases)"
            )
    sites, loads = uc.load(str(omop), model)
    sites = {s: d.drop(columns="SITE", errors="ignore") for s, d in sites.items()}
    _log_loads(loads, omop)
    holdout = cfg.data.holdout_site or list(sites)[-1]
    t0 = time.perf_counter()
    run = run_pipeline(
        k_run,
        task,
        sites,
        model,
        sources,
        holdout_site=holdout,
        federation=fed,
        train_sites=list(cfg.federation.sites) if cfg.federation.sites else None,
        test_fraction=cfg.data.test_fraction,
        n_attacks=cfg.evaluation.n_attacks,
        progress=progress,
        checkpoint_dir=out / "checkpoints",
    )
    ds = to_dataset(
        run,
        task,
        sources,
        seed=int(cfg.seed),
        parameter_units=parameter_units(
            model, [p for r in run.sources.values() for p in r.estimates]
        ),
    )
    ds.attrs.update(
        {
            "experiment": cfg.experiment_name,
            "use_case": task.use_case,
            "model": model_name,
            "holdout_site": holdout,
            "engine": fed.engine,
            "strategy": fed.strategy or task.strategy,
            "git_revision": git_revision() or "",
        }
    )
    ds.to_netcdf(out / "results.nc", engine="h5netcdf")
    (out / "utility.png").write_bytes(utility_figure(ds, task))
    n = {s: int(d[task.id_columns[0]].nunique()) for s, d in sites.items()}
    setup = _setup_lines(cfg, task, model_name, fed, n, holdout, run.train_sites)
    write_report(
        ds,
        run.scorecards,
        task,
        setup,
        out / "report.html",
        title=f"{cfg.experiment_name}: real, anonymised and synthetic data "
        f"side by side",
        tables=run.tables,
    )
    for site, card in run.scorecards.items():
        write_scorecard(
            card, out / "scorecards" / site, title=f"Data sources at {site}"
        )
    head = task.metrics[0]
    table = ds["utility"].isel(seed=0).sel(utility_metric=head).to_pandas()
    result = {
        "experiment": cfg.experiment_name,
        "seed": int(cfg.seed),
        "use_case": task.use_case,
        "model": model_name,
        "strategy": fed.strategy or task.strategy,
        "engine": fed.engine,
        "secagg": fed.secagg,
        "holdout_site": holdout,
        "training_sites": run.train_sites,
        "sites": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "headline_metric": head,
        "headline_label": task.labels[head],
        "headline": table.round(4).to_dict(orient="index"),
        "rounds": {s: r.rounds for s, r in run.sources.items()},
        "converged": {s: r.converged for s, r in run.sources.items()},
        "stopped_by": {s: r.stopped_by for s, r in run.sources.items()},
        "training_privacy": {s: r.privacy or "not DP" for s, r in run.sources.items()},
        "omop_load": loads,
        "versions": versions(),
        "git_revision": git_revision(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    LOG.info(
        "%s by source and site:\n%s", task.labels[head], table.round(3).to_string()
    )
    written = sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file()
        and p.parts[len(out.parts)] not in ("checkpoints", "omop", ".hydra")
        and p.suffix != ".log"
    )
    LOG.info("wrote %s", ", ".join(written))
    LOG.info("done in %s s; report: %s", result["seconds"], out / "report.html")
    return result


def _log_loads(loads: dict, omop: Path) -> None:
    """Each site's rows read and kept, and the records excluded by table and
    reason (counts only), to the run log."""
    for site, rep in loads.items():
        if not isinstance(rep, dict):
            continue
        rows, kept = rep.get("rows"), rep.get("kept")
        if isinstance(rows, dict) and isinstance(kept, dict):
            LOG.info(
                "%s: %d of %d OMOP rows kept (%s)",
                site,
                sum(kept.values()),
                sum(rows.values()),
                omop,
            )
        for ex in rep.get("excluded") or ():
            if int(ex.get("n", 0)):
                LOG.warning(
                    "%s: excluded %s record(s) of %s: %s",
                    site,
                    ex["n"],
                    ex.get("table", "?"),
                    ex.get("reason", "?"),
                )
