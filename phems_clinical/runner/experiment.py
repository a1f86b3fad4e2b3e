"""``phems run --config-name side_by_side``: one experiment run (issue 7, in
progress; haemophilia only so far).

Each site's OMOP database (simulated into the run directory when ``data.omop`` is
null) -> NONMEM-style events per site -> :func:`.pipeline.run_haemophilia` ->
``results.nc``, ``forecast.png``, per-site scorecards and ``result.json`` in the
Hydra run directory (which also holds the composed config in ``.hydra/``).

Interrupted? Run the same command with ``hydra.run.dir=<that run's directory>``:
finished sources are taken from ``checkpoints/`` and the federated fit that was
under way resumes from its last round (:func:`.pipeline.run_haemophilia`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from phems_clinical.provenance import git_revision, versions


def _simulate_sites(key, model, n_sites: int, n_per_site: int, folder: Path) -> None:
    from phems_clinical.app.omop import model_factor
    from phems_clinical.data.omop import connect, create_cdm, pk_to_omop, write_tables
    from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals

    if n_sites < 2:
        raise ValueError(f"data.n_sites: need at least 2 hospitals, got {n_sites}")
    hospitals = [HospitalSpec(f"hospital_{i + 1}", n_per_site)
                 for i in range(n_sites)]
    events, _ = simulate_hospitals(key, model, hospitals)
    folder.mkdir(parents=True, exist_ok=True)
    for site, rows in events.groupby("SITE", sort=False):
        tables = pk_to_omop(rows.drop(columns="SITE"), product=model.name,
                            site=site, factor=model_factor(model))
        path = folder / f"{site}.duckdb"
        if path.exists():
            path.unlink()
        with connect(path) as store:
            create_cdm(store)
            write_tables(store, tables)


def _forecast_figure(ds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mdape = ds["forecast"].sel(forecast_metric="mdape")
    sources, sites = list(ds.source.values), list(ds.site.values)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(sources)
    for i, s in enumerate(sources):
        ax.bar(np.arange(len(sites)) + i * width, mdape.sel(source=s).values, width,
               label=s)
    held = ds.attrs.get("holdout_site")
    labels = [f"{s}\n(held-out hospital)" if s == held else f"{s}\n(held-out patients)"
              for s in sites]
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_ylabel("forecast MDAPE (%)")
    ax.set_title("dosing forecast on held-out real patients, prior from each source")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_experiment(cfg: DictConfig, out: Path) -> dict:
    """Run the configured experiment into ``out``; returns ``result.json``."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from phems_clinical.app.derive import load_use_case
    from phems_clinical.app.omop import model_factor
    from phems_clinical.evaluation.scorecard_report import write_scorecard
    from phems_clinical.evaluation.sources import SourceSpec
    from phems_clinical.pk.spec import parse_model
    from phems_clinical.runner.pipeline import run_haemophilia, to_dataset

    if cfg.use_case != "haemophilia":
        raise ValueError(f"use_case: {cfg.use_case!r} does not run in the experiment "
                         f"runner yet (only 'haemophilia')")
    if not cfg.sources:
        raise ValueError("sources: at least one data source is needed")
    model = parse_model(OmegaConf.to_container(cfg.model, resolve=True))
    sources = [SourceSpec(name, s.kind, s.method,
                          OmegaConf.to_container(s.options, resolve=True))
               for name, s in cfg.sources.items()]
    key = jax.random.key(cfg.seed)
    k_data, k_run = jax.random.split(key)
    if cfg.data.omop is None:
        omop = out / "omop"
        print(f"[phems run] simulating {cfg.data.n_sites} hospitals x "
              f"{cfg.data.n_per_site} patients into {omop}", flush=True)
        _simulate_sites(k_data, model, cfg.data.n_sites, cfg.data.n_per_site, omop)
    else:
        omop = Path(cfg.data.omop)
        if not omop.exists():
            raise FileNotFoundError(f"data.omop: {omop} does not exist")
    sites, loads = load_use_case("haemophilia", omop=str(omop),
                                 factor=model_factor(model))
    sites = {s: d.drop(columns="SITE") for s, d in sites.items()}
    holdout = cfg.data.holdout_site or list(sites)[-1]
    t0 = time.perf_counter()
    runs = run_haemophilia(
        k_run, sites, model, sources, holdout_site=holdout,
        test_fraction=cfg.data.test_fraction, algorithm=cfg.federation.algorithm,
        options=OmegaConf.to_container(cfg.federation.options, resolve=True) or None,
        n_attacks=cfg.evaluation.n_attacks,
        progress=lambda m: print(f"[phems run] {m}", flush=True),
        checkpoint_dir=out / "checkpoints")
    ds = to_dataset(runs, seed=int(cfg.seed))
    ds.attrs.update({"experiment": cfg.experiment_name, "use_case": cfg.use_case,
                     "model": model.name, "holdout_site": holdout,
                     "git_revision": git_revision() or ""})
    ds.to_netcdf(out / "results.nc", engine="h5netcdf")
    _forecast_figure(ds, out / "forecast.png")  # after attrs: marks the held-out site
    for name, r in runs.items():
        for site, card in r.scorecards.items():
            write_scorecard(card, out / "scorecards" / name / site,
                            title=f"{name} data at {site}")
    result = {
        "experiment": cfg.experiment_name, "seed": int(cfg.seed),
        "model": model.name, "holdout_site": holdout,
        "sites": {s: int(d["ID"].nunique()) for s, d in sites.items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "forecast_mdape": ds["forecast"].sel(forecast_metric="mdape")
        .to_pandas().round(2).to_dict(orient="index"),
        "rounds": {s: r.rounds for s, r in runs.items()},
        "omop_load": loads, "versions": versions(), "git_revision": git_revision(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(ds["forecast"].sel(forecast_metric="mdape").to_pandas().round(1)
          .to_string(), flush=True)
    print(f"[phems run] done in {result['seconds']} s; outputs in {out}", flush=True)
    return result
