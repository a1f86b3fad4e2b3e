"""experiments/dosing_validation/validate.py: every shipped product is validated,
designs and verdicts follow the stated rules, and a tiny run works end to end."""

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "dosing_validation" / "validate.py"


@pytest.fixture(scope="module")
def v():
    spec = importlib.util.spec_from_file_location("dosing_validate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dosing_validate"] = mod
    spec.loader.exec_module(mod)
    return mod


def _yaml_products() -> dict[str, dict]:
    """FVIII/FIX entries read straight from configs/model (not via the library)."""
    out = {}
    for path in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        if spec.get("citation") and spec.get("factor") in ("FVIII", "FIX"):
            out[path.stem] = spec
    return out


def test_every_shipped_product_is_validated_against_its_own_model(v):
    shipped = _yaml_products()
    assert len(shipped) >= 10
    scenarios = v.build_scenarios(v.library_products())
    main = {s.name: s for s in scenarios if s.group == "main"}
    assert set(main) == set(shipped)
    assert all(s.sim == s.prior == s.name for s in main.values())


def test_models_of_the_same_product_are_crossed_both_ways(v):
    shipped = _yaml_products()
    names = {s.name for s in v.build_scenarios(v.library_products())}
    pairs = [
        (a, b)
        for a in shipped
        for b in shipped
        if a != b
        and shipped[a].get("inn")
        and str(shipped[a]["inn"]).lower() == str(shipped[b].get("inn")).lower()
    ]
    assert pairs, "the library has no two models of one INN"
    for a, b in pairs:
        assert f"{a} → {b}" in names
    if {"alprolix", "koopman2024"} <= set(shipped):
        assert "koopman2024 → alprolix" in names  # Koopman's external validation


def test_designs_isth_windows_and_published(v):
    adv, elo = v.load_product("advate"), v.load_product("eloctate")
    labels = [d.label for d in v.designs_for(adv)]
    assert labels[:4] == ["0 (prior only)", "1 (48 h)", "2 (4/48 h)", "3 (4/24/48 h)"]
    assert [d.label for d in v.designs_for(elo)][2] == "2 (4/72 h)"
    assert [d.id for d in v.designs_for(elo)] == ["isth0", "isth1", "isth2", "isth3"]
    pub = {
        p: [d.id for d in v.designs_for(v.load_product(p)) if d.windows]
        for p in ("advate", "alprolix", "koopman2024", "pdfix_brekkan2016")
    }
    assert pub == {
        "advate": ["pub:myPKFiT 2-point"],
        "alprolix": ["pub:Koopman peak/mid/trough"],
        "koopman2024": ["pub:Koopman peak/mid/trough"],
        "pdfix_brekkan2016": ["pub:Preijers LSS"],
    }
    for d in v.PUBLISHED_DESIGNS:
        ends = [t for w in d.windows for t in w]
        assert ends == sorted(ends) and 0 < ends[0] and ends[-1] < 200


def _fake_results(cl_imprec, t_half_bias, t1_cov, n=1000):
    rows = []
    base = dict(scenario="advate", sim="advate", prior="advate", group="main")
    for did, label, k in (("isth0", "0 (prior only)", 0), ("isth2", "2 (4/48 h)", 2)):
        for x in ("CL", "t_half_head", "t_1"):
            vals = {
                "bias_mean_pct": 1.0,
                "bias_median_pct": 0.5,
                "rrmse_pct": 8.0,
                "coverage90_pct": 90.0,
                "n": n,
            }
            if did == "isth0":
                vals["rrmse_pct"] = 30.0
            elif x == "CL":
                vals["rrmse_pct"] = cl_imprec
            elif x == "t_half_head":
                vals["bias_mean_pct"] = t_half_bias
            else:
                vals["coverage90_pct"] = t1_cov
            rows += [
                dict(
                    base,
                    section="accuracy",
                    design_id=did,
                    n_samples=k,
                    design=label,
                    quantity=x,
                    point="median",
                    metric=m,
                    value=val,
                )
                for m, val in vals.items()
            ]
        rows += [
            dict(
                base,
                section="design",
                design_id=did,
                n_samples=k,
                design=label,
                quantity="",
                point="",
                metric=m,
                value=val,
            )
            for m, val in (("pct_with_blq", 0.0), ("last_sample_median_h", 48.0))
        ]
    rows += [
        dict(
            base,
            section="scenario",
            design_id="",
            n_samples=-1,
            design="",
            quantity="",
            point="",
            metric=m,
            value=val,
        )
        for m, val in (("t1_true_median_h", 70.0), ("cl_true_over_prior_typical", 1.0))
    ]
    return pd.DataFrame(rows)


def test_verdict_rules_at_the_boundaries(v):
    sc = v.Scenario("advate", "advate", "advate", False, "main")
    # at the limits: imprecision 11.9 % (Preijers' upper end), |bias| 5 %, 85 %
    ok = v.design_rows(v.Index(_fake_results(11.9, -5.0, 85.0)), sc)
    assert [r[4] for r in ok] == ["—", "meets"]
    bad = v.design_rows(v.Index(_fake_results(12.0, 5.1, 84.9)), sc)
    label, did, n, cells, verdict, reasons = bad[1]
    assert verdict == "falls short"
    assert cells == [
        "+1.0 / **12.0** / 90.0",
        "**+5.1** / 8.0 / 90.0",
        "+1.0 / 8.0 / **84.9**",
    ]
    assert [r.split(":")[0] for r in reasons] == ["CL", "t½", "time to 1 IU/dL"]
    assert all(len(r.split(": ", 1)[1]) > 10 for r in reasons)


def test_coverage_tolerance_widens_for_small_cohorts(v):
    assert v.coverage_range(1000) == (85.0, 95.0)
    lo, hi = v.coverage_range(60)
    assert hi - 90 == pytest.approx(2.6 * 100 * math.sqrt(0.09 / 60))
    assert lo == pytest.approx(180 - hi)


@pytest.mark.slow
def test_tiny_run_end_to_end(v, tmp_path):
    """One product (Jivi, 1-compartment: a short compile), 24 patients."""
    assert (
        v.main(
            [
                "--scenarios",
                "jivi",
                "--n",
                "24",
                "--draws",
                "60",
                "--nuts-n",
                "0",
                "--no-reweight",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    df = pd.read_csv(tmp_path / "results.csv")
    acc = df[(df.section == "accuracy") & (df.point == "median")]
    assert set(acc.design_id) == {"isth0", "isth1", "isth2", "isth3"}
    imprec = acc[(acc.quantity == "CL") & (acc.metric == "rrmse_pct")].set_index(
        "design_id"
    )["value"]
    assert imprec["isth3"] < imprec["isth0"]  # three levels inform CL
    text = (tmp_path / "results.md").read_text()
    assert "### jivi" in text and "equal `pk.dosing.recommend`'s" in text
