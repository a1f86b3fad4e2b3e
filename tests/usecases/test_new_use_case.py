"""Adding a use case touches one module: a fourth use case defined here only (a
ward's hourly heart rate; a bootstrap generator) goes through the registry,
the anonymiser, the profiles, every source and the scorecard without any edit to
evaluation/ or privacy/ (they take the object, never a name)."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical import usecases
from phems_clinical.evaluation.profiles import profile
from phems_clinical.evaluation.sources import (
    SourceSpec,
    default_sources,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.privacy.hierarchies import paediatric_age, suppress_only
from phems_clinical.privacy.release import Roles, check_table
from phems_clinical.rng import numpy_generator


def _ward(key, n: int) -> pd.DataFrame:
    """``n`` patients, 3-8 hourly rows each; death more likely with a high HR."""
    rng = numpy_generator(key)
    rows = []
    for pid in range(1, n + 1):
        age, sex = int(rng.integers(1, 200)), ["F", "M"][int(rng.integers(2))]
        base = rng.normal(120, 20)
        died = int(rng.random() < 1 / (1 + np.exp(-(base - 140) / 10)))
        for h in range(int(rng.integers(3, 9))):
            rows.append(
                {
                    "pid": pid,
                    "age_months": age,
                    "sex": sex,
                    "hour": h,
                    "hr": float(base + rng.normal(0, 5)),
                    "died": died,
                }
            )
    return pd.DataFrame(rows)


def _profile(d: pd.DataFrame) -> pd.DataFrame:
    g = d.groupby("pid", sort=False)
    return pd.DataFrame(
        {
            "age_months": g["age_months"].first(),
            "sex": g["sex"].first(),
            "hours": g["hour"].max() + 1,
            "hr_mean": g["hr"].mean(),
            "died": g["died"].max(),
        }
    ).reset_index(drop=True)


def _bootstrap(key, data, options, model=None, params=None):
    """Whole patients drawn with replacement, renumbered."""
    del model, params
    ids = data["pid"].unique()
    n = int(options.get("n") or len(ids))
    pick = np.asarray(jax.random.choice(key, len(ids), (n,)))
    parts = [data[data["pid"] == ids[j]].assign(pid=i + 1) for i, j in enumerate(pick)]
    return pd.concat(parts, ignore_index=True), {"n": n}


def _unused(*args, **kwargs):
    raise AssertionError("not needed by the evaluation layer")


WARD = usecases.UseCase(
    name="ward",
    unit="patient",
    roles=Roles(
        use_case="ward",
        patient_id="pid",
        identifiers=("pid",),
        quasi_identifiers={
            "age_months": lambda: paediatric_age("months", "age_months"),
            "sex": lambda: suppress_only("sex"),
        },
        sensitive=("died",),
        sensitive_rule={"died": "max"},
    ),
    profile=_profile,
    profile_bounds={
        "age_months": (0, 216, 12, "log1p"),
        "sex": ["F", "M"],
        "hours": (1, 10, 9),
        "hr_mean": (40, 220, 18),
        "died": [0, 1],
    },
    may_be_missing=frozenset(),
    attack_columns=(("age_months", "sex"), "died"),
    generator="bootstrap",
    synthesise=_bootstrap,
    utility=None,
    load=_unused,
    simulate=_unused,
    site_names=lambda n: [f"ward_{i + 1}" for i in range(n)],
    simulate_default=_unused,
    task=None,
    outcome=("died", ("age_months", "sex", "hr_mean")),
)


def test_registered_only_inside_the_block():
    assert "ward" not in usecases.names()
    with usecases.registered(WARD):
        assert usecases.get("ward") is WARD
        assert usecases.names()[-1] == "ward"
        with pytest.raises(usecases.UseCaseError, match="already registered"):
            with usecases.registered(WARD):
                pass
    with pytest.raises(
        usecases.UseCaseError, match="'ward' is not one of haemophilia, picu, cardiac"
    ):
        usecases.get("ward")


def test_every_source_and_the_scorecard_without_editing_lower_layers():
    key = jax.random.key(7)
    data = _ward(key, 90)
    check_table(data, WARD.roles)
    train, hold = split_patients(key, data, WARD, 0.4)
    assert train["pid"].nunique() == 54 and hold["pid"].nunique() == 36
    p = profile(WARD, train)
    assert len(p) == 54 and list(p.columns) == list(WARD.profile_bounds)
    specs = default_sources(WARD, k=5)
    assert [s.method for s in specs] == ["none", "lattice", "bootstrap", "mst"]
    derived = [
        derive(jax.random.fold_in(key, i), WARD, train, s)
        for i, s in enumerate(specs + [SourceSpec("c", "synthetic", "copula")])
    ]
    anon = derived[1]
    # the anonymiser read the roles from the object: >= 5 patients per class
    assert anon.report["k"] >= 5
    assert (
        anon.data.groupby(["age_months_band", "sex_band"])["pid"].nunique().min() >= 5
    )
    assert derived[2].data["pid"].nunique() == 54
    assert derived[3].data is None and derived[3].meta["unit_of_privacy"] == "patient"
    ds = score_sources(
        jax.random.fold_in(key, 99), WARD, train, hold, derived, n_attacks=30
    )
    assert list(ds["source"].values) == [
        "real",
        "anonymised",
        "synthetic",
        "synthetic-mst",
        "c",
    ]
    assert ds.attrs["use_case"] == "ward"
    auroc = ds["value"].sel(metric="outcome_auroc").to_series()
    # HR drives death here: the real data's model ranks held-out patients well
    assert auroc["real"] > 0.7
    assert {"k_anonymity"} <= set(ds["metric"].values)


def test_a_name_is_refused_below_the_use_cases():
    data = _ward(jax.random.key(1), 30)
    with pytest.raises(ValueError, match=r"usecases\.get\('ward'\)"):
        split_patients(jax.random.key(1), data, "ward", 0.4)
