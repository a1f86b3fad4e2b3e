"""Attack risks pooled over hospitals (scorecard.pooled_risk, used by the phems run
report): equal to the anonymeter risk of the summed counts; conclusive where the
sites together have enough attacks, inconclusive where they do not; the counts
survive the scorecard."""

import math

import pytest

from phems_clinical.evaluation.scorecard import (
    Score,
    ScorecardInputError,
    as_score,
    assess,
    build_scorecard,
    pooled_risk,
)
from phems_clinical.privacy.attacks import residual_risk, wilson_rate


@pytest.mark.parametrize("n", [5, 20, 100])
def test_counts_recovered_from_a_risk(n):
    for s in range(n + 1):
        sc = as_score(residual_risk(s, n, n - s, n))
        assert (sc.successes, sc.control_successes, sc.n) == (s, n - s, n)


def test_pooled_equals_wilson_on_summed_counts():
    sites = [(3, 20, 1), (0, 20, 0), (5, 25, 2), (1, 15, 1)]  # (s, n, control)
    p = pooled_risk([as_score(residual_risk(s, n, c, n)) for s, n, c in sites])
    S, N, C = 9, 80, 4
    # by hand: Wilson centres a, c and half-widths, anonymeter risk and error
    a, ea = wilson_rate(S, N)
    c, ec = wilson_rate(C, N)
    value = (a - c) / (1 - c)
    err = math.hypot(ea / (1 - c), ec * (a - 1) / (1 - c) ** 2)
    assert p.value == pytest.approx(value, abs=1e-12)
    assert (p.ci_low, p.ci_high) == pytest.approx(
        (max(value - err, 0.0), value + err), abs=1e-12
    )  # clipped to [0, 1]
    assert (p.n, p.successes, p.control_successes) == (N, S, C)


def test_pooled_needs_counts():
    with pytest.raises(ScorecardInputError, match=r"position \[1\]"):
        pooled_risk(
            [
                Score(0.0, n=10, successes=0, control_successes=0),
                Score(0.1, 0.0, 0.3, 10),
            ]
        )


def _verdict(score):
    card = build_scorecard(
        {"anon": {"singling_out_risk": score}},
        sources_meta={"anon": {"kind": "anonymised"}},
        use_case="haemophilia",
        seed=0,
    )
    return str(
        assess(card)["status"].sel(source="anon", metric="singling_out_risk").item()
    )


def test_pooling_makes_a_verdict_conclusive_and_underpowered_stays_inconclusive():
    # the default run: 4 training hospitals, 20 attacks each, no attack succeeds
    site = as_score(residual_risk(0, 20, 0, 20))
    assert _verdict(site) == "inconclusive"  # one site: 0-0.12 spans 0.09
    assert _verdict(pooled_risk([site] * 4)) == "ok"
    # two hospitals of 5 attacks: still too few
    small = as_score(residual_risk(0, 5, 0, 5))
    assert _verdict(pooled_risk([small] * 2)) == "inconclusive"
    # a leaky mechanism is conclusively outside target once pooled
    leaky = as_score(residual_risk(19, 20, 1, 20))
    assert _verdict(pooled_risk([leaky] * 4)) == "flagged"


def test_counts_kept_on_the_scorecard():
    card = build_scorecard(
        {"anon": {"linkability_risk": residual_risk(3, 20, 1, 20)}},
        sources_meta={"anon": {"kind": "anonymised"}},
        use_case="haemophilia",
        seed=0,
    )
    c = card.sel(source="anon", metric="linkability_risk")
    assert (float(c.successes), float(c.control_successes), float(c.n)) == (3, 1, 20)
