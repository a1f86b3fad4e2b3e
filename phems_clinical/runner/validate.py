"""Every setting of ``phems run`` checked before any hospital is simulated or loaded.

:func:`check_config` looks at one composed config (the experiment of
``configs/config.yaml`` or the PK demo of ``configs/pk_demo.yaml``) and raises one
:class:`ConfigError` listing every setting that cannot run, each by its dotted
name with what was expected: option names, types, ranges and choices, and the
combinations (engine and secure aggregation, DP and strategy, sites and held-out
hospital) that the run would otherwise refuse only after simulating hospitals.

:func:`preflight` composes every job a ``phems run`` command line would start (a
``-m`` sweep included, from the command line and the config's
``hydra.sweeper.params``) and checks each one, so a bad value in the fifth job of a
sweep is refused before the first starts. ``phems run`` exits with status 2 on
either (see :mod:`phems_clinical.app.cli`).

Examples
--------
>>> from omegaconf import OmegaConf
>>> cfg = OmegaConf.create({"seed": -1, "method": "saem", "method_options": {},
...                         "cohort": {"n_patients": 0, "design": "rich"},
...                         "model": {}})
>>> try:
...     check_config(cfg, model=False)
... except ConfigError as err:
...     print(err)
3 settings cannot run:
  seed: -1 is outside the plausible range for PRNG seed (an integer) (0 to 9.22337e+18)
  method: 'saem' is not one of focei, nuts, svi
  cohort.n_patients: expected an integer >= 1, got 0
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phems_clinical import usecases

__all__ = ["ConfigError", "check_config", "preflight"]

ACCOUNTANTS = ("rdp", "pld")
ANONYMISERS = ("lattice", "mondrian")
SOURCE_KINDS = ("real", "anonymised", "synthetic")
# options of each federated strategy (phems_clinical.federation.registry.
# build_algorithm and build_fedopt), with the check of each value
_INT1, _POS, _NONNEG = "int>=1", "float>0", "float>=0"
_FEDOPT_OPTS = {
    "rounds": _INT1,
    "learning_rate": _POS,
    "local_steps": _INT1,
    "dp": "dict",
}
STRATEGY_OPTIONS: dict[str, dict[str, str]] = {
    "fed_focei": {"rounds": _INT1},
    "fedavg": dict(_FEDOPT_OPTS),
    "fedprox": {**_FEDOPT_OPTS, "mu": _NONNEG},
    "fedadam": {**_FEDOPT_OPTS, "server_learning_rate": _POS},
    "fedyogi": {**_FEDOPT_OPTS, "server_learning_rate": _POS},
    "ep": {
        "rounds": _INT1,
        "num_warmup": _INT1,
        "num_samples": _INT1,
        "num_chains": _INT1,
        "damping": "share",
    },
    "consensus_mc": {"num_warmup": _INT1, "num_samples": _INT1, "num_chains": _INT1},
}
# options of each source method (phems_clinical.evaluation.sources.derive and
# phems_clinical.privacy.release.anonymise)
SOURCE_OPTIONS: dict[str, dict[str, str]] = {
    "real": {},
    "anonymised": {
        "k": "int>=2",
        "l": "int>=2",
        "t": "share",
        "sensitive": "str",
        "max_suppression": "share0",
        "metric": "str",
        "suppression": "str",
        "max_shift_days": "int>=0",
        # longitudinal perturbation; target: risk name -> bound
        # (names and bounds checked by evaluation.sources.derive)
        "micro_k": "int>=2",
        "noise": _NONNEG,
        "time_grid": _POS,
        "target": "dict",
    },
    "mst": {"epsilon": _POS, "delta": "open01", "n": _INT1},
    "copula": {"n": _INT1},
    "generator": {"n": _INT1},
}


class ConfigError(ValueError):
    """Settings of ``phems run`` that cannot run; the message names each one."""


def _value_problem(rule: str, value: Any) -> str | None:
    """``None`` if ``value`` satisfies ``rule``, else what was expected."""
    if rule == "dict":
        return None if isinstance(value, Mapping) else "expected a mapping"
    if rule == "str":
        return None if isinstance(value, str) else "expected a string"
    if rule.startswith("int>="):
        lo = int(rule[5:])
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            return f"expected an integer >= {lo}, got {value!r}"
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
    ):
        return f"expected a finite number, got {value!r}"
    ok = {
        _POS: value > 0,
        _NONNEG: value >= 0,
        "share": 0 < value <= 1,
        "share0": 0 <= value <= 1,
        "open01": 0 < value < 1,
    }[rule]
    if ok:
        return None
    return {
        _POS: "expected a number > 0",
        _NONNEG: "expected a number >= 0",
        "share": "expected a number in (0, 1]",
        "share0": "expected a number in [0, 1]",
        "open01": "expected a number in (0, 1)",
    }[rule] + f", got {value!r}"


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, name: str, message: str) -> None:
        self.items.append(f"{name}: {message}")

    def value(self, name: str, rule: str, value: Any) -> bool:
        msg = _value_problem(rule, value)
        if msg:
            self.add(name, msg)
        return msg is None

    def choice(self, name: str, value: Any, choices: Sequence[str]) -> bool:
        if value not in choices:
            self.add(name, f"{value!r} is not one of {', '.join(choices)}")
            return False
        return True

    def options(
        self, name: str, opts: Mapping[str, Any], rules: Mapping[str, str]
    ) -> None:
        unknown = sorted(set(opts) - set(rules))
        if unknown:
            self.add(
                name,
                f"unknown option(s) {', '.join(unknown)}; expected "
                f"{', '.join(sorted(rules)) or 'none'}",
            )
        for k, v in opts.items():
            if k in rules and v is not None:
                self.value(f"{name}.{k}", rules[k], v)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ConfigError(self.items[0])
        if self.items:
            raise ConfigError(
                f"{len(self.items)} settings cannot run:\n  " + "\n  ".join(self.items)
            )


def _seed(p: _Problems, seed: Any) -> None:
    from phems_clinical.data.plausibility import check

    if isinstance(seed, bool) or not isinstance(seed, int):
        p.add("seed", f"expected an integer, got {seed!r}")
        return
    finding = check("seed", seed)
    if finding is not None:
        p.add("seed", finding.message)


def _container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_config(cfg: DictConfig, *, model: bool = True) -> None:
    """Refuse ``cfg`` (a composed ``phems run`` config) if any setting cannot run.

    ``model``: also parse the model section (off only for doctests). Raises
    :class:`ConfigError` naming every bad setting; touches no data.
    """
    p = _Problems()
    if "sources" in cfg:
        _check_experiment(p, cfg, model)
    else:
        _check_demo(p, cfg, model)
    p.raise_if_any()


# ------------------------------------------------------------------ PK demo
def _check_demo(p: _Problems, cfg: DictConfig, model: bool) -> None:
    from phems_clinical.pk.simulate import DESIGNS

    _seed(p, cfg.seed)
    if p.choice("method", cfg.method, ("focei", "nuts", "svi")):
        fn = _fit_function(cfg.method)
        known = [
            n
            for n, q in inspect.signature(fn).parameters.items()
            if q.kind == q.KEYWORD_ONLY
        ] + ["dv_unit"]
        opts = _container(cfg.method_options) or {}
        unknown = sorted(set(opts) - set(known))
        if unknown:
            p.add(
                "method_options",
                f"unknown option(s) {', '.join(unknown)} for "
                f"{cfg.method}; expected {', '.join(known)}",
            )
        for k in (
            "num_warmup",
            "num_samples",
            "num_chains",
            "num_steps",
            "num_posterior_samples",
            "maxiter",
        ):
            if k in opts:
                p.value(f"method_options.{k}", _INT1, opts[k])
        for k in ("learning_rate", "gtol"):
            if k in opts:
                p.value(f"method_options.{k}", _POS, opts[k])
        if "target_accept" in opts:
            p.value("method_options.target_accept", "open01", opts["target_accept"])
        if "priors" in opts:
            p.choice("method_options.priors", opts["priors"], ("library",))
    design_ok = p.choice("cohort.design", cfg.cohort.design, ("hospitals", *DESIGNS))
    least = 3 if design_ok and cfg.cohort.design == "hospitals" else 1
    p.value("cohort.n_patients", f"int>={least}", cfg.cohort.n_patients)
    if model:
        from phems_clinical.pk.spec import parse_model

        try:
            parse_model(_container(cfg.model))
        except (ValueError, KeyError, TypeError) as err:
            p.add("model", _text(err))


def _fit_function(method: str):
    if method == "focei":
        from phems_clinical.pk.focei import fit_focei

        return fit_focei
    from phems_clinical.pk import bayes

    return bayes.fit_nuts if method == "nuts" else bayes.fit_svi


def _text(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


# --------------------------------------------------------------- experiment
def simulated_site_names(use_case: str, n_sites: int) -> list[str]:
    """The names :func:`phems_clinical.runner.experiment.simulate_sites` gives."""
    return usecases.get(use_case).site_names(n_sites)


def _site_names(
    p: _Problems, cfg: DictConfig, use_case: str | None
) -> tuple[list[str] | None, int | None]:
    """The sites the run would load (None if unknown) and the patients per site
    when simulated."""
    d = cfg.data
    ok_frac = p.value("data.test_fraction", "open01", d.test_fraction)
    if d.omop is not None:
        folder = Path(os.path.expanduser(str(d.omop)))
        if not folder.exists():
            p.add(
                "data.omop",
                f"{folder} does not exist (expected a folder of "
                f"<site>.duckdb OMOP databases)",
            )
            return None, None
        if not folder.is_dir():
            p.add(
                "data.omop",
                f"{folder} is not a folder (expected a folder of "
                f"<site>.duckdb OMOP databases)",
            )
            return None, None
        names = sorted(f.stem for f in folder.glob("*.duckdb"))
        if len(names) < 2:
            p.add(
                "data.omop",
                f"{folder} holds {len(names)} <site>.duckdb "
                f"database(s); need at least 2 (one is held out)",
            )
            return None, None
        return names, None
    ok_n = p.value("data.n_sites", "int>=2", d.n_sites)
    ok_per = p.value("data.n_per_site", "int>=10", d.n_per_site)
    if ok_per and ok_frac:
        n_hold = int(round(d.test_fraction * d.n_per_site))
        if n_hold < 5 or d.n_per_site - n_hold < 10:
            p.add(
                "data.test_fraction",
                f"{d.test_fraction:g} of {d.n_per_site} "
                f"patients per hospital (data.n_per_site) keeps {n_hold} out and "
                f"{d.n_per_site - n_hold} for training; need >= 5 and >= 10",
            )
            ok_per = False
    names = (
        simulated_site_names(use_case, int(d.n_sites)) if ok_n and use_case else None
    )
    n_train = None
    if ok_per and ok_frac:
        n_train = int(d.n_per_site) - int(round(d.test_fraction * d.n_per_site))
    return names, n_train


def _check_sources(
    p: _Problems, cfg: DictConfig, use_case: str | None, n_train: int | None
) -> None:
    if not cfg.sources:
        p.add("sources", "at least one data source is needed")
        return
    for name, s in cfg.sources.items():
        where = f"sources.{name}"
        if not p.choice(f"{where}.kind", s.kind, SOURCE_KINDS):
            continue
        opts = _container(s.options) or {}
        if s.kind == "real":
            p.choice(f"{where}.method", s.method, ("none", "default"))
            rules = SOURCE_OPTIONS["real"]
        elif s.kind == "anonymised":
            if not p.choice(
                f"{where}.method", s.method, ("default", "none", *ANONYMISERS)
            ):
                continue
            rules = SOURCE_OPTIONS["anonymised"]
            k = opts.get("k", 5)
            if (
                n_train is not None
                and _value_problem("int>=2", k) is None
                and k > n_train
            ):
                p.add(
                    f"{where}.options.k",
                    f"k={k} exceeds the {n_train} training "
                    f"patients per hospital (data.n_per_site x (1 - "
                    f"data.test_fraction))",
                )
        else:
            own = (
                usecases.get(use_case).generator if use_case in usecases.names() else ""
            )
            methods = ("default", "none", "copula", "mst", *([own] if own else []))
            if not p.choice(f"{where}.method", s.method, methods):
                continue
            rules = SOURCE_OPTIONS.get(s.method, SOURCE_OPTIONS["generator"])
        p.options(f"{where}.options", opts, rules)


def _check_federation(
    p: _Problems, cfg: DictConfig, task, sites: list[str] | None, holdout: str | None
) -> None:
    from phems_clinical.runner.training import ENGINES, FEDOPT

    f, d = cfg.federation, cfg.federation.dp
    strategy = cfg.inference.strategy or (task.strategy if task else None)
    engine_ok = p.choice("federation.engine", f.engine, ENGINES)
    strategy_ok = task is not None and p.choice(
        "inference.strategy", strategy, task.strategies
    )
    if engine_ok and f.secagg and f.engine == "pooled":
        p.add(
            "federation.secagg",
            "the pooled reference has no sites to aggregate;"
            " use engine inprocess or flower",
        )
    opts = _container(cfg.inference.options) or {}
    if strategy_ok:
        p.options("inference.options", opts, STRATEGY_OPTIONS.get(strategy, {}))
    if d.epsilon is not None:
        if strategy_ok and strategy not in FEDOPT:
            p.add(
                "federation.dp",
                f"patient-level DP-SGD needs a gradient strategy "
                f"({', '.join(FEDOPT)}); inference.strategy is "
                f"{strategy!r}",
            )
        if "dp" in opts:
            p.add(
                "federation.dp.epsilon",
                "inference.options.dp is set as well; give one of them",
            )
        p.value("federation.dp.epsilon", _POS, d.epsilon)
        if d.delta is not None:
            p.value("federation.dp.delta", "open01", d.delta)
        p.value("federation.dp.clip", _POS, d.clip)
        p.choice("federation.dp.accountant", d.accountant, ACCOUNTANTS)
        p.value("federation.dp.sampling_rate", "share", d.sampling_rate)
    train = None
    if sites is not None and holdout is not None:
        wanted = list(f.sites) if f.sites else sites
        unknown = [s for s in wanted if s not in sites]
        if unknown:
            p.add(
                "federation.sites",
                f"{', '.join(map(str, unknown))} not among the "
                f"sites {', '.join(sites)}",
            )
        train = [s for s in wanted if s in sites and s != holdout]
        if not unknown and not train:
            p.add(
                "federation.sites",
                f"need at least one training site besides the held-out one ({holdout})",
            )
    if f.min_sites is not None and p.value("federation.min_sites", _INT1, f.min_sites):
        if train and f.min_sites > len(train):
            p.add(
                "federation.min_sites",
                f"{f.min_sites} exceeds the {len(train)} training sites",
            )


def _check_experiment(p: _Problems, cfg: DictConfig, model: bool) -> None:
    _seed(p, cfg.seed)
    task = None
    try:
        task = usecases.get(cfg.use_case).task
    except ValueError as err:
        p.add("use_case", _text(err).removeprefix("use_case: "))
    if model and task is not None:
        try:
            parsed = task.model_from_config(_container(cfg.model))
            if cfg.federation.engine == "flower":
                from phems_clinical.runner.training import check_flower_model

                check_flower_model(task.use_case, parsed)
        except (ValueError, KeyError, TypeError) as err:
            p.add("model", _text(err).removeprefix("model: "))
    sites, n_train = _site_names(p, cfg, task.use_case if task else None)
    holdout = None
    if sites is not None:
        holdout = cfg.data.holdout_site or sites[-1]
        if holdout not in sites:
            p.add(
                "data.holdout_site",
                f"{holdout!r} is not one of the sites {', '.join(sites)}",
            )
            holdout = None
    _check_sources(p, cfg, task.use_case if task else None, n_train)
    _check_federation(p, cfg, task, sites, holdout)
    p.value("evaluation.n_attacks", _INT1, cfg.evaluation.n_attacks)


# ---------------------------------------------------------------- pre-flight
_DELEGATE = (
    "help",
    "hydra_help",
    "version",
    "cfg",
    "shell_completion",
    "info",
    "experimental_rerun",
)


def preflight(argv: Iterable[str]) -> int | None:
    """Compose and check every job of ``phems run ARGV``; returns the number of
    jobs checked, or ``None`` when the command only asks Hydra for help or a
    config listing (nothing runs). Raises :class:`ConfigError` (a bad setting) or
    Hydra's and OmegaConf's own exceptions (a bad override or config name)."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from phems_clinical.resources import configs_dir

    args = get_args_parser().parse_args(list(argv))
    if any(getattr(args, k, None) for k in _DELEGATE) or args.config_dir:
        return None
    config_dir = (
        os.path.abspath(args.config_path) if args.config_path else str(configs_dir())
    )
    name = args.config_name or "config"
    overrides = list(args.overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(
        config_dir=config_dir, version_base="1.3", job_name="phems_run"
    ):
        hydra = GlobalHydra.instance().hydra
        mode = (
            RunMode.MULTIRUN
            if args.multirun
            else hydra.get_mode(config_name=name, overrides=overrides)
        )
        if mode == RunMode.MULTIRUN:
            multi = hydra.compose_config(
                name, overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False
            )
            if (
                multi.hydra.sweeper._target_
                != "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
            ):
                return None  # another sweeper: each job is checked when it starts
            params = [f"{k}={v}" for k, v in (multi.hydra.sweeper.params or {}).items()]
            parsed = OverridesParser.create().parse_overrides(
                params + list(multi.hydra.overrides.task)
            )
            jobs = [
                j for batch in BasicSweeper.split_arguments(parsed, None) for j in batch
            ]
        else:
            jobs = [overrides]
        for job in jobs:
            cfg = hydra.compose_config(
                name, job, run_mode=RunMode.RUN, with_log_configuration=False
            )
            try:
                check_config(cfg)
            except ConfigError as err:
                if len(jobs) > 1:
                    raise ConfigError(f"job {' '.join(job)}: {err}") from None
                raise
    return len(jobs)
