"""Stated power of the scorecard: an underpowered run is inconclusive, a
well-powered one conclusive; uninformative metrics say so; required n."""

import math

import jax
import pytest

from phems_clinical.evaluation import scorecard as S
from phems_clinical.evaluation import scorecard_report as R
from phems_clinical.privacy.attacks import residual_risk

AUX = ["age", "sex", "weight", "ward"]
RISKS = ("singling_out_risk", "linkability_risk", "inference_risk")


def test_needed_n_hand_worked():
    # v = 0.05 (0-0.12) at n = 20, limit 0.09: h = 0.07, gap 0.04
    assert S.needed_n(0.05, 0.0, 0.12, 20, 0.09) == math.ceil(20 * (0.07 / 0.04) ** 2)
    assert S.needed_n(0.09, 0.0, 0.2, 20, 0.09) == math.inf
    assert math.isnan(S.needed_n(0.05, math.nan, 0.1, 20, 0.09))


def test_needed_n_settles_a_wilson_risk():
    # the residual risk at n attacks, then at the required n with the same rates:
    # the interval then (just about) excludes the 0.09 limit
    n = 40
    r = residual_risk(6, n, 4, n)  # attack 15 %, control 10 %
    assert r.ci_low < 0.09 < r.ci_high  # inconclusive at 40 attacks
    req = S.needed_n(r.value, r.ci_low, r.ci_high, n, 0.09)
    big = residual_risk(
        round(6 / n * req * 4), int(req * 4), round(4 / n * req * 4), int(req * 4)
    )
    assert big.ci_high < 0.09 or big.ci_low > 0.09  # 4x the required n: settled
    assert req > n


def _card(toy_table, n, seed):
    full = toy_table(seed, 2 * n)
    train, control = (
        full.iloc[:n].reset_index(drop=True),
        full.iloc[n:].reset_index(drop=True),
    )
    indep = toy_table(seed + 100, n)  # same generator, none of the training rows
    key = jax.random.key(seed)
    scores = {
        "real": S.privacy_scores(
            key,
            train,
            control,
            train.copy(),
            aux_cols=AUX,
            secret="diagnosis",
            n_attacks=n,
        ),
        "synthetic": S.privacy_scores(
            key, train, control, indep, aux_cols=AUX, secret="diagnosis", n_attacks=n
        ),
    }
    fid = S.fidelity_scores(key, train, indep, n_permutations=5, n_boot=20)
    scores["synthetic"].update(fid)
    # the real row's fidelity: its held-out half against its training half
    scores["real"].update(
        S.fidelity_scores(key, train, control, n_permutations=5, n_boot=20)
    )
    meta = {"real": {"kind": "real"}, "synthetic": {"kind": "synthetic"}}
    return S.build_scorecard(scores, sources_meta=meta, use_case="toy", seed=seed)


def test_underpowered_run_is_inconclusive_well_powered_conclusive(toy_table):
    small = _card(toy_table, 12, 1)
    st = S.assess(small)["status"].sel(source="synthetic")
    for m in RISKS:  # an independent sample of 12: never a pass
        assert st.sel(metric=m) in ("inconclusive", "uninformative"), m
    note = str(
        S.assess(small)["note"]
        .sel(source="synthetic", metric="linkability_risk")
        .values
    )
    assert "spans the 0.09 limit" in note and "would settle it" in note
    # the pMSE ratio cannot flag anything with 12 + 12 rows
    assert st.sel(metric="pmse_ratio_perm") == "uninformative"
    line = R.summary_lines(small)["synthetic"]
    assert "inconclusive" in line and "risks low" not in line
    # the real row is the reference (what an unprotected release would leak)
    ref = S.assess(small).sel(source="real")
    assert (ref["status"].sel(metric=list(RISKS)) == "reference").all()
    assert "unprotected release" in str(
        ref["note"].sel(metric="linkability_risk").values
    )

    large = _card(toy_table, 400, 2)
    st = S.assess(large)["status"].sel(source="synthetic")
    assert st.sel(metric="singling_out_risk") == "ok"
    assert st.sel(metric="linkability_risk") == "ok"
    assert st.sel(metric="pmse_ratio_perm") == "ok"


@pytest.mark.parametrize("n", [12])
def test_uninformative_pmse_names_the_size(toy_table, n):
    full = toy_table(3, 2 * n)
    sc = S.fidelity_scores(
        jax.random.key(0), full.iloc[:n], full.iloc[n:], n_permutations=5, n_boot=5
    )
    why = sc["pmse_ratio_perm"].uninformative
    assert why.startswith(f"uninformative at n = {n} + {n} rows")
