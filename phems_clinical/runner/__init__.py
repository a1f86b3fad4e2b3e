"""``phems run``: the Hydra entry point of the main job.

The main job (``configs/config.yaml``) is an experiment: real, anonymised and
synthetic data side by side (:mod:`phems_clinical.runner.experiment`); the
committed studies are ``experiment=<name>`` (``configs/experiment/``).

``phems run --config-name pk_demo`` is the PK demo: simulate a cohort of patients
at several hospitals from a library model, write it as a NONMEM-style CSV, fit
the population model back with the configured method (``phems fit``'s code path)
and compare every estimate with the value it was simulated from. It writes into
the Hydra run directory: ``.hydra/`` (composed config), ``model.yaml`` (the
generating model), ``cohort.csv``, ``truth.csv``, ``fit/`` (``phems fit``'s
outputs: ``estimates.json``, ``estimates.nc``, ``gof.png``, ``vpc.png`` and the
fitted ``model.yaml``), ``recovery.csv`` and ``result.json`` (see the README).

The package's names, by purpose: the Hydra entry point (``main``, ``RunConfig``,
``LOG``, ``run_logging``) and the PK demo (``run_demo``); the experiment and its
resumable pipeline (``run_experiment``, ``run_pipeline``); training
(``train``, ``train_flower``, ``FederationSettings``, ``DPTarget``); config checks
(``check_config``, ``preflight``, ``ConfigError``); results (``to_dataset``,
``combined_scorecard``). Stage names are imported from their submodules on first
use (:func:`phems_clinical.lazy_exports`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from phems_clinical import lazy_exports
from phems_clinical.progress import ProgressFn
from phems_clinical.provenance import git_revision, versions
from phems_clinical.resources import configs_dir


@dataclass
class CohortConfig:
    n_patients: int = 90
    design: str = "hospitals"  # hospitals | rich | sparse | sparse2


@dataclass
class RunConfig:
    """Schema of the main job's configuration (unknown keys fail at compose time)."""

    experiment_name: str = "pk_demo"
    seed: int = MISSING
    method: str = "focei"
    method_options: dict[str, Any] = field(default_factory=dict)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    model: Any = MISSING
    progress: bool = True  # bars on stderr when it is a terminal


ConfigStore.instance().store(name="schema", node=RunConfig)

#: The runner's logger; Hydra's job logging sends it to the terminal and
#: ``runner.log`` (``configs/hydra/job_logging/phems.yaml``).
LOG = logging.getLogger("phems_clinical.runner")


@contextmanager
def run_logging(progress: bool = True) -> Iterator[ProgressFn]:
    """The listener a run reports its progress to, set up for its duration.

    Python warnings go to logging (``py.warnings``: the terminal and the run
    log); every progress event goes to :data:`LOG`
    (:func:`phems_clinical.progress.log_events`); with ``progress`` true and
    stderr a terminal, tqdm bars are drawn on stderr, and the steps they show
    are logged at DEBUG (the run log keeps them; the terminal shows the bars),
    while log lines are written above the bars instead of through them
    (``tqdm.contrib.logging.logging_redirect_tqdm``).
    """
    from phems_clinical.progress import bars, bars_wanted, fan_out, log_events

    drawn = bars_wanted(progress)
    listener, close = bars(enabled=drawn)
    logged = log_events(LOG, step_level=logging.DEBUG if drawn else logging.INFO)
    logging.captureWarnings(True)
    try:
        if drawn:
            from tqdm.contrib.logging import logging_redirect_tqdm

            before = set(logging.root.handlers)
            levels = [
                h.level
                for h in logging.root.handlers
                if type(h) is logging.StreamHandler
            ]
            with logging_redirect_tqdm(loggers=[logging.root]):
                # the handler that writes above the bars takes the console's
                # level (tqdm copies its stream and format, not its level), so
                # the steps the bars show stay out of the terminal
                for h in set(logging.root.handlers) - before:
                    h.setLevel(max(levels, default=logging.NOTSET))
                yield fan_out(logged, listener)
        else:
            yield logged
    finally:
        close()
        logging.captureWarnings(False)


def _log_config(cfg: DictConfig, out: Path) -> None:
    """The run's settings in a few lines (the whole composed config is in
    ``.hydra/config.yaml``)."""
    LOG.info("run directory %s (composed config: .hydra/config.yaml)", out)
    LOG.info(
        "experiment %s, seed %s, git %s",
        cfg.get("experiment_name"),
        cfg.get("seed"),
        git_revision() or "unknown",
    )
    if "sources" in cfg:
        fed, inf, data = cfg.federation, cfg.inference, cfg.data
        LOG.info(
            "use case %s; data %s; sources %s; strategy %s, engine %s, "
            "secure aggregation %s, DP %s",
            cfg.use_case,
            data.omop or f"{data.n_sites} simulated sites x {data.n_per_site}",
            ", ".join(f"{n} ({s.kind}, {s.method})" for n, s in cfg.sources.items()),
            inf.strategy or "default",
            fed.engine,
            "on" if fed.secagg else "off",
            "off" if fed.dp.epsilon is None else f"epsilon {fed.dp.epsilon}",
        )
    else:
        LOG.info(
            "PK demo: %s patients, design %s, method %s",
            cfg.cohort.n_patients,
            cfg.cohort.design,
            cfg.method,
        )


# the experiment runner's schema (config.yaml) registers itself on import
from phems_clinical.runner import config as _experiment_config  # noqa: E402,F401


def run_demo(cfg: DictConfig, out: Path) -> dict:
    """Simulate -> fit -> compare; returns the ``result.json`` content."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import pandas as pd

    from phems_clinical.app.fit import run_fit
    from phems_clinical.pk.simulate import (
        DESIGNS,
        HospitalSpec,
        default_hospitals,
        simulate_hospitals,
    )
    from phems_clinical.pk.spec import parse_model

    if cfg.method not in ("focei", "nuts", "svi"):
        raise ValueError(f"method: {cfg.method!r} is not one of focei, nuts, svi")
    if cfg.cohort.design not in ("hospitals", *DESIGNS):
        raise ValueError(
            f"cohort.design: {cfg.cohort.design!r} is not one of "
            f"hospitals, {', '.join(DESIGNS)}"
        )
    from phems_clinical.outputs import OutputExistsError

    if (out / "fit").exists():
        raise OutputExistsError(
            f"hydra.run.dir: {out} already holds a PK demo fit; "
            f"choose a new run directory"
        )
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    model = parse_model(spec)
    model_path = out / "model.yaml"
    model_path.write_text(OmegaConf.to_yaml(cfg.model))
    hospitals = (
        default_hospitals(cfg.cohort.n_patients)
        if cfg.cohort.design == "hospitals"
        else [HospitalSpec("H1", cfg.cohort.n_patients, design=cfg.cohort.design)]
    )
    k_sim, _ = jax.random.split(jax.random.key(cfg.seed))
    LOG.info(
        "simulating %d patients at %d hospital(s) from %s",
        cfg.cohort.n_patients,
        len(hospitals),
        model.name,
    )
    events, truth = simulate_hospitals(k_sim, model, hospitals)
    events.to_csv(out / "cohort.csv", index=False)
    truth.to_csv(out / "truth.csv", index=False)
    LOG.info("fitting by %s", cfg.method.upper())
    t0 = time.perf_counter()
    est = run_fit(
        out / "cohort.csv",
        str(model_path),
        cfg.method,
        out / "fit",
        seed=cfg.seed,
        options=OmegaConf.to_container(cfg.method_options),
    )
    seconds = time.perf_counter() - t0

    rows = []
    for t in model.thetas:
        if t.fixed:
            continue
        e = est["theta"][t.name]
        rows.append(
            {
                "parameter": f"THETA({t.name})",
                "true": t.value,
                "estimate": e["estimate"],
            }
        )
    om = np.asarray(model.omega)
    for k, p in enumerate(model.iiv_parameters):
        e = est["omega"].get(f"{p},{p}")
        if e:
            rows.append(
                {
                    "parameter": f"OMEGA({p},{p})",
                    "true": float(om[k, k]),
                    "estimate": e["estimate"],
                }
            )
    rec = pd.DataFrame(rows)
    rec["relative_error"] = rec["estimate"] / rec["true"] - 1.0
    rec.to_csv(out / "recovery.csv", index=False)
    result = {
        "experiment": cfg.experiment_name,
        "seed": cfg.seed,
        "method": cfg.method,
        "model": model.name,
        "n_patients": int(cfg.cohort.n_patients),
        "hospitals": [h.name for h in hospitals],
        "n_observations": est["n_observations"],
        "n_blq": est["n_blq"],
        "fit_seconds": seconds,
        "ofv": est["objective"]["ofv"] if est["objective"] else None,
        "max_abs_relative_error_theta": float(
            rec.loc[rec.parameter.str.startswith("THETA"), "relative_error"].abs().max()
        ),
        "recovery": rec.to_dict(orient="records"),
        "versions": versions(),
        "git_revision": git_revision(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    LOG.info(
        "recovery:\n%s", rec.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    )
    LOG.info("done in %.1f s; outputs in %s", seconds, out)
    return result


@hydra.main(version_base="1.3", config_path=str(configs_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (``phems run``).

    Every setting is checked first (:func:`.validate.check_config`); an error the
    user can fix ends the job with ``phems run: error: <setting>: ...`` and exit
    status 2, an internal error with a short message and status 1
    (``PHEMS_DEBUG=1``: Hydra's full traceback), as every ``phems`` command does
    (:mod:`phems_clinical.app.cli`).

    What happened goes to Python logging (logger ``phems_clinical.runner``),
    which Hydra's job logging (``configs/hydra/job_logging/phems.yaml``) writes
    to the terminal and to ``runner.log`` in the run directory; progress bars
    with ETA go to stderr when it is a terminal and ``progress`` is true
    (:func:`run_logging`).
    """
    from hydra.core.hydra_config import HydraConfig

    from phems_clinical.app.cli import (
        debug,
        internal_error_message,
        user_error_message,
    )
    from phems_clinical.runner.validate import check_config
    from phems_clinical.runtime import configure_jax

    # x64 and JAX's persistent compilation cache, as for every phems command: a
    # second run loads the federated round instead of compiling it for minutes
    configure_jax()
    # jax announces at INFO level each accelerator plugin it does not find
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        check_config(cfg)
        out = Path(HydraConfig.get().runtime.output_dir)
        os.makedirs(out, exist_ok=True)
        with run_logging(bool(cfg.get("progress", True))) as progress:
            _log_config(cfg, out)
            t0 = time.perf_counter()
            if "sources" in cfg:  # an experiment (config.yaml); else the PK demo
                from phems_clinical.runner.experiment import run_experiment

                run_experiment(cfg, out, progress=progress)
            else:
                run_demo(cfg, out)
            LOG.info(
                "run finished in %.1f s; run log %s",
                time.perf_counter() - t0,
                out / f"{HydraConfig.get().job.name}.log",
            )
    except Exception as err:  # noqa: BLE001 - sorted into the error contract
        LOG.debug("run stopped by %s", type(err).__name__, exc_info=True)
        message = user_error_message(err)
        if debug():
            os.environ["HYDRA_FULL_ERROR"] = "1"
            raise
        if message is not None:
            print(f"phems run: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if isinstance(err, RuntimeError) and type(err) is RuntimeError:
            print(f"phems run: stopped: {err}", file=sys.stderr, flush=True)
        else:
            print(
                f"phems run: {internal_error_message(err)}", file=sys.stderr, flush=True
            )
        raise SystemExit(1) from None


#: the runner's stages, imported from their submodules on first use
_EXPORTS = {
    ".experiment": ("run_experiment",),
    ".pipeline": ("run_pipeline",),
    ".report": ("combined_scorecard",),
    ".results": ("to_dataset",),
    ".training": ("DPTarget", "FederationSettings", "train", "train_flower"),
    ".validate": ("ConfigError", "check_config", "preflight"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "LOG",
    "CohortConfig",
    "ConfigError",
    "DPTarget",
    "FederationSettings",
    "RunConfig",
    "check_config",
    "combined_scorecard",
    "main",
    "preflight",
    "run_demo",
    "run_experiment",
    "run_logging",
    "run_pipeline",
    "to_dataset",
    "train",
    "train_flower",
]


if __name__ == "__main__":
    main()
