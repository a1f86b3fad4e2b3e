"""Target-risk search: the least-loss anonymisation that meets stated risk bounds.

The data controller states the residual risk it accepts, as upper bounds on the
95 % interval of attack-based risks (e.g. ``{"singling_out_risk": 0.2,
"linkability_risk": 0.1}``; Giomi et al., PoPETs 2023(2):312-328, the method of
:mod:`.attacks`). The search takes a ladder of settings (:class:`Setting`: k of
the QI generalisation, MDAV group size of the course levels, noise, time grid),
makes every release, orders them by the information loss they cost (IL1s,
:func:`.perturb.il1s`; ties keep the ladder's order) and measures the risk of
each in that order until one meets every bound. It returns that release, the
risk measured at every step and the loss paid, or, when no setting meets the
bounds, says so with the best one reached; it never releases silently.

This follows the risk-based de-identification practice of setting a risk
threshold first and choosing the least-distorting transformation that meets it
(El Emam, *Guide to the De-Identification of Personal Health Information*, CRC
2013, chapters on risk thresholds; EMA Policy 0070 external guidance, 2018,
section 4.2.3).

The risk is measured by a function the caller passes, ``measure(key, released
table) -> {name: risk}``: the attacks against the site's own data, training part
(released) vs a held-out control part (anonymeter's design). Evaluation code
builds it (it knows the use case's patient profile); this module imports no
evaluation code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import product
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd

from phems_clinical.privacy.release import (
    Release,
    anonymise_longitudinal,
    roles_for,
)

__all__ = [
    "RiskStep",
    "Setting",
    "TargetRiskError",
    "TargetRiskResult",
    "default_ladder",
    "search_target_risk",
]


class TargetRiskError(ValueError):
    """The search cannot run (names the target, setting or option)."""


class Setting(NamedTuple):
    """One rung of the ladder: QI ``k``, MDAV ``micro_k`` of the course levels
    (None: off), ``noise`` (CV / fraction of SD; 0: off), ``time_grid`` (in the
    use case's time unit; None: off)."""

    k: int = 5
    micro_k: int | None = None
    noise: float = 0.0
    time_grid: float | None = None

    def describe(self, time_unit: str = "") -> str:
        """Short text, e.g. ``k=5, micro_k=5, noise=0.1, time_grid=6 h``."""
        parts = [f"k={self.k}"]
        if self.micro_k is not None:
            parts.append(f"micro_k={self.micro_k}")
        if self.noise:
            parts.append(f"noise={self.noise:g}")
        if self.time_grid is not None:
            parts.append(f"time_grid={self.time_grid:g} {time_unit}".rstrip())
        return ", ".join(parts)


class RiskStep(NamedTuple):
    """One setting: its loss (mean IL1s over the perturbed and QI columns; the
    share of suppressed patients), the risks measured (name -> (value, ci_low,
    ci_high); empty when not measured) and whether it meets every target
    (``None``: not measured; ``error``: the setting could not be made)."""

    setting: Setting
    loss: float
    suppressed_share: float
    risks: dict[str, tuple[float, float, float]]
    meets: bool | None
    error: str | None = None


class TargetRiskResult(NamedTuple):
    """Outcome of :func:`search_target_risk`: ``met``; the chosen ``setting`` and
    its ``release`` (None when unmet); every ``step`` in the order tried; a
    one-line ``message``."""

    met: bool
    setting: Setting | None
    release: Release | None
    steps: list[RiskStep]
    message: str
    targets: dict[str, float]


def default_ladder(
    roles,
    *,
    k: Sequence[int] = (5,),
    micro_k: Sequence[int | None] = (None, 3, 5, 10),
    noise: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.4),
    time_grid: Sequence[float | None] | None = None,
) -> list[Setting]:
    """Every combination of the options that apply to ``roles``' longitudinal
    columns (no ``micro_k`` or ``noise`` without value columns, no ``time_grid``
    without time columns). ``time_grid`` default: 1, 6, 24 h or 1, 7, 30 d."""
    lon = roles_for(roles).longitudinal
    has_values = lon is not None and bool(lon.values)
    has_times = lon is not None and bool(lon.times)
    if time_grid is None:
        time_grid = (
            (None, 1.0, 7.0, 30.0)
            if lon is not None and lon.time_unit == "d"
            else (None, 1.0, 6.0, 24.0)
        )
    mk = micro_k if has_values else (None,)
    nz = noise if has_values else (0.0,)
    tg = time_grid if has_times else (None,)
    return [Setting(int(a), b, float(c), d) for a, b, c, d in product(k, mk, nz, tg)]


def _triple(r: Any, name: str) -> tuple[float, float, float]:
    try:
        return float(r.value), float(r.ci_low), float(r.ci_high)
    except AttributeError:
        raise TargetRiskError(
            f"measure: risk {name!r} has no value/ci_low/ci_high "
            f"(got {type(r).__name__})"
        ) from None


def _check_targets(targets: Mapping[str, float]) -> dict[str, float]:
    if not targets:
        raise TargetRiskError(
            "targets: state at least one risk bound, e.g. {'singling_out_risk': 0.2}"
        )
    out = {}
    for name, v in targets.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise TargetRiskError(
                f"target {name!r}: expected a risk in [0, 1], got {v!r}"
            )
        out[str(name)] = float(v)
    return out


def search_target_risk(
    key,
    data: pd.DataFrame,
    roles,
    targets: Mapping[str, float],
    measure: Callable[[Any, pd.DataFrame], Mapping[str, Any]],
    *,
    ladder: Sequence[Setting] | None = None,
    **options,
) -> TargetRiskResult:
    """The least-loss setting of ``ladder`` whose release meets every target.

    Parameters
    ----------
    key : jax PRNG key
        Split into one key per setting (anonymisation) and one per measurement.
    data : DataFrame
        The site's training part (what would be released).
    roles : Roles or use case (its ``roles``, with ``longitudinal`` columns).
    targets : mapping risk name -> bound
        A setting meets a target when the upper end of the risk's 95 % interval
        is at most the bound (a point value under the bound with an interval
        above it does not count).
    measure : callable ``(key, released table) -> {risk name: risk}``
        Each risk has ``value``, ``ci_low``, ``ci_high`` (:class:`.attacks.Risk`,
        a scorecard ``Score``). It attacks the released table with the held-out
        part of the site as control.
    ladder : sequence of Setting, default :func:`default_ladder`
    **options
        Passed to :func:`.release.anonymise_longitudinal` (``max_suppression``,
        ``method``...).

    Returns
    -------
    TargetRiskResult
        With ``met=False``, ``message`` names the unmet bound and the best risk
        reached and its setting.

    Raises
    ------
    TargetRiskError
        No targets, a bound outside [0, 1], an empty ladder, ``measure`` lacking a
        targeted risk, or no setting of the ladder can be made at all.
    """
    targets = _check_targets(targets)
    roles = roles_for(roles)
    ladder = list(default_ladder(roles) if ladder is None else ladder)
    if not ladder:
        raise TargetRiskError("ladder: expected at least one setting")
    unit = roles.longitudinal.time_unit if roles.longitudinal is not None else ""
    k_rel, k_meas = jax.random.split(key)
    made: list[tuple[float, int, Setting, Release | None, str | None]] = []
    for i, s in enumerate(ladder):
        try:
            rel = anonymise_longitudinal(
                jax.random.fold_in(k_rel, i),
                data,
                roles,
                k=s.k,
                micro_k=s.micro_k,
                noise=s.noise,
                time_grid=s.time_grid,
                **options,
            )
        except ValueError as e:  # infeasible setting (k too large, no columns)
            made.append((np.inf, i, s, None, str(e)))
            continue
        loss = float(rel.report["information_loss"]["il1s_mean"])
        made.append((loss, i, s, rel, None))
    if all(m[3] is None for m in made):
        raise TargetRiskError(
            f"no setting of the ladder can be made: "
            f"{made[0][2].describe(unit)}: {made[0][4]}"
        )
    made.sort(key=lambda m: (m[0], m[1]))
    steps: list[RiskStep] = []
    chosen = None
    for loss, i, s, rel, err in made:
        if rel is None:
            steps.append(RiskStep(s, float("nan"), float("nan"), {}, None, err))
            continue
        supp = float(rel.report["suppressed_share"])
        if chosen is not None:
            steps.append(RiskStep(s, loss, supp, {}, None))
            continue
        got = measure(jax.random.fold_in(k_meas, i), rel.data)
        missing = [t for t in targets if t not in got]
        if missing:
            raise TargetRiskError(
                f"measure: returned no {missing} (it returned {sorted(got)})"
            )
        risks = {n: _triple(r, n) for n, r in got.items()}
        meets = all(risks[t][2] <= b for t, b in targets.items())
        steps.append(RiskStep(s, loss, supp, risks, meets))
        if meets:
            chosen = (s, rel)
    bounds = ", ".join(f"{t} <= {b:g}" for t, b in targets.items())
    if chosen is not None:
        s, rel = chosen
        step = next(st for st in steps if st.setting == s and st.meets)
        reached = ", ".join(
            f"{t} {v:.3g} (95 % CI {lo:.3g}-{hi:.3g})"
            for t in targets
            for v, lo, hi in [step.risks[t]]
        )
        msg = (
            f"{roles.use_case}: {s.describe(unit)} meets {bounds}: {reached}; "
            f"loss IL1s {step.loss:.3g}, {step.suppressed_share:.1%} of patients "
            f"suppressed"
        )
        return TargetRiskResult(True, s, rel, steps, msg, targets)
    measured = [st for st in steps if st.risks]
    best = min(
        measured, key=lambda st: max(st.risks[t][2] - b for t, b in targets.items())
    )
    worst_t = max(targets, key=lambda t: best.risks[t][2] - targets[t])
    v, lo, hi = best.risks[worst_t]
    msg = (
        f"{roles.use_case}: none of the {len(ladder)} settings meets {bounds} "
        f"(best: {worst_t} {v:.3g}, 95 % CI {lo:.3g}-{hi:.3g}, at "
        f"{best.setting.describe(unit)})"
    )
    return TargetRiskResult(False, None, None, steps, msg, targets)
