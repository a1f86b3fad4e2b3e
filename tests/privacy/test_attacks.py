"""Tests of the anonymeter-method privacy attacks (phems_clinical.privacy.attacks)."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy import attacks as A


@pytest.fixture(scope="module")
def data(toy_table):
    full = toy_table(1, 1000)
    train, control = (
        full.iloc[:500].reset_index(drop=True),
        full.iloc[500:].reset_index(drop=True),
    )
    copy = train.copy()
    indep = toy_table(2, 500)  # same generator, none of the training rows
    return train, control, copy, indep


LINK = (["age", "sex", "ward"], ["weight", "crp", "los"])
AUX = ["age", "sex", "weight", "ward"]


def test_wilson_hand_checked():
    # 7 of 10, z = 1.959964: centre (7 + z^2/2)/(10 + z^2) = 0.64449,
    # half-width z/(10 + z^2) sqrt(7*3/10 + z^2/4) = 0.24772 -> Wilson [0.3968, 0.8922]
    rate, err = A.wilson_rate(7, 10)
    assert rate == pytest.approx(0.644494, abs=1e-5)
    assert err == pytest.approx(0.247720, abs=1e-5)
    assert rate - err == pytest.approx(0.3968, abs=1e-4)
    assert rate + err == pytest.approx(0.8922, abs=1e-4)
    # residual: a = 0.644494, c = wilson(2, 10) centre = (2 + 1.920729)/13.841459
    r = A.residual_risk(7, 10, 2, 10)
    c = (2 + 1.920729) / 13.841459
    assert r.control_rate == pytest.approx(c, abs=1e-6)
    assert r.value == pytest.approx((0.644494 - c) / (1 - c), abs=1e-5)
    ec = 1.959964 / 13.841459 * np.sqrt(2 * 8 / 10 + 1.959964**2 / 4)
    err_r = np.hypot(0.247720 / (1 - c), ec * (0.644494 - 1) / (1 - c) ** 2)
    assert r.ci_high == pytest.approx(r.value + err_r, abs=1e-5)
    assert r.ci_low == pytest.approx(max(0.0, r.value - err_r), abs=1e-5)
    # clipping: control better than attack -> risk 0
    assert A.residual_risk(1, 10, 5, 10).value == 0.0


def test_gower_hand_worked():
    a = pd.DataFrame({"x": [0.0, 10.0, np.nan], "c": ["u", "v", None]})
    b = pd.DataFrame({"x": [5.0, np.nan], "c": ["u", None]})
    d = A.gower_distance(a, b)
    # range of x over a and b = 10
    expected = np.array(
        [
            [(0.5 + 0) / 2, (1 + 1) / 2],
            [(0.5 + 1) / 2, (1 + 1) / 2],
            [(1 + 1) / 2, (0 + 0) / 2],
        ]
    )
    np.testing.assert_allclose(d, expected)
    idx, dist = A.nearest_neighbors(a, b, k=1)
    np.testing.assert_array_equal(idx[:, 0], [0, 0, 1])
    np.testing.assert_allclose(dist[:, 0], [0.25, 0.75, 0.0])


def test_chunked_knn_matches_brute_force(data, monkeypatch):
    train, control, _, indep = data
    monkeypatch.setattr(A, "_CHUNK_CELLS", 997)  # force many chunks
    idx, dist = A.nearest_neighbors(control.iloc[:60], indep, k=3)
    full = A.gower_distance(control.iloc[:60], indep)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :3])
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), dist)


@pytest.mark.parametrize("mode", ["univariate", "multivariate"])
def test_singling_out(data, mode):
    train, control, copy, indep = data
    key = jax.random.key(3)
    hi = A.singling_out_risk(key, train, copy, control, n_attacks=200, mode=mode)
    lo = A.singling_out_risk(key, train, indep, control, n_attacks=200, mode=mode)
    assert hi.value > 0.5 and hi.ci_low > 0.3
    assert hi.n_attacks > 50
    assert lo.value < 0.1 or lo.ci_low <= 0.0 + 1e-12
    assert lo.value < hi.ci_low


def test_linkability(data):
    train, control, copy, indep = data
    hi = A.linkability_risk(train, copy, control, aux_cols=LINK, n_attacks=300)
    lo = A.linkability_risk(train, indep, control, aux_cols=LINK, n_attacks=300)
    assert hi.value > 0.9
    assert lo.value < 0.1 and lo.ci_low == 0.0
    assert hi.baseline_rate < 0.02


@pytest.mark.parametrize("secret", ["diagnosis", "los"])
def test_inference(data, secret):
    train, control, copy, indep = data
    hi = A.inference_risk(
        train, copy, control, aux_cols=AUX, secret=secret, n_attacks=300
    )
    lo = A.inference_risk(
        train, indep, control, aux_cols=AUX, secret=secret, n_attacks=300
    )
    assert hi.value > 0.5
    assert lo.value < 0.1 and lo.ci_low == 0.0
    assert hi.attack_rate > hi.baseline_rate


def test_membership_and_dcr(data):
    train, control, copy, indep = data
    key = jax.random.key(5)
    hi = A.membership_inference(key, train, control, copy, n=300)
    lo = A.membership_inference(key, train, control, indep, n=300)
    assert hi.auc > 0.99 and hi.advantage > 0.98
    assert abs(lo.auc - 0.5) < 0.07 and lo.ci_low < 0.5 < lo.ci_high
    d_hi = A.distance_to_closest_record(train, copy, control)
    d_lo = A.distance_to_closest_record(train, indep, control)
    assert np.all(d_hi.dcr_train == 0.0)
    assert d_hi.share_closer_to_train > 0.9
    assert abs(d_lo.share_closer_to_train - d_lo.expected_share) < 0.1


def test_mann_whitney_auc_hand_checked():
    # members at distance 0, 1; non-members at 1, 2: pairs (0<1),(0<2),(1=1),(1<2)
    # -> AUC = (3 + 0.5)/4
    tr = pd.DataFrame({"x": [0.0, 1.0]})
    ho = pd.DataFrame({"x": [1.0, 2.0]})
    syn = pd.DataFrame({"x": [0.0, -2.0]})
    r = A.membership_inference(jax.random.key(0), tr, ho, syn, n=2)
    assert r.auc == pytest.approx(3.5 / 4)


def test_reproducible_with_key(data):
    train, control, _, indep = data
    k = jax.random.key(11)
    r1 = A.singling_out_risk(
        k, train, indep, control, n_attacks=100, mode="multivariate"
    )
    r2 = A.singling_out_risk(
        k, train, indep, control, n_attacks=100, mode="multivariate"
    )
    assert r1 == r2
    l1 = A.linkability_risk(train, indep, control, aux_cols=LINK, n_attacks=100, key=k)
    l2 = A.linkability_risk(train, indep, control, aux_cols=LINK, n_attacks=100, key=k)
    assert l1 == l2
    m1 = A.membership_inference(k, train, control, indep, n=100)
    assert m1 == A.membership_inference(k, train, control, indep, n=100)


def test_bad_input(data):
    train, control, copy, _ = data
    with pytest.raises(ValueError, match="disjoint"):
        A.linkability_risk(
            train, copy, control, aux_cols=(["age"], ["age"]), n_attacks=10
        )
    with pytest.raises(ValueError, match="mode"):
        A.singling_out_risk(
            jax.random.key(0), train, copy, control, n_attacks=10, mode="bivariate"
        )
    with pytest.raises(KeyError):
        A.inference_risk(
            train,
            copy.drop(columns="age"),
            control,
            aux_cols=AUX,
            secret="diagnosis",
            n_attacks=10,
        )


def test_matches_anonymeter_1_1_0():
    """Same fixed data through anonymeter 1.1.0 (own venv, numpy 1.26, n_jobs=1).

    With n_attacks = all 80 rows, target sampling does not matter and the data have
    no missing values (anonymeter's NaN distance differs), so the success counts
    must be identical; the risks then agree to rounding. Reference output:
    linkability k=1: 13 / 5 links (attack / control), risk 0.10400317393407182;
    k=3: 49 / 28, risk 0.38946060688804834; inference of diagnosis on
    age, sex, weight, ward: 38 / 29, risk 0.1700656831506242.
    """
    from io import StringIO

    ori, syn, ctl = (pd.read_csv(StringIO(t)) for t in (ORI_CSV, SYN_CSV, CTL_CSV))
    link = (["age", "sex", "ward"], ["weight", "los"])
    for k, n_s, n_c, risk in [
        (1, 13, 5, 0.10400317393407182),
        (3, 49, 28, 0.38946060688804834),
    ]:
        r = A.linkability_risk(
            ori, syn, ctl, aux_cols=link, n_attacks=80, n_neighbors=k
        )
        assert r.attack_rate == pytest.approx(A.wilson_rate(n_s, 80)[0], abs=1e-12)
        assert r.control_rate == pytest.approx(A.wilson_rate(n_c, 80)[0], abs=1e-12)
        assert r.value == pytest.approx(risk, abs=1e-9)
    r = A.inference_risk(
        ori,
        syn,
        ctl,
        aux_cols=["age", "sex", "weight", "ward"],
        secret="diagnosis",
        n_attacks=80,
    )
    assert r.attack_rate == pytest.approx(A.wilson_rate(38, 80)[0], abs=1e-12)
    assert r.control_rate == pytest.approx(A.wilson_rate(29, 80)[0], abs=1e-12)
    assert r.value == pytest.approx(0.1700656831506242, abs=1e-9)


# Fixed data (numpy default_rng(42) toy generator; SYN = ORI shuffled, with age and
# weight jittered, 30 % of diagnoses redrawn and about half the rows replaced).

ORI_CSV = """\
age,sex,weight,ward,diagnosis,los
19,F,11.05,cardio,other,4
167,F,51.89,PICU,sepsis,2
142,F,41.26,onco,asthma,7
95,M,30.8,NICU,CHD,5
93,M,29.89,onco,asthma,6
186,M,56.24,PICU,sepsis,2
18,M,11.15,PICU,sepsis,2
151,M,46.45,NICU,CHD,6
43,M,17.58,PICU,sepsis,5
20,M,9.3,NICU,CHD,4
114,F,36.29,cardio,ALL,3
211,F,64.47,PICU,asthma,5
159,F,43.65,cardio,CHD,5
165,F,48.74,PICU,sepsis,3
155,M,45.49,PICU,sepsis,6
170,F,49.18,cardio,other,3
111,F,33.75,onco,ALL,8
27,M,15.54,PICU,sepsis,3
182,M,51.86,NICU,other,9
97,M,33.56,onco,sepsis,5
108,F,28.69,onco,sepsis,8
80,F,24.9,cardio,ALL,8
39,M,14.91,NICU,sepsis,2
201,F,61.54,NICU,sepsis,4
169,F,52.95,cardio,ALL,1
139,F,44.8,cardio,ALL,3
87,M,26.81,NICU,CHD,6
178,M,51.95,PICU,sepsis,0
118,M,39.11,PICU,sepsis,1
96,M,29.81,onco,asthma,7
97,M,26.83,NICU,asthma,4
49,F,13.82,NICU,CHD,3
19,M,6.06,NICU,CHD,1
120,F,38.59,onco,ALL,9
192,F,57.69,PICU,sepsis,3
13,M,9.21,PICU,CHD,2
186,F,54.3,NICU,sepsis,2
179,F,54.1,NICU,ALL,5
60,F,22.18,cardio,ALL,2
137,M,40.93,NICU,asthma,4
35,F,14.67,NICU,CHD,6
164,F,47.43,onco,CHD,11
152,M,44.97,PICU,sepsis,1
76,F,23.63,cardio,ALL,3
14,M,3.83,cardio,ALL,3
210,M,63.76,NICU,ALL,5
96,M,28.97,onco,asthma,9
193,F,57.58,NICU,sepsis,2
147,F,46.1,onco,asthma,8
168,F,51.88,NICU,CHD,3
164,M,51.42,cardio,other,3
42,F,14.96,cardio,ALL,5
78,F,24.07,onco,asthma,7
101,F,31.54,NICU,other,8
108,M,28.68,NICU,CHD,4
9,F,1.68,PICU,sepsis,3
118,M,32.57,NICU,CHD,2
33,F,9.75,onco,asthma,4
161,F,49.78,PICU,asthma,5
148,F,42.22,onco,asthma,13
200,M,58.37,cardio,ALL,4
161,F,52.48,PICU,sepsis,7
79,F,24.55,NICU,CHD,4
209,M,64.23,cardio,other,2
89,M,25.62,NICU,CHD,6
70,M,22.48,PICU,sepsis,3
196,M,55.53,cardio,sepsis,3
80,F,24.88,cardio,ALL,7
16,M,10.5,PICU,sepsis,3
101,F,26.6,NICU,asthma,3
172,M,52.96,PICU,asthma,3
41,M,15.69,cardio,sepsis,7
100,M,29.72,cardio,ALL,2
28,M,7.0,cardio,ALL,2
148,M,45.16,onco,asthma,8
103,M,30.75,onco,asthma,8
71,M,24.08,NICU,ALL,6
49,F,17.29,PICU,other,6
122,F,42.47,cardio,ALL,5
145,F,43.38,onco,CHD,3
"""

SYN_CSV = """\
age,sex,weight,ward,diagnosis,los
28,F,8.88,PICU,sepsis,4
19,F,9.15,cardio,ALL,1
40,M,13.53,NICU,other,3
107,F,26.82,NICU,ALL,3
106,M,31.22,onco,sepsis,9
185,F,57.55,NICU,sepsis,2
26,F,15.21,PICU,sepsis,1
159,M,44.78,onco,asthma,8
144,M,40.6,NICU,asthma,4
82,F,27.98,cardio,CHD,2
200,F,54.78,PICU,other,3
69,F,23.77,NICU,CHD,4
188,F,57.71,NICU,ALL,2
15,M,3.76,cardio,ALL,5
162,F,50.91,PICU,CHD,5
114,F,36.52,cardio,ALL,3
48,F,22.84,cardio,ALL,2
142,F,42.82,onco,sepsis,7
24,M,7.59,PICU,asthma,2
13,F,9.15,onco,asthma,1
204,M,61.01,NICU,ALL,5
214,M,61.1,onco,ALL,8
186,M,55.89,cardio,sepsis,3
19,M,7.09,NICU,ALL,3
16,M,8.92,onco,CHD,3
160,F,51.23,PICU,sepsis,7
6,M,3.7,cardio,asthma,7
78,F,24.17,cardio,ALL,7
28,M,14.02,cardio,ALL,2
111,F,43.12,cardio,sepsis,5
76,M,20.18,PICU,sepsis,3
114,M,33.1,cardio,ALL,4
146,M,42.61,PICU,sepsis,1
179,F,51.76,onco,CHD,6
150,F,42.13,onco,CHD,3
83,F,27.55,cardio,ALL,8
175,M,53.62,PICU,sepsis,3
159,F,46.05,cardio,asthma,9
125,F,36.8,PICU,sepsis,3
120,M,24.47,NICU,CHD,4
64,F,23.54,cardio,other,3
18,M,11.84,PICU,sepsis,4
168,M,52.43,NICU,other,4
8,F,10.87,cardio,CHD,7
22,M,16.64,PICU,sepsis,3
136,M,48.38,cardio,ALL,6
88,F,25.05,NICU,CHD,2
67,F,20.71,onco,asthma,7
191,M,57.19,cardio,ALL,7
79,M,22.65,NICU,ALL,6
66,M,18.45,onco,asthma,6
169,F,48.11,PICU,asthma,3
45,M,11.04,NICU,sepsis,2
26,M,3.52,NICU,CHD,1
138,M,39.81,NICU,CHD,2
7,F,1.21,PICU,sepsis,3
167,F,51.5,NICU,ALL,3
95,F,28.21,NICU,CHD,3
113,F,31.97,cardio,sepsis,2
203,M,57.18,NICU,CHD,3
100,M,29.55,onco,asthma,6
19,M,6.23,PICU,sepsis,3
150,M,46.72,PICU,sepsis,6
92,M,30.92,onco,sepsis,7
116,M,39.73,PICU,ALL,1
154,M,46.19,onco,asthma,7
89,M,24.77,onco,asthma,6
112,F,32.71,onco,sepsis,8
97,F,33.19,cardio,asthma,7
151,F,46.3,cardio,sepsis,3
23,M,7.78,PICU,sepsis,2
152,F,43.31,NICU,CHD,3
113,F,36.78,onco,other,8
75,F,32.93,cardio,ALL,3
189,M,57.92,PICU,sepsis,2
111,M,31.22,onco,asthma,8
17,M,9.09,NICU,asthma,4
36,M,12.23,PICU,sepsis,4
101,F,32.0,NICU,other,2
14,F,3.53,PICU,other,1
"""

CTL_CSV = """\
age,sex,weight,ward,diagnosis,los
124,F,40.64,PICU,sepsis,4
14,F,2.56,cardio,ALL,6
213,F,56.4,NICU,CHD,8
98,M,33.95,PICU,sepsis,6
57,M,23.02,NICU,CHD,4
111,F,31.52,onco,CHD,4
171,F,45.8,NICU,CHD,4
67,F,22.56,PICU,sepsis,2
10,M,9.09,cardio,ALL,4
11,F,11.97,PICU,CHD,5
184,F,56.57,onco,ALL,4
24,F,9.1,onco,asthma,10
137,F,39.18,onco,asthma,12
83,M,26.77,onco,asthma,6
168,F,49.64,PICU,sepsis,0
13,F,4.09,PICU,asthma,3
194,M,63.97,NICU,CHD,4
151,M,51.14,NICU,ALL,5
97,F,34.07,onco,asthma,5
44,F,13.06,cardio,ALL,9
212,M,65.43,cardio,ALL,5
65,F,23.62,onco,asthma,7
106,M,34.51,cardio,asthma,6
85,M,31.05,NICU,CHD,2
50,M,19.41,NICU,CHD,1
90,F,30.92,cardio,ALL,4
32,M,14.37,PICU,sepsis,1
0,M,4.52,cardio,ALL,7
62,F,15.51,cardio,ALL,6
24,M,10.47,cardio,ALL,3
90,M,27.03,cardio,ALL,5
187,M,52.02,onco,asthma,8
35,F,18.35,onco,asthma,6
0,F,8.69,cardio,ALL,7
24,M,14.3,NICU,CHD,4
110,F,35.07,PICU,ALL,1
59,M,24.07,onco,asthma,8
106,M,33.22,onco,other,5
6,M,5.79,cardio,CHD,3
72,F,20.38,onco,asthma,4
88,M,29.33,onco,asthma,6
93,F,29.72,onco,asthma,6
119,M,32.91,cardio,ALL,3
169,F,50.67,PICU,sepsis,5
101,F,31.54,PICU,sepsis,4
182,M,59.85,PICU,sepsis,1
114,M,38.1,NICU,CHD,2
56,M,19.21,cardio,other,8
49,F,17.97,NICU,CHD,5
69,M,22.95,PICU,CHD,2
129,M,39.01,PICU,CHD,2
52,M,14.81,onco,other,8
198,M,58.49,onco,asthma,4
104,F,30.38,NICU,CHD,2
187,F,52.11,onco,asthma,5
148,M,46.47,cardio,CHD,6
72,M,24.83,onco,asthma,10
49,F,11.86,onco,ALL,8
161,F,48.21,cardio,ALL,5
71,M,26.37,NICU,CHD,4
53,M,21.52,cardio,ALL,3
201,F,62.86,NICU,CHD,2
104,M,32.74,NICU,ALL,2
10,M,3.76,cardio,ALL,8
107,F,30.21,cardio,ALL,5
99,F,32.25,cardio,other,6
187,M,57.0,NICU,CHD,2
154,F,50.48,NICU,CHD,5
41,F,18.28,PICU,other,3
32,F,12.06,cardio,other,8
130,M,36.17,cardio,asthma,9
10,F,5.34,onco,asthma,3
69,F,23.47,cardio,ALL,4
29,F,11.01,NICU,CHD,6
4,M,2.89,PICU,sepsis,0
199,M,59.98,PICU,sepsis,1
19,F,7.31,NICU,CHD,5
2,F,2.18,NICU,CHD,5
202,F,60.99,NICU,CHD,5
40,M,13.49,NICU,CHD,4
"""
