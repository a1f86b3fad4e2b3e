"""Target-risk search on a small longitudinal table: a reachable and an
unreachable singling-out bound, loss ordering, and refusals."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy.attacks import singling_out_risk
from phems_clinical.privacy.hierarchies import lifespan_age, suppress_only, weight_kg
from phems_clinical.privacy.perturb import LongitudinalRoles, ValueColumn
from phems_clinical.privacy.release import (
    AnonymiseError,
    Roles,
    anonymise,
    anonymise_longitudinal,
)
from phems_clinical.privacy.target_risk import (
    Setting,
    TargetRiskError,
    default_ladder,
    search_target_risk,
)

ROLES = Roles(
    use_case="toy",
    patient_id="ID",
    identifiers=("ID",),
    quasi_identifiers={
        "AGE": lambda: lifespan_age("years", "AGE"),
        "WT": lambda: weight_kg("WT"),
        "SEX": lambda: suppress_only("SEX"),
    },
    longitudinal=LongitudinalRoles(
        course="ID",
        times=("TIME",),
        values={"DV": ValueColumn("multiplicative", lower=0.0)},
    ),
)


def _site(seed: int, n: int) -> pd.DataFrame:
    """n patients, one dose at 0 h and three levels each (IU/dL), unique values."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age, wt, sex = rng.uniform(18, 60), rng.uniform(50, 100), int(rng.integers(2))
        c0, ke = rng.lognormal(np.log(80), 0.3), rng.lognormal(np.log(0.06), 0.2)
        for t in (0.0, *np.round(rng.uniform([2, 20, 44], [6, 28, 52]), 4)):
            rows.append(
                {
                    "ID": seed * 1000 + i,
                    "TIME": t,
                    "AGE": age,
                    "WT": wt,
                    "SEX": sex,
                    "DV": np.nan if t == 0 else round(c0 * np.exp(-ke * t), 4),
                }
            )
    return pd.DataFrame(rows)


def _profile(df: pd.DataFrame) -> pd.DataFrame:
    obs = df[df["DV"].notna()]
    g = obs.groupby("ID", sort=False)
    return pd.DataFrame(
        {
            "level_first": g["DV"].first(),
            "time_first": g["TIME"].first(),
            "level_last": g["DV"].last(),
        }
    ).reset_index(drop=True)


TRAIN, CONTROL = _site(1, 120), _site(2, 120)
TRAIN_P, CONTROL_P = _profile(TRAIN), _profile(CONTROL)


def measure(key, released):
    return {
        "singling_out_risk": singling_out_risk(
            key, TRAIN_P, _profile(released), CONTROL_P, n_attacks=100
        )
    }


def test_untouched_levels_single_patients_out():
    # the QI release leaves the levels as they are: near-certain singling out
    rel = anonymise_longitudinal(jax.random.key(0), TRAIN, ROLES, k=5)
    r = measure(jax.random.key(1), rel.data)["singling_out_risk"]
    assert r.value > 0.9
    assert rel.report["information_loss"]["il1s"]["DV"] == 0.0


def test_reachable_target_picks_least_loss_setting():
    ladder = [
        Setting(5, None, 0.3, 6.0),
        Setting(5),
        Setting(5, None, 0.05, 1.0),
        Setting(5, None, 0.1, 1.0),
    ]
    res = search_target_risk(
        jax.random.key(3),
        TRAIN,
        ROLES,
        {"singling_out_risk": 0.2},
        measure,
        ladder=ladder,
    )
    assert res.met, res.message
    losses = [s.loss for s in res.steps]
    assert losses == sorted(losses)  # tried from least to most loss
    assert res.steps[0].setting == Setting(5) and res.steps[0].meets is False
    chosen = next(s for s in res.steps if s.meets)
    assert res.setting == chosen.setting != Setting(5)
    assert chosen.risks["singling_out_risk"][2] <= 0.2
    # every setting of lower loss was measured and failed; none after it measured
    i = res.steps.index(chosen)
    assert all(s.meets is False for s in res.steps[:i])
    assert all(s.meets is None and not s.risks for s in res.steps[i + 1 :])
    assert res.release.report["config"]["longitudinal"]["noise"] == res.setting.noise
    assert "meets singling_out_risk <= 0.2" in res.message


def test_unreachable_target_is_reported_not_released():
    ladder = [Setting(5), Setting(5, None, 0.05)]
    res = search_target_risk(
        jax.random.key(3),
        TRAIN,
        ROLES,
        {"singling_out_risk": 0.01},
        measure,
        ladder=ladder,
    )
    assert not res.met and res.release is None and res.setting is None
    assert all(s.meets is False for s in res.steps)
    best = min(s.risks["singling_out_risk"][2] for s in res.steps)
    assert "none of the 2 settings meets singling_out_risk <= 0.01" in res.message
    assert "best: singling_out_risk" in res.message
    assert f"-{best:.3g}, at k=5" in res.message


def test_infeasible_settings_are_kept_as_steps():
    res = search_target_risk(
        jax.random.key(3),
        TRAIN,
        ROLES,
        {"singling_out_risk": 0.5},
        measure,
        ladder=[Setting(500), Setting(5, None, 0.2, 6.0)],
    )
    assert res.met
    bad = [s for s in res.steps if s.error]
    assert len(bad) == 1 and "k=500" in bad[0].error


def test_default_ladder_follows_the_declared_columns():
    lad = default_ladder(ROLES)
    assert Setting(5) in lad and len(lad) == 4 * 5 * 4
    no_values = Roles(
        use_case="t",
        patient_id="ID",
        identifiers=(),
        quasi_identifiers={},
        longitudinal=LongitudinalRoles(course="ID", times=("entry",), time_unit="d"),
    )
    assert default_ladder(no_values) == [
        Setting(5, None, 0.0, g) for g in (None, 1.0, 7.0, 30.0)
    ]


def test_refusals_name_the_problem():
    with pytest.raises(TargetRiskError, match="at least one risk bound"):
        search_target_risk(jax.random.key(0), TRAIN, ROLES, {}, measure)
    with pytest.raises(TargetRiskError, match="'singling_out_risk'.*in \\[0, 1\\]"):
        search_target_risk(
            jax.random.key(0), TRAIN, ROLES, {"singling_out_risk": 2.0}, measure
        )
    with pytest.raises(TargetRiskError, match=r"returned no \['linkability_risk'\]"):
        search_target_risk(
            jax.random.key(0),
            TRAIN,
            ROLES,
            {"linkability_risk": 0.1},
            measure,
            ladder=[Setting(5)],
        )
    with pytest.raises(TargetRiskError, match="no setting of the ladder"):
        search_target_risk(
            jax.random.key(0),
            TRAIN,
            ROLES,
            {"singling_out_risk": 0.1},
            measure,
            ladder=[Setting(999)],
        )


def test_release_records_options_and_is_idempotent():
    key = jax.random.key(7)
    off = anonymise_longitudinal(key, TRAIN, ROLES, k=5)
    pd.testing.assert_frame_equal(off.data, anonymise(key, TRAIN, ROLES, k=5).data)
    rel = anonymise_longitudinal(key, TRAIN, ROLES, k=5, noise=0.1, time_grid=6.0)
    assert rel.report["config"]["longitudinal"] == {
        "micro_k": None,
        "noise": 0.1,
        "time_grid": 6.0,
    }
    assert rel.report["longitudinal"]["values"] == ["DV"]
    assert set(rel.report["information_loss"]["il1s"]) == {
        "AGE",
        "WT",
        "SEX",
        "DV",
        "TIME",
    }
    assert (rel.data["TIME"] % 6 == 0).all()
    again = anonymise_longitudinal(key, rel.data, ROLES, k=5, noise=0.1, time_grid=6.0)
    assert again.report["already_anonymised"]
    pd.testing.assert_frame_equal(again.data, rel.data)
    with pytest.raises(AnonymiseError, match="already perturbed"):
        anonymise_longitudinal(key, rel.data, ROLES, k=5, noise=0.2, time_grid=6.0)
    with pytest.raises(AnonymiseError, match="declare none"):
        anonymise_longitudinal(
            key,
            TRAIN,
            Roles(
                use_case="toy",
                patient_id="ID",
                identifiers=("ID",),
                quasi_identifiers=ROLES.quasi_identifiers,
            ),
            k=5,
            noise=0.1,
        )
