"""Tests of the data-source scorecard (phems_clinical.evaluation.scorecard[_report])."""

import base64
import html
import json
import math
import re
from html.parser import HTMLParser

import jax
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from phems_clinical.evaluation import scorecard as S
from phems_clinical.evaluation import scorecard_report as R

AUX = ["age", "sex", "weight", "ward"]
PRIVACY = (
    "singling_out_risk",
    "singling_out_risk_multivariate",
    "linkability_risk",
    "inference_risk",
)


class _Cells(HTMLParser):
    """Collects scorecard cells: (source, metric) -> (status, text)."""

    def __init__(self):
        super().__init__()
        self.cells, self._cur, self._buf = {}, None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-metric" in a:
            self._cur = (a["data-source"], a["data-metric"], a["data-status"])
            self._buf = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cur:
            src, m, st = self._cur
            self.cells[(src, m)] = (st, " ".join("".join(self._buf).split()))
            self._cur = None

    def handle_data(self, data):
        if self._cur:
            self._buf.append(data)


def cells_of(page: str) -> dict:
    p = _Cells()
    p.feed(page)
    return p.cells


META = {
    "real": {"kind": "real", "n_rows": 300},
    "copy": {"kind": "synthetic", "generator": "verbatim copy", "n_rows": 300},
    "independent": {
        "kind": "synthetic",
        "generator": "MST",
        "epsilon": 1.5,
        "delta": 1e-6,
        "unit_of_privacy": "patient",
        "n_rows": 300,
    },
}


@pytest.fixture(scope="module")
def scored(toy_table):
    full = toy_table(1, 600)
    train = full.iloc[:300].reset_index(drop=True)
    control = full.iloc[300:].reset_index(drop=True)
    indep = toy_table(2, 300)  # same generator, none of the training rows
    key = jax.random.key(3)
    kw = dict(aux_cols=AUX, secret="diagnosis", n_attacks=300)
    p_copy = S.privacy_scores(key, train, control, train.copy(), **kw)
    p_ind = S.privacy_scores(key, train, control, indep, **kw)
    scores = {
        "real": {"auroc": 0.80},
        "copy": {**p_copy, "auroc": 0.79},
        "independent": {**p_ind, "auroc": 0.74},
    }
    ds = S.build_scorecard(scores, sources_meta=META, use_case="picu", seed=3)
    return train, control, indep, p_copy, p_ind, ds


def test_verbatim_copy_high_risk_and_flagged(scored):
    *_, p_copy, _, ds = scored
    for m in PRIVACY:
        assert p_copy[m].value > 0.9, m
        assert p_copy[m].ci_low > S.RISK_THRESHOLD, m
    assert p_copy["mia_auc"].value > 0.95
    cells = cells_of(R.render_scorecard_html(ds))
    for m in PRIVACY:
        st, text = cells[("copy", m)]
        assert st == "flagged"
        assert "above 0.09 threshold" in text and "outside target" in text
    assert "privacy risks HIGH" in R.summary_lines(ds)["copy"]


def test_inline_figure_only_with_attack_risks(scored):
    *_, ds = scored
    page = R.render_scorecard_html(ds)
    png = base64.b64decode(
        re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "data:image" not in R.render_scorecard_html(ds, figure=False)
    assert R.privacy_figure(ds.sel(metric=["auroc", "mia_auc"])) is None
    assert "<script" not in page and "http" not in page  # self-contained


def test_independent_sample_low_and_not_flagged(scored):
    *_, p_ind, ds = scored
    for m in PRIVACY:
        assert p_ind[m].value < S.RISK_THRESHOLD, m
    assert abs(p_ind["mia_auc"].value - 0.5) < 0.06
    assert p_ind["mia_auc"].ci_low < 0.5 < p_ind["mia_auc"].ci_high
    assert abs(p_ind["dcr_share"].value - 0.5) < 0.06
    cells = cells_of(R.render_scorecard_html(ds))
    status = {}
    for m in (*PRIVACY, "mia_auc", "dcr_share"):
        st, text = cells[("independent", m)]
        status[m] = st
        # never outside target; a risk whose interval still reaches 0.09 at 300
        # attacks is inconclusive, not a pass
        assert st in ("ok", "inconclusive") and "outside" not in text, m
        p = p_ind[m]
        assert (st == "ok") == (
            p.ci_high <= (0.6 if m in ("mia_auc", "dcr_share") else S.RISK_THRESHOLD)
        ), m
    n_ok = sum(s == "ok" for s in status.values())
    assert n_ok >= 4
    line = R.summary_lines(ds)["independent"]
    assert line.startswith("independent (synthetic, MST): privacy ")
    assert "outside target" not in line
    assert ("risks low" in line) == (n_ok == 6)


def test_privacy_scores_reproducible_and_bad_input(scored):
    train, control, indep, *_ = scored
    small = dict(aux_cols=AUX, secret="diagnosis", n_attacks=50)
    a = S.privacy_scores(jax.random.key(9), train, control, indep, **small)
    b = S.privacy_scores(jax.random.key(9), train, control, indep, **small)
    assert a == b
    with pytest.raises(S.ScorecardInputError, match=r"secret.*'nope'"):
        S.privacy_scores(jax.random.key(0), train, control, indep, secret="nope")
    with pytest.raises(S.ScorecardInputError, match=r"control.*\['crp'\]"):
        S.privacy_scores(jax.random.key(0), train, control.drop(columns="crp"), indep)


def test_netcdf_round_trip_exact(scored, tmp_path):
    *_, ds = scored
    ds2 = S.build_scorecard(
        {
            "real": {"pk_bias_cl": 0.0, "k_anonymity": 5},
            "anon <k=5>": {
                "pk_bias_cl": S.Score(0.12, 0.05, 0.2),
                "k_anonymity": 5,
                "suppressed_share": 0.02,
            },
            "synth": {"pk_bias_cl": -0.3},
        },
        sources_meta={
            "real": {"kind": "real"},
            "anon <k=5>": {"kind": "anonymised", "generator": "lattice"},
            "synth": {
                "kind": "synthetic",
                "epsilon": 2.0,
                "unit_of_privacy": "patient",
                "method": "mst",
                "seconds": np.float64(1.5),
                "note": None,
            },
        },
        use_case="haemophilia",
        seed=11,
    )
    for d in (ds, ds2):
        nc, page = R.write_scorecard(d, tmp_path / d.attrs["use_case"])
        with xr.open_dataset(nc, engine="h5netcdf") as back:
            back = back.load()
        xr.testing.assert_identical(back, d)
        for c in ("caption", "reference", "kind", "generator", "unit"):
            assert back[c].values.tolist() == d[c].values.tolist()
        assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert np.isnan(ds2["value"].sel(source="synth", metric="k_anonymity"))
    assert str(ds2["generator"].sel(source="synth").values) == "mst"
    assert json.loads(str(ds2["extra"].sel(source="synth").values)) == {
        "method": "mst",
        "note": None,
        "seconds": 1.5,
    }
    cell = ds2.sel(source="anon <k=5>", metric="pk_bias_cl")
    assert (float(cell.value), float(cell.ci_low), float(cell.ci_high)) == (
        0.12,
        0.05,
        0.2,
    )
    st, text = cells_of(R.render_scorecard_html(ds2))[("anon <k=5>", "pk_bias_cl")]
    assert st == "ok" and text.startswith("0.12 (95 % CI 0.05\u20130.2)")
    st, text = cells_of(R.render_scorecard_html(ds2))[("synth", "pk_bias_cl")]
    assert st == "inconclusive" and "no interval" in text  # point value only


def test_html_captions_dp_not_applicable_and_escaping(scored):
    *_, ds = scored
    ds = S.build_scorecard(
        {
            **{
                str(s): {
                    m: float(ds["value"].sel(source=s, metric=m))
                    for m in ds["metric"].values
                    if not np.isnan(ds["value"].sel(source=s, metric=m))
                }
                for s in ds["source"].values
            },
            "<script>alert(1)</script>": {"k_anonymity": 3},
        },
        sources_meta={**META, "<script>alert(1)</script>": {"kind": "anonymised"}},
        use_case="picu",
        seed=3,
    )
    page = R.render_scorecard_html(ds, title="Release review", notes=["a & b"])
    text = html.unescape(page)
    for cap in ds["caption"].values:
        assert str(cap) in text
    for ref in ds["reference"].values:
        assert str(ref) in text
    assert "\u03b5 = 1.5, \u03b4 = 1e-06" in page and "unit: patient" in page
    assert page.count('<table class="ranking"') == 1  # derived sources ranked
    n_tables = page.count('<table class="group-')
    assert n_tables == 2  # privacy and utility; no fidelity metric here
    assert page.count("not DP") == 3 * n_tables  # 3 non-DP sources per table
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a &amp; b" in page
    cells = cells_of(page)
    st, text = cells[("independent", "k_anonymity")]  # synthetic: no k
    assert st == "not applicable" and text == "not applicable"
    st, text = cells[("<script>alert(1)</script>", "k_anonymity")]
    assert st == "flagged" and "below 12 threshold" in text


def test_anonymity_scores_hand_worked():
    # classes (age band, sex): (1-4, F) x2, (1-4, M) x3, (5-9, F) x3; n = 8
    df = pd.DataFrame(
        {
            "age_band": ["1-4"] * 5 + ["5-9"] * 3,
            "sex": ["F", "F", "M", "M", "M", "F", "F", "F"],
            "diagnosis": ["A", "B", "A", "A", "B", "A", "B", "C"],
        }
    )
    sc = S.anonymity_scores(df, ["age_band", "sex"], "diagnosis")
    assert sc["k_anonymity"].value == 2
    assert sc["prosecutor_risk_max"].value == pytest.approx(1 / 2)
    assert sc["prosecutor_risk_max"].value == 1 / sc["k_anonymity"].value
    assert sc["prosecutor_risk_mean"].value == pytest.approx(3 / 8)
    assert sc["records_at_risk"].value == 1.0  # every class has <= 11 records
    assert sc["marketer_risk"].value == pytest.approx(3 / 8)
    assert sc["l_diversity"].value == 2
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert sc["l_diversity_entropy"].value == pytest.approx(math.exp(h))
    # overall (A, B, C) = (4, 3, 1)/8; class (5-9, F) = (1, 1, 1)/3: TV = 10/48
    assert sc["t_closeness"].value == pytest.approx(10 / 48)
    assert sc["suppressed_share"].value == 0.0
    # negative check: merging sex removes the size-2 class, so k and risk move
    merged = S.anonymity_scores(df.assign(sex="*"), ["age_band", "sex"])
    assert merged["k_anonymity"].value == 3
    assert merged["prosecutor_risk_max"].value == pytest.approx(1 / 3)
    ds = S.build_scorecard(
        {"anon": sc},
        sources_meta={"anon": {"kind": "anonymised"}},
        use_case="toy",
        seed=0,
    )
    flags = S.assess(ds)["status"].sel(source="anon")
    assert flags.sel(metric="t_closeness") == "flagged"  # 0.208 > 0.2
    assert flags.sel(metric="l_diversity") == "ok"  # 2 >= 2
    assert flags.sel(metric="prosecutor_risk_max") == "flagged"


def test_unknown_metric_names_them_and_extra_metrics():
    with pytest.raises(
        S.UnknownMetricError, match=r"\['auc_roc', 'singling_out'\]"
    ) as err:
        S.build_scorecard(
            {"a": {"auc_roc": 0.7, "auroc": 0.7, "singling_out": 0.1}},
            sources_meta={"a": {"kind": "real"}},
            use_case="x",
            seed=0,
        )
    assert isinstance(err.value, ValueError)
    spec = S.MetricSpec(
        "utility",
        "higher",
        1.0,
        0.5,
        math.inf,
        "absolute",
        "AUC (ROC)",
        "Custom AUC of the sepsis model.",
        "ours",
    )
    ds = S.build_scorecard(
        {"a": {"auc_roc": S.Score(0.4, 0.35, 0.45, 200)}},
        sources_meta={"a": {"kind": "synthetic"}},
        use_case="x",
        seed=0,
        extra_metrics={"auc_roc": spec},
    )
    assert str(ds["caption"].sel(metric="auc_roc").values) == spec.caption
    assert (
        S.assess(ds)["note"].sel(source="a", metric="auc_roc") == "below 0.5 threshold"
    )
    spec_pk = S.metric_spec("pk_bias_v1")
    assert spec_pk.label == "PK bias V1" and "population V1" in spec_pk.caption
    with pytest.raises(S.UnknownMetricError):
        S.metric_spec("pk_bias_")


def test_relative_utility_flags():
    def sc(v, h=0.005):
        return S.Score(v, v - h, v + h, 400.0)

    ds = S.build_scorecard(
        {
            "real": {
                "auroc": sc(0.80),
                "brier": sc(0.10),
                "calibration_slope": sc(1.0),
            },
            "good": {
                "auroc": sc(0.78),
                "brier": sc(0.11),
                "calibration_slope": sc(0.9),
            },
            "poor": {
                "auroc": sc(0.70),
                "brier": sc(0.15),
                "calibration_slope": sc(1.5),
            },
            "wide": {"auroc": sc(0.76, 0.05), "brier": 0.105},
        },
        sources_meta={
            "real": {"kind": "real"},
            "good": {"kind": "synthetic"},
            "poor": {"kind": "anonymised"},
            "wide": {"kind": "synthetic"},
        },
        use_case="picu",
        seed=0,
    )
    a = S.assess(ds)
    st = a["status"]
    # the real source is the reference throughout, never judged as a release
    assert (st.sel(source="real") == "reference").all()
    # -0.04 +- hypot(0.05, 0.005) spans the -0.05 limit; a point value alone
    # (brier) is no verdict either
    assert st.sel(source="wide", metric="auroc") == "inconclusive"
    assert st.sel(source="wide", metric="brier") == "inconclusive"
    assert "no interval" in str(a["note"].sel(source="wide", metric="brier").values)
    assert (st.sel(source="good") == "ok").all()
    assert (st.sel(source="poor") == "flagged").all()
    assert str(a["note"].sel(source="poor", metric="auroc").values).startswith(
        "0.1 below real data (0.8)"
    )
    assert (
        str(a["note"].sel(source="poor", metric="calibration_slope").values)
        == "above 1.2 threshold"
    )
    lines = R.summary_lines(ds)
    assert "utility close to real data" in lines["good"]
    assert "reference" in lines["real"] and "HIGH" not in lines["real"]
    assert "utility low (3 of 3 checks outside target" in lines["poor"]


def test_bad_sources_meta_and_scores():
    sc = {"a": {"auroc": 0.7}}
    cases = [
        ({}, r"no entry for source\(s\) \['a'\]"),
        ({"a": {"kind": "fake"}}, r"\['kind'\]: expected one of"),
        ({"a": {"kind": "synthetic", "epsilon": 0.0}}, r"'epsilon'\]: must be > 0"),
        ({"a": {"kind": "synthetic", "epsilon": 1.0, "delta": 1.0}}, r"'delta'"),
        ({"a": {"kind": "real", "sizes": [1, 2]}}, r"\['sizes'\]: extra metadata"),
    ]
    for meta, msg in cases:
        with pytest.raises(S.ScorecardInputError, match=msg):
            S.build_scorecard(sc, sources_meta=meta, use_case="x", seed=0)
    ok = {"a": {"kind": "real"}}
    with pytest.raises(S.ScorecardInputError, match="seed: expected an integer"):
        S.build_scorecard(sc, sources_meta=ok, use_case="x", seed=None)
    with pytest.raises(S.ScorecardInputError, match="use_case"):
        S.build_scorecard(sc, sources_meta=ok, use_case="", seed=0)
    with pytest.raises(S.ScorecardInputError, match="no source has any metric"):
        S.build_scorecard({"a": {}}, sources_meta=ok, use_case="x", seed=0)
    with pytest.raises(S.ScorecardInputError, match="n_permutations"):
        S.fidelity_scores(
            jax.random.key(0),
            pd.DataFrame({"x": [1.0, 2.0]}),
            pd.DataFrame({"x": [1.0, 2.0]}),
            n_permutations=0,
        )
    with pytest.raises(S.ScorecardInputError, match=r"scores\['a'\]\['auroc'\]"):
        S.build_scorecard(
            {"a": {"auroc": "high"}},
            sources_meta={"a": {"kind": "real"}},
            use_case="x",
            seed=0,
        )


def test_fidelity_scores_detect_broken_relationships(scored):
    train, _, indep, *_ = scored
    rng = np.random.default_rng(5)
    broken = indep.copy()
    for c in ("age", "weight", "ward"):  # marginals kept, relationships destroyed
        broken[c] = rng.permutation(broken[c].to_numpy())
    key = jax.random.key(1)
    good = S.fidelity_scores(key, train, indep, n_permutations=5)
    bad = S.fidelity_scores(key, train, broken, n_permutations=5)
    assert set(good) == set(S.FIDELITY_METRICS)
    ds = S.build_scorecard(
        {"independent": good, "broken": bad},
        sources_meta={
            "independent": {"kind": "synthetic"},
            "broken": {"kind": "synthetic"},
        },
        use_case="picu",
        seed=1,
    )
    st = S.assess(ds)["status"]
    assert (st.sel(source="independent") == "ok").all()
    assert bad["column_shapes"].value > 0.9  # marginals alone look fine ...
    for m in ("mean_abs_diff_pearson", "detection_auc", "pmse_ratio_perm"):
        assert st.sel(source="broken", metric=m) == "flagged", m  # ... pairs do not
    assert "fidelity moderate" in R.summary_lines(ds)["broken"]


def test_utility_names_of_the_model_helpers_are_registered():
    names = [
        "auroc",
        "auprc",
        "brier",
        "calibration_slope",
        "c_index",
        "brier_death_30d",
        "auroc_cicu_7d",
        "pk_bias_cl",
        "pk_bias_v",
        "forecast_mdape",
        "forecast_mdpe",
        "forecast_within_20",
    ]
    for n in names:
        assert S.metric_spec(n).group == "utility", n
    ds = S.build_scorecard(
        {
            "real": dict.fromkeys(names, 0.5),
            "syn": {"k_anonymity": 3.0, "column_shapes": 0.9},
        },
        sources_meta={"real": {"kind": "real"}, "syn": {"kind": "synthetic"}},
        use_case="all",
        seed=0,
    )
    groups = [str(g) for g in ds["group"].values]
    assert groups == sorted(groups, key=S.GROUPS.index)  # fidelity, utility, privacy
    assert list(ds["metric"].values[1:5]) == [
        "auroc",
        "auprc",
        "brier",
        "calibration_slope",
    ]


def test_utility_scores_adapter_renames_and_rescales():
    raw = {
        "auroc": 0.81,
        "auroc_ci_low": 0.75,
        "auroc_ci_high": 0.86,
        "threshold": 0.3,
        "n_stays": 40.0,
        "c_death": 0.7,
        "auc_cicu_gt7": 0.66,
        "rel_bias[THETA(CL)]": 0.12,
        "rel_bias[CV_IIV(V1)]": -0.3,
        "rel_bias[SIGMA(additive)]": 0.5,
        "pass[THETA(CL)]": 1.0,
        "mdape": 18.0,
        "mdape_ci_low": 15.0,
        "mdape_ci_high": 22.0,
        "mpe": -4.0,
        "within20": 0.55,
        "delta_mdape": 2.0,
    }
    sc = S.utility_scores(raw)
    expected = {
        "auroc": S.Score(0.81, 0.75, 0.86),
        "c_index": S.Score(0.7),
        "auroc_cicu_7d": S.Score(0.66),
        "pk_bias_cl": S.Score(0.12),
        "pk_bias_cv_iiv_v1": S.Score(-0.3),
        "forecast_mdape": S.Score(18.0, 15.0, 22.0),  # % as in results.nc
        "forecast_mdpe": S.Score(-4.0),
        "forecast_within_20": S.Score(0.55),
    }
    assert sc.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_allclose(
            sc[k][:3], v[:3], rtol=1e-12, err_msg=k
        )  # NaN == NaN
    ds = S.build_scorecard(
        {"syn": sc}, sources_meta={"syn": {"kind": "synthetic"}}, use_case="all", seed=0
    )
    st = S.assess(ds)["status"].sel(source="syn")
    # no interval: a point value is no verdict, whichever side of the limit
    assert st.sel(metric="pk_bias_cl") == "inconclusive"
    assert st.sel(metric="pk_bias_cv_iiv_v1") == "inconclusive"
    sc2 = {
        "pk_bias_cl": S.Score(0.12, 0.05, 0.18),
        "pk_bias_cv_iiv_v1": S.Score(-0.3, -0.38, -0.22),
    }
    ds = S.build_scorecard(
        {"syn": sc2},
        sources_meta={"syn": {"kind": "synthetic"}},
        use_case="all",
        seed=0,
    )
    st = S.assess(ds)["status"].sel(source="syn")
    assert st.sel(metric="pk_bias_cl") == "ok"
    assert st.sel(metric="pk_bias_cv_iiv_v1") == "flagged"  # |-0.3| > 0.2
