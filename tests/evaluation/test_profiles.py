"""Patient profiles (evaluation.profiles) on hand-built tables, and the tabular
train-on-source logistic model (privacy.fidelity.logistic_transfer) against a
scipy maximum-likelihood fit."""

import jax
import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from phems_clinical import usecases
from phems_clinical.data.cardiac import simulate_cardiac
from phems_clinical.data.cardiac.pathways import episodes
from phems_clinical.evaluation.profiles import profile
from phems_clinical.privacy.fidelity import logistic_transfer


def test_pk_profile_hand_worked():
    k = 0.05
    rows = []
    for sid, (wt, dose) in enumerate([(20.0, 1000.0), (50.0, 2500.0)], start=1):
        rows.append(
            dict(
                ID=sid,
                TIME=0.0,
                AMT=dose,
                DV=np.nan,
                EVID=1,
                MDV=1,
                BLQ=0,
                OCC=1,
                AGE=8.0 * sid,
                WT=wt,
                SEX=0,
                BGO=sid - 1,
            )
        )
        for t in (4.0, 24.0, 48.0):
            rows.append(
                dict(
                    ID=sid,
                    TIME=t,
                    AMT=0.0,
                    DV=100 * np.exp(-k * t),
                    EVID=0,
                    MDV=0,
                    BLQ=0,
                    OCC=1,
                    AGE=8.0 * sid,
                    WT=wt,
                    SEX=0,
                    BGO=sid - 1,
                )
            )
    rows.append(
        dict(
            ID=2,
            TIME=72.0,
            AMT=0.0,
            DV=0.5,
            EVID=0,
            MDV=0,
            BLQ=1,
            OCC=1,
            AGE=16.0,
            WT=50.0,
            SEX=0,
            BGO=1,
        )
    )  # BLQ: not a level
    p = profile(usecases.get("haemophilia"), pd.DataFrame(rows))
    np.testing.assert_allclose(p["dose_iu_kg"], [50.0, 50.0])
    np.testing.assert_allclose(p["log_slope"], [-k, -k], rtol=1e-9)
    assert list(p["n_levels"]) == [3, 3]
    np.testing.assert_allclose(p["level_first"], 100 * np.exp(-k * 4.0))
    np.testing.assert_allclose(p["time_first"], [4.0, 4.0])
    assert list(p["BGO"]) == [0, 1]


def test_picu_profile_hand_worked():
    h = pd.DataFrame(
        {
            "stay_id": [7, 7, 7, 9, 9],
            "hour": [0, 1, 2, 0, 1],
            "age_months": [5.0, 5.001, 5.003, 40.0, 40.001],
            "sex": ["F"] * 3 + ["M"] * 2,
            "died": [0, 0, 1, 0, 0],
            "hr": [100, 120, np.nan, 90, 94],
            "lactate": [np.nan, 2.0, 4.5, np.nan, np.nan],
            "spo2": [97, 91, 88, 99, 98],
            "imv": [0, 1, 1, 0, 0],
            "vasoactives": [0, 0, 2, 0, 0],
            "culture": [0, 1, 0, 0, 0],
        }
    )
    p = profile(usecases.get("picu"), h)
    assert list(p["los_hours"]) == [3, 2] and list(p["died"]) == [1, 0]
    np.testing.assert_allclose(p["hr_mean"], [110.0, 92.0])
    assert p["lactate_max"].iloc[0] == 4.5 and np.isnan(p["lactate_max"].iloc[1])
    assert list(p["imv_hours"]) == [2, 0] and list(p["vasoactive_hours"]) == [1, 0]
    assert list(p["spo2_min"]) == [88, 98] and list(p["culture"]) == [1, 0]


def test_cardiac_profile_matches_sojourns():
    s = episodes(simulate_cardiac(jax.random.key(1), n_episodes=80).tables)[0]
    p = profile(usecases.get("cardiac"), s)
    assert len(p) == s["episode_id"].nunique()
    died = s.groupby("episode_id", sort=False)["next_state"].apply(
        lambda x: int((x == "DEAD").any())
    )
    assert list(p["died"]) == list(died)
    for aux, secret in (usecases.get(n).attack_columns for n in usecases.names()):
        assert secret not in aux


def test_unknown_use_case():
    with pytest.raises(ValueError, match="oncology"):
        profile("oncology", pd.DataFrame())


def test_logistic_transfer_matches_scipy_mle():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, 400)
    y = (rng.random(400) < 1 / (1 + np.exp(-(0.5 - 0.8 * x)))).astype(float)
    x_test = np.linspace(-5, 9, 15)
    p = logistic_transfer(
        pd.DataFrame({"x": x}), y, pd.DataFrame({"x": x_test}), l2=1e-8
    )

    def nll(b):
        z = b[0] + b[1] * x
        return np.sum(np.logaddexp(0, z) - y * z)

    b = optimize.minimize(nll, np.zeros(2), method="BFGS").x
    ref = 1 / (1 + np.exp(-(b[0] + b[1] * x_test)))
    # the model standardises x over train and test rows; an unpenalised fit is
    # invariant to that, so the probabilities agree
    np.testing.assert_allclose(p, ref, atol=2e-4)
