"""The regimen designer against brute force: the dose found, the cap, the peak flag
and the hours above levels recomputed from 20 weeks of infusions summed dose by dose
(:func:`~phems_clinical.pk.analytic.concentration`) for each posterior draw."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical.data.cohort import stack_subjects
from phems_clinical.dosing.regimens import (
    PEAK_FLAG,
    Schedule,
    design_regimens,
    evaluate_regimen,
    parse_schedule,
)
from phems_clinical.pk.analytic import concentration
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import individual_parameters, initial_params

VIALS = (250.0, 500.0, 1000.0)
WEIGHT = 30.0
DUR = 0.2


@pytest.mark.parametrize(
    "text,label,every_h,weekdays",
    [
        ("every 48 h", "every 48 h", 48.0, ()),
        ("48h", "every 48 h", 48.0, ()),
        ("Every 36 hours", "every 36 h", 36.0, ()),
        ("q72h", "every 72 h", 72.0, ()),
        ("every 2 days", "every 2 days", 48.0, ()),
        ("every 3.5 days", "every 3.5 days", 84.0, ()),
        ("daily", "every 24 h", 24.0, ()),
        ("every other day", "every 48 h", 48.0, ()),
        ("weekly", "every 7 days", 168.0, ()),
        ("Mon/Wed/Fri", "Mon/Wed/Fri", None, (0, 2, 4)),
        ("fri, monday , WED", "Mon/Wed/Fri", None, (0, 2, 4)),
        ("Tues/Thurs/Sat/Sun", "Tue/Thu/Sat/Sun", None, (1, 3, 5, 6)),
        ("sunday", "Sun", None, (6,)),
        ("3x/week", "Mon/Wed/Fri", None, (0, 2, 4)),
        ("3 times a week", "Mon/Wed/Fri", None, (0, 2, 4)),
        ("2x/week", "Mon/Thu", None, (0, 3)),
        ("1x/week", "every 7 days", 168.0, ()),
    ],
)
def test_parse_schedule_forms(text, label, every_h, weekdays):
    s = parse_schedule(text)
    assert s == Schedule(label, every_h, weekdays)
    assert s.infusions_per_week == pytest.approx(
        168.0 / every_h if every_h else len(weekdays)
    )
    assert parse_schedule(s.label) == s  # the label reads back


@pytest.mark.parametrize(
    "text,match",
    [
        ("fortnightly", "accepted forms"),
        ("", "accepted forms"),
        ("every 48", "accepted forms"),
        ("Mon/Mon/Fri", "named twice"),
        ("Mon//Fri", "accepted forms"),
        ("4x/week", "name the weekdays"),
        ("every 2 h", "from 4 h to 28 days"),
        ("every 30 days", "from 4 h to 28 days"),
        ("every -2 days", "accepted forms"),
        (48, "expected text"),
    ],
)
def test_parse_schedule_errors(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_schedule(text)
    if isinstance(text, str) and text:
        assert repr(text) in str(err.value)  # the message names the text


# --------------------------------------------------------------------------------
# designer


@pytest.fixture(scope="module")
def case():
    """Kovaltry (2 compartments, no IOV), a 30 kg child, 200 draws of eta from the
    prior (the designer only needs draws, wherever they come from)."""
    model = load_product("kovaltry")
    params = initial_params(model)
    row = dict(
        dose_time=[0.0],
        dose_amt=[1000.0],
        dose_dur=[DUR],
        dose_occ=[0],
        obs_time=[4.0],
        obs_dv=[30.0],
        obs_blq=[False],
        obs_lloq=[0.0],
        obs_occ=[0],
        covariates=[25.0],
    )
    subject = jax.tree.map(lambda x: x[0], stack_subjects([row], n_obs=1))
    rng = np.random.default_rng(3)
    draws = rng.multivariate_normal(
        np.zeros(model.n_eta), np.asarray(params.omega), 200
    )
    own = np.asarray(
        jax.vmap(
            lambda b: individual_parameters(
                model, params.theta, b, jnp.zeros((1, 0)), subject.covariates
            )[0]
        )(jnp.asarray(draws))
    )
    return model, params, subject, jnp.asarray(draws), own


def _last_week(own, n_cmt, sched: Schedule, dose, step):
    """Levels over the last period of 20 weeks of ``sched`` (IU/dL, per draw) and
    the pre-dose levels of that period."""
    offsets, period = sched.pattern
    n = int(np.ceil(20 * 168 / period))
    starts = jnp.asarray((np.arange(n)[:, None] * period + offsets).ravel())
    t0 = (n - 1) * period
    grid = jnp.asarray(t0 + np.arange(0.0, period, step))
    pre_t = jnp.asarray(t0 + offsets - 1e-9)

    def one(p):
        def c(t):
            return concentration(
                t,
                starts,
                jnp.full(starts.size, dose),
                jnp.full(starts.size, DUR),
                p,
                n_cmt,
            )

        return c(grid), c(pre_t)

    level, pre = jax.vmap(one)(jnp.asarray(own))
    return np.asarray(level), np.asarray(pre)


def _p_trough(own, n_cmt, sched, dose, target):
    _, pre = _last_week(own, n_cmt, sched, dose, step=24.0)
    return float(np.mean(pre.min(axis=1) >= target))


def _vial_totals(limit):
    return sorted(
        {
            sum(c)
            for r in range(1, 7)
            for c in itertools.combinations_with_replacement(VIALS, r)
            if sum(c) <= limit
        }
    )


def test_design_dose_meets_the_probability_exactly(case, key):
    """For each schedule and target: P(trough >= target) >= 0.7 at the dose by
    brute force, and < 0.7 at the next smaller vial total."""
    model, params, subject, draws, own = case
    regs = design_regimens(
        key,
        model,
        params,
        subject,
        draws,
        n_occ=1,
        schedules=["Mon/Wed/Fri", "every 48 h", "every 24 h"],
        targets_IU_dL=[1.0, 2.0],
        probability=0.7,
        weight_kg=WEIGHT,
        vial_sizes=VIALS,
        max_dose_IU_kg=100.0,
        peak_flag_IU_dL=150.0,
        thresholds_IU_dL=[1.0, 5.0],
    )
    assert [(r["schedule"]["label"], r["target_IU_dL"]) for r in regs] == [
        (s, t) for s in ("Mon/Wed/Fri", "every 48 h", "every 24 h") for t in (1, 2)
    ]
    ok = [r for r in regs if r["status"] == "ok"]
    assert len(ok) >= 4
    for r in ok:
        sched = parse_schedule(r["schedule"]["label"])
        p = _p_trough(own, model.n_cmt, sched, r["dose_IU"], r["target_IU_dL"])
        assert p >= 0.7
        assert r["trough_prob"] == pytest.approx(p, abs=1e-12)
        smaller = [d for d in _vial_totals(r["dose_IU"]) if d < r["dose_IU"]]
        if smaller:
            assert (
                _p_trough(own, model.n_cmt, sched, smaller[-1], r["target_IU_dL"]) < 0.7
            )
        assert sum(v["size_IU"] * v["count"] for v in r["vials"]) == r["dose_IU"]
        assert r["vials_exact"]
        assert r["dose_IU_kg"] == pytest.approx(r["dose_IU"] / WEIGHT)
        assert r["dose_IU_kg_week"] == pytest.approx(
            r["dose_IU"] / WEIGHT * sched.infusions_per_week
        )
        assert r["cap_IU_kg"] == 100.0


def test_design_outcomes_by_brute_force(case, key):
    """Trough, peak, hours above thresholds and hours below target per week on
    Mon/Wed/Fri: posterior quantiles of the per-draw values on a 0.02 h grid."""
    model, params, subject, draws, own = case
    (r,) = design_regimens(
        key,
        model,
        params,
        subject,
        draws[:40],
        n_occ=1,
        schedules=["Mon/Wed/Fri"],
        targets_IU_dL=[2.0],
        probability=0.8,
        weight_kg=WEIGHT,
        vial_sizes=VIALS,
        max_dose_IU_kg=100.0,
        peak_flag_IU_dL=150.0,
        thresholds_IU_dL=[1.0, 5.0],
    )
    level, pre = _last_week(
        own[:40], model.n_cmt, parse_schedule("Mon/Wed/Fri"), r["dose_IU"], step=0.02
    )

    def est(x):
        q = np.quantile(x, [0.5, 0.05, 0.95])
        return {"median": q[0], "lo90": q[1], "hi90": q[2]}

    def close(got, want, **tol):
        for k in ("median", "lo90", "hi90"):
            assert got[k] == pytest.approx(want[k], **tol), k

    close(r["trough_IU_dL"], est(pre.min(axis=1)), rel=1e-6)
    close(r["peak_IU_dL"], est(level.max(axis=1)), rel=1e-3)
    for thr in (1.0, 5.0):
        close(
            r["time_above_h_per_week"][f"{thr:g}"],
            est(168.0 * np.mean(level >= thr, axis=1)),
            abs=0.15,
        )
    close(
        r["hours_below_target_per_week"],
        est(168.0 * np.mean(level < 2.0, axis=1)),
        abs=0.15,
    )


def test_cap_and_peak_flag(case, key):
    """A target no dose up to the cap meets: status above_cap, the largest vial
    total within 100 IU/kg and what it gives; a low flag level flags the peak."""
    model, params, subject, draws, own = case
    regs = design_regimens(
        key,
        model,
        params,
        subject,
        draws,
        n_occ=1,
        schedules=["every 72 h"],
        targets_IU_dL=[1.0, 40.0],
        probability=0.9,
        weight_kg=WEIGHT,
        vial_sizes=VIALS,
        max_dose_IU_kg=100.0,
        peak_flag_IU_dL=60.0,
        thresholds_IU_dL=[1.0],
    )
    capped = regs[1]
    assert capped["status"] == "above_cap"
    assert capped["dose_IU"] == 3000.0  # 100 IU/kg x 30 kg, a vial total
    assert capped["cap_IU_kg"] == 100.0
    sched = parse_schedule("every 72 h")
    assert capped["trough_prob"] == pytest.approx(
        _p_trough(own, model.n_cmt, sched, 3000.0, 40.0), abs=1e-12
    )
    assert capped["trough_prob"] < 0.9
    level, _ = _last_week(own, model.n_cmt, sched, 3000.0, step=0.05)
    assert capped["peak_IU_dL"]["median"] == pytest.approx(
        np.median(level.max(axis=1)), rel=1e-3
    )
    assert capped["peak_IU_dL"]["median"] > 60.0
    assert capped["peak_flag"] == PEAK_FLAG
    small = evaluate_regimen(
        key,
        model,
        params,
        subject,
        draws,
        n_occ=1,
        schedule="every 72 h",
        dose_IU=500.0,
        weight_kg=WEIGHT,
        vial_sizes=VIALS,
        peak_flag_IU_dL=60.0,
    )
    assert small["peak_IU_dL"]["median"] < 60.0 and small["peak_flag"] is None
    # a cap below one vial: the cap itself, the nearest vial total above it listed
    (tiny,) = design_regimens(
        key,
        model,
        params,
        subject,
        draws,
        n_occ=1,
        schedules=["every 72 h"],
        targets_IU_dL=[40.0],
        probability=0.9,
        weight_kg=2.0,
        vial_sizes=VIALS,
        max_dose_IU_kg=100.0,
        thresholds_IU_dL=[1.0],
    )
    assert tiny["status"] == "above_cap" and tiny["dose_IU"] == 200.0
    assert tiny["vials"] == [{"size_IU": 250.0, "count": 1}]
    assert not tiny["vials_exact"]


def test_evaluate_regimen(case, key):
    """A chosen dose is used as given; vials report the nearest total above it; the
    outcomes match the designer's at the same dose and key."""
    model, params, subject, draws, own = case
    common = dict(
        n_occ=1, weight_kg=WEIGHT, vial_sizes=VIALS, thresholds_IU_dL=[1.0, 5.0]
    )
    e = evaluate_regimen(
        key,
        model,
        params,
        subject,
        draws,
        schedule="Mon/Wed/Fri",
        dose_IU=1100.0,
        target_IU_dL=1.0,
        probability=0.9,
        **common,
    )
    assert e["dose_IU"] == 1100.0 and not e["vials_exact"]
    assert e["vials"] == [
        {"size_IU": 1000.0, "count": 1},
        {"size_IU": 250.0, "count": 1},
    ]
    assert e["status"] == "ok" and not e["exceeds_cap"]
    assert e["trough_prob"] == pytest.approx(
        _p_trough(own, model.n_cmt, parse_schedule("Mon/Wed/Fri"), 1100.0, 1.0),
        abs=1e-12,
    )
    by_kg = evaluate_regimen(
        key,
        model,
        params,
        subject,
        draws,
        schedule="3x/week",
        dose_IU_kg=1100.0 / WEIGHT,
        target_IU_dL=1.0,
        **common,
    )
    assert by_kg["dose_IU"] == pytest.approx(1100.0)
    assert by_kg["schedule"] == e["schedule"]
    assert by_kg["trough_IU_dL"] == pytest.approx(e["trough_IU_dL"])
    (d,) = design_regimens(
        key,
        model,
        params,
        subject,
        draws,
        schedules=["Mon/Wed/Fri"],
        targets_IU_dL=[1.0],
        probability=0.9,
        **common,
    )
    same = evaluate_regimen(
        key,
        model,
        params,
        subject,
        draws,
        schedule="Mon/Wed/Fri",
        dose_IU=d["dose_IU"],
        target_IU_dL=1.0,
        probability=0.9,
        **common,
    )
    assert same["vials_exact"]
    for k in (
        "trough_IU_dL",
        "trough_prob",
        "peak_IU_dL",
        "time_above_h_per_week",
        "hours_below_target_per_week",
        "vials",
        "dose_IU_kg_week",
    ):
        assert same[k] == d[k], k
    no_target = evaluate_regimen(
        key,
        model,
        params,
        subject,
        draws,
        schedule="every 48 h",
        dose_IU=4000.0,
        **common,
    )
    assert no_target["target_IU_dL"] is None and no_target["trough_prob"] is None
    assert no_target["hours_below_target_per_week"] is None
    assert no_target["exceeds_cap"]  # 133 IU/kg > 100


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dose_IU=None), "exactly one"),
        (dict(dose_IU=1000.0, dose_IU_kg=30.0), "exactly one"),
        (dict(dose_IU=-5.0), "dose_IU: expected a positive number"),
        (dict(dose_IU=float("nan")), "dose_IU: expected a positive number"),
        (dict(dose_IU=1000.0, weight_kg=0.0), "weight_kg"),
        (dict(dose_IU=1000.0, probability=1.0), "trough_probability"),
        (dict(dose_IU=1000.0, thresholds_IU_dL=[1.0, None]), "thresholds_IU_dL"),
        (dict(dose_IU=1000.0, vial_sizes=(250.5,)), "vial_sizes_IU: expected whole IU"),
        (dict(dose_IU=1000.0, schedule="every 48"), "not understood"),
        (dict(dose_IU=1000.0, infusion_h=72.0), "infusion duration"),
    ],
)
def test_evaluate_refuses_bad_input(case, key, kwargs, match):
    model, params, subject, draws, _ = case
    args = dict(n_occ=1, schedule="Mon/Thu", weight_kg=WEIGHT, vial_sizes=VIALS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate_regimen(key, model, params, subject, draws[:10], **args)
