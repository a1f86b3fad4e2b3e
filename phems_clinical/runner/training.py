"""Federated training as an experiment configures it.

One function, :func:`train`, runs any algorithm over the training hospitals'
(derived) data on the configured engine:

* ``inprocess``: :func:`phems_clinical.federation.engine.run_federated`, with
  optional secure aggregation (:func:`~phems_clinical.federation.secure.
  secagg_aggregator`), fewest sites per round and a checkpoint every round;
* ``pooled``: the same algorithm on every training patient stacked at one site.
  No hospital could run this; it is the centralised reference of the
  federated-vs-pooled study;
* ``flower``: :func:`train_flower`, the same algorithm over real Flower
  processes on this machine (one SuperLink, one SuperNode per site), for every
  use case (:mod:`phems_clinical.federation.flower.tasks`): each site reads only
  its own table; the sums a use case needs across sites (PICU standardisation,
  cardiac scaling, the PICU alarm threshold) travel as summed rounds; with
  ``secagg`` every sum, training and summaries alike, runs secure aggregation
  over Flower messages (:mod:`phems_clinical.federation.flower.
  secagg_transport`); with DP each site draws its noise from its own OS CSPRNG.
  An interrupted Flower run resumes from its checkpoint and the sites' job
  state.

Patient-level differential privacy is set by its target: :func:`with_dp` picks
the smallest noise multiplier z whose ε after all the run's noisy steps is at most
``DPTarget.epsilon`` at δ (``dp_accounting`` calibration, RDP by default), for the
algorithm's planned rounds x local steps (:mod:`phems_clinical.federation.dp`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from phems_clinical import usecases
from phems_clinical.federation.core import Algorithm, site_size
from phems_clinical.federation.dp import calibrate_noise_multiplier
from phems_clinical.federation.engine import FederatedRun, run_federated
from phems_clinical.federation.registry import FEDOPT
from phems_clinical.federation.secure import (
    default_secagg_config,
    secagg_aggregator,
)
from phems_clinical.progress import ProgressFn, labelled, silent

ENGINES = ("inprocess", "pooled", "flower")


class DPTarget(NamedTuple):
    """Patient-level DP-SGD at every site, stated by its guarantee.

    epsilon : target ε per site for the whole run; delta : δ (None: 1/(10 N) of the
    largest site, so δ < 1/N everywhere); clip : L2 bound of one patient's gradient
    row; accountant : ``rdp`` or ``pld``; sampling_rate : Poisson rate q per step.
    Unit of privacy: one patient (all of that patient's rows at one site).
    """

    epsilon: float
    delta: float | None = None
    clip: float = 1.0
    accountant: str = "rdp"
    sampling_rate: float = 1.0


class FederationSettings(NamedTuple):
    """How training runs: engine, strategy (None: the use case's default) and its
    options, secure aggregation, fewest sites per round, DP."""

    engine: str = "inprocess"
    strategy: str | None = None
    options: Mapping[str, Any] = {}
    secagg: bool = False
    min_sites: int | None = None
    dp: DPTarget | None = None


def check_settings(
    fed: FederationSettings,
    strategy: str,
    strategies: Sequence[str] | None = None,
    use_case: str = "haemophilia",
) -> None:
    """Refuse settings that cannot run, by name, before any data are touched
    (``strategies``: those the use case offers)."""
    if fed.engine not in ENGINES:
        raise ValueError(
            f"federation.engine: {fed.engine!r} is not one of {', '.join(ENGINES)}"
        )
    if strategies is not None and strategy not in strategies:
        raise ValueError(
            f"inference.strategy: {strategy!r} is not one of "
            f"{', '.join(strategies)} ({use_case})"
        )
    if fed.dp is not None:
        if strategy not in FEDOPT:
            raise ValueError(
                f"federation.dp: patient-level DP-SGD needs a gradient strategy "
                f"({', '.join(FEDOPT)}); inference.strategy is {strategy!r}"
            )
        if "dp" in fed.options:
            raise ValueError(
                "inference.options.dp and federation.dp.epsilon: give one of them"
            )
        if not fed.dp.epsilon > 0:
            raise ValueError(
                f"federation.dp.epsilon: expected > 0, got {fed.dp.epsilon}"
            )
    if fed.secagg and fed.engine == "pooled":
        raise ValueError(
            "federation.secagg: the pooled reference has no sites to "
            "aggregate; use engine inprocess or flower"
        )


def check_flower_model(use_case: str, model: Any) -> None:
    """Refuse, by name, a model the Flower engine would not fit as configured (the
    use case task's ``check_flower_model``; e.g. the Flower apps load a
    haemophilia population model by its library product name, so an edited one
    would be silently replaced)."""
    check = usecases.get(use_case).task.check_flower_model
    if check is not None:
        check(model)


def with_dp(
    build: Callable[[dict], Algorithm],
    options: Mapping[str, Any],
    dp: DPTarget | None,
    sizes: Sequence[int],
) -> tuple[Algorithm, dict]:
    """``build(options)``, with DP-SGD calibrated to ``dp`` when it is given.

    Returns the algorithm and what was set (``noise_multiplier``, ``delta``,
    ``steps``); ``{}`` without DP.
    """
    opts = dict(options)
    if dp is None:
        return build(opts), {}
    n_max = max(sizes)
    delta = float(dp.delta) if dp.delta is not None else 1.0 / (10 * n_max)
    if not 0 < delta < 1.0 / n_max:
        raise ValueError(
            f"federation.dp.delta: {delta:g} must be in (0, 1/N) with "
            f"N = {n_max} patients at the largest site"
        )
    fields = {
        "clip": float(dp.clip),
        "delta": delta,
        "accountant": dp.accountant,
        "sampling_rate": float(dp.sampling_rate),
    }
    probe = build({**opts, "dp": {**fields, "noise_multiplier": 1.0}})
    steps = int(probe.max_rounds) * int(probe.dp_steps_per_round)
    z = calibrate_noise_multiplier(
        float(dp.epsilon),
        delta,
        steps,
        float(dp.sampling_rate),
        accountant=dp.accountant,
    )
    return (
        build({**opts, "dp": {**fields, "noise_multiplier": z}}),
        {"noise_multiplier": z, "delta": delta, "steps": steps},
    )


def train(
    key,
    build: Callable[[dict], Algorithm],
    sites: Sequence[Any],
    fed: FederationSettings,
    *,
    label: str = "",
    progress: ProgressFn | None = None,
    checkpoint_dir: str | Path | None = None,
    on_message: Callable | None = None,
) -> tuple[FederatedRun, dict]:
    """Run ``build(options)`` over ``sites`` (padded per-site pytrees) in process.

    ``pooled``: pass one site holding every patient. ``progress``: listener of
    the engine's ``rounds`` events (:mod:`phems_clinical.progress`), labelled
    ``label``. Returns the engine's run and the DP calibration (``{}`` without
    DP).
    """
    alg, dp_set = with_dp(build, fed.options, fed.dp, [site_size(s) for s in sites])
    aggregator = None
    if fed.secagg:
        aggregator = secagg_aggregator(
            default_secagg_config(len(sites), fed.min_sites), n_sites=len(sites)
        )
    run = run_federated(
        key,
        alg,
        list(sites),
        aggregator=aggregator,
        min_sites=fed.min_sites,
        checkpoint_dir=checkpoint_dir,
        on_message=on_message,
        progress=labelled(progress or silent, label),
    )
    return run, dp_set


def train_flower(
    task,
    key,
    seed: int,
    frames: Sequence[Any],
    strategy: str,
    model: Any,
    fed: FederationSettings,
    folder: str | Path,
    *,
    stop_after: int | None = None,
) -> tuple[Any, dict, dict]:
    """Train ``task``'s model over real Flower processes on this machine (one
    SuperLink, one SuperNode per site; :func:`phems_clinical.federation.flower.
    launch.run_loopback`).

    Site ``k``'s (derived) table goes to ``folder/sites/site_<k>/<file>``
    (``cohort.csv``, ``hourly.csv`` or ``sojourns.csv``), the node's only input; the
    server's checkpoint and the result go to ``folder/flower``. A folder holding
    the checkpoint of an interrupted run resumes it (same job name, the sites'
    kept state) to the result of an uninterrupted one. ``seed``: the Flower run's
    seed (site keys, PICU initial weights); ``key``: the in-process problem's key,
    used only to calibrate DP (``fed.dp``: the noise multiplier for the target ε,
    as :func:`with_dp`; the noise itself comes from each site's OS CSPRNG).
    ``stop_after``: stop after that many rounds with the checkpoint kept (an
    interruption, for tests). Haemophilia: ``model`` must be a library product
    (the apps load it by name).

    Returns the fitted model, the DP calibration (``{}`` without DP) and the
    server's result JSON (rounds, convergence, history, secure aggregation and
    privacy records).
    """
    import json

    from phems_clinical.federation.engine import checkpoint_path
    from phems_clinical.federation.flower.config import RunSettings
    from phems_clinical.federation.flower.launch import run_loopback
    from phems_clinical.federation.flower.tasks import (
        unpack_sums,
        use_case,
        write_table,
    )

    folder = Path(folder)
    uc = use_case(task.use_case)
    options = dict(fed.options)
    calibration: dict = {}
    if fed.dp is not None:  # calibrate z for the target, as in process
        prob = task.problem(key, frames, strategy, model)
        _, calibration = with_dp(
            prob.build, options, fed.dp, [site_size(s) for s in prob.sites]
        )
        options["dp"] = {
            "clip": float(fed.dp.clip),
            "delta": calibration["delta"],
            "accountant": fed.dp.accountant,
            "sampling_rate": float(fed.dp.sampling_rate),
            "noise_multiplier": calibration["noise_multiplier"],
        }
    dirs = []
    for k, df in enumerate(frames):
        d = folder / "sites" / f"site_{k}"
        d.mkdir(parents=True, exist_ok=True)
        write_table(df.drop(columns="SITE", errors="ignore"), d / uc.data_file)
        dirs.append(d)
    product, model_json = (
        task.flower_model(model) if task.flower_model is not None else ("", "")
    )
    out = folder / "flower"
    rounds = int(options.get("rounds", 0))
    settings = RunSettings(
        seed=int(seed),
        algorithm=strategy,
        use_case=task.use_case,
        product=product or RunSettings().product,
        model=model_json,
        rounds=int(stop_after) if stop_after else rounds,
        min_sites=int(fed.min_sites or 0),
        secagg=bool(fed.secagg),
        options=json.dumps(options),
        job=f"phems-{folder.name}",
        checkpoint_dir=str(out / "checkpoint"),
    )
    resume = checkpoint_path(settings.checkpoint_dir).exists()
    res = run_loopback(
        dirs, out, settings=settings, **({"resume": True} if resume else {})
    )
    result = {
        k: (np.asarray(v) if isinstance(v, list) else v)
        for k, v in res["result"].items()
    }
    sums = unpack_sums(
        {
            f"{st}.{f}": v
            for st, fields in res.get("summaries", {}).items()
            for f, v in fields.items()
        }
    )
    return task.flower_fitted(result, settings, sums, model), calibration, res
