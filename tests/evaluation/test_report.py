"""Tests for the dosing report: the curve PNG and the self-contained HTML page."""

from __future__ import annotations

import base64
import copy
import io
import math
import re
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np
import pytest

from phems_clinical.evaluation.report import _fmt, curve_figure, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GENERATED = "2024-05-06 09:30"


def _est(median, rel=0.2):
    return {"median": median, "lo90": median * (1 - rel), "hi90": median * (1 + rel)}


def make_result() -> dict:
    """A contract-complete result (dosing contract §3) for a 30 kg child on FVIII.

    Two 1500 IU infusions (0 h, 48 h), two quantified levels and one BLQ sample; the
    200-point curve is bi-exponential with log-normal bands that widen with time.
    Numbers are illustrative, not a fitted model.
    """
    t = np.linspace(0.0, 120.0, 200)
    med = np.zeros_like(t)
    for t0 in (0.0, 48.0):
        dt = np.clip(t - t0, 0.0, None)
        med += np.where(t >= t0, 100.0 * (0.35 * np.exp(-dt / 2.5)
                                          + 0.65 * np.exp(-dt / 14.0)), 0.0)
    sd = 0.12 + 0.004 * t
    z = {"p05": -1.645, "p25": -0.674, "p50": 0.0, "p75": 0.674, "p95": 1.645}
    curve = {"time_h": t.tolist()} | {
        k: (med * np.exp(v * sd)).tolist() for k, v in z.items()}
    return {
        "schema_version": 1,
        "patient_id": "PK-0042",
        "product": "advate",
        "model": {"name": "Björkman 2012",
                  "citation": "Björkman S, et al. Blood 2012;119:612-618.",
                  "source": "library", "path": None, "factor": "FVIII",
                  "half_life_class": "standard",
                  "unverified": ["iiv", "iov", "residual", "vial_sizes_IU"],
                  "validated_range": {"AGE": [1, 65], "WT": [11, 108]}},
        "method": "map",
        "uncertainty": "Laplace approximation at the posterior mode, 4000 draws",
        "seed": 0,
        "covariates": {"WT": {"value": 30.0, "source": "given"},
                       "AGE": {"value": 8.5, "source": "given"},
                       "BGO": {"value": 0.0, "source": "assumed"}},
        "half_life_h": _est(12.345), "effective_half_life_h": _est(10.21),
        "clearance_dL_h": _est(1.2345), "clearance_mL_h_kg": _est(4.115),
        "v1_dL": _est(15.01), "vss_dL": _est(19.87),
        "incremental_recovery": _est(2.04, 0.1),
        "time_to_threshold_h": {"1": _est(92.3), "2": _est(80.1), "5": _est(61.6)},
        "standard_dose_IU": 1500.0,
        "time_to_threshold_after_standard_dose_h": {
            "1": {"median": math.inf, "lo90": 71.0, "hi90": math.inf},
            "2": _est(60.4), "5": _est(42.2)},
        "trough_probability": 0.9,
        "regimens": [
            {"interval_h": 72, "target_IU_dL": 1, "dose_IU": 3500,
             "dose_IU_kg": 116.7, "trough_prob": 0.9, "peak_IU_dL": _est(245.0),
             "hours_below_target_per_week": _est(3.4)},
            {"interval_h": 48, "target_IU_dL": 3, "dose_IU": 2000,
             "dose_IU_kg": 66.67, "trough_prob": 0.912, "peak_IU_dL": _est(140.5),
             "hours_below_target_per_week": _est(1.2)},
            {"interval_h": 48, "target_IU_dL": 1, "dose_IU": 1000,
             "dose_IU_kg": 33.33, "trough_prob": 0.93, "peak_IU_dL": _est(70.2),
             "hours_below_target_per_week": _est(0.0)},
            {"interval_h": 72, "target_IU_dL": 3, "dose_IU": None, "dose_IU_kg": None,
             "trough_prob": None, "peak_IU_dL": None,
             "hours_below_target_per_week": None},
        ],
        "current_regimen": {"interval_h": 48, "dose_IU": 1500},
        "current_regimen_trough_prob": {"1": 0.97, "3": 0.62, "5": 0.21},
        "levels": [
            {"time_h": 4.0, "value_IU_dL": 58.03, "blq": False, "lloq_IU_dL": None,
             "predicted": _est(55.94, 0.12)},
            {"time_h": 24.0, "value_IU_dL": 12.9, "blq": False, "lloq_IU_dL": None,
             "predicted": _est(11.7, 0.15)},
            {"time_h": 116.0, "value_IU_dL": None, "blq": True, "lloq_IU_dL": 1.0,
             "predicted": _est(0.52, 0.5)},
        ],
        "infusions": [{"time_h": 0.0, "dose_IU": 1500.0, "duration_h": 0.0},
                      {"time_h": 48.0, "dose_IU": 1500.0, "duration_h": 0.0}],
        "time_origin": None,
        "curve": curve,
        "thresholds_IU_dL": [1, 2, 5],
        "diagnostics": {"objective": 12.3456, "converged": True},
        "warnings": [{"field": "age_y",
                      "message": "age 0.5 y is outside the validated range 1-65 y"}],
        "versions": {"phems_clinical": "0.1.0", "jax": "0.4.30"},
    }


@pytest.fixture
def result() -> dict:
    return make_result()


@pytest.fixture
def png(result) -> bytes:
    return curve_figure(result)


@pytest.fixture
def html(result, png) -> str:
    return render_report(result, png, generated=GENERATED)


class _TagBalance(HTMLParser):
    """Records every non-void element that is not closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "col", "input", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.seen: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.seen.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")


def _rows(html: str) -> list[str]:
    """Every table body row as its cells' text joined by `` | ``."""
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)
        if cells:
            out.append(" | ".join(re.sub(r"<[^>]+>", "", c).strip() for c in cells))
    return out


def _row(html: str, start: str) -> str:
    """The one body row whose text starts with ``start``."""
    (row,) = [r for r in _rows(html) if r.startswith(start)]
    return row


def test_fmt_significant_figures():
    assert _fmt(12.345) == "12.3"
    assert _fmt(0.0213456) == "0.0213"
    assert _fmt(9.9996) == "10.0"
    assert _fmt(1234.5) == "1,230"
    assert _fmt(48.0, trim=True) == "48"
    assert _fmt(None) == _fmt(float("nan")) == "\u2013"
    assert _fmt(math.inf, inf="not reached") == "not reached"


def test_curve_png_is_valid_image(png):
    assert png[:8] == PNG_MAGIC
    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.shape[:2] == (540, 960)  # 8 x 4.5 in at 120 dpi
    assert img[..., :3].std() > 0.05  # not blank


def test_curve_deterministic_and_handles_edge_cases(result, png):
    assert curve_figure(result) == png
    edge = copy.deepcopy(result)
    edge["curve"]["p05"][0] = 0.0  # zero on a log axis must not break the plot
    edge["levels"][2]["lloq_IU_dL"] = None  # BLQ without an LLOQ
    edge["time_origin"], edge["patient_id"], edge["product"] = (
        "2024-05-01T08:00", None, None)
    edge["thresholds_IU_dL"], edge["infusions"] = [], []
    assert curve_figure(edge)[:8] == PNG_MAGIC


def test_html_is_self_contained_and_well_formed(html, png):
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert "@media print" in html
    parser = _TagBalance()
    parser.feed(html)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert {"html", "head", "body", "header", "main", "footer", "table"} <= parser.seen


def test_html_header_and_covariates(html):
    assert "<h1>Individual PK report</h1>" in html
    assert "<dd>PK-0042</dd>" in html and f"<dd>{GENERATED}</dd>" in html
    assert "<dd>Björkman S, et al. Blood 2012;119:612-618.</dd>" in html
    assert "Maximum a posteriori (MAP) estimate with Laplace approximation" in html
    assert "<dd>Laplace approximation at the posterior mode, 4000 draws</dd>" in html
    assert _row(html, "Body weight") == "Body weight (WT) | 30 | kg | given | "
    assert _row(html, "Blood group") == (
        "Blood group (BGO) | non-O |  | assumed | assumed, not measured")


def test_html_flags_covariate_outside_validated_range(result, png):
    result["covariates"]["AGE"]["value"] = 0.5
    out = render_report(result, png, generated=GENERATED)
    assert _row(out, "Age") == (
        "Age (AGE) | 0.5 | y | given | outside validated range 1\u201365")


def test_html_warnings(html):
    box = re.search(r'<section class="warnings".*?</section>', html, flags=re.S)
    assert box is not None
    assert ("<strong>age_y</strong>: age 0.5 y is outside the validated range 1-65 y"
            in box.group())


def test_html_no_warning_box_without_warnings(result, png):
    result["warnings"] = []
    assert 'class="warnings"' not in render_report(result, png, generated=GENERATED)


def test_html_estimates(html):
    rows = _rows(html)
    assert "Terminal half-life | 12.3 | 9.88 \u2013 14.8 | h" in rows
    assert "Effective half-life | 10.2 | 8.17 \u2013 12.3 | h" in rows
    assert "Clearance | 1.23 | 0.988 \u2013 1.48 | dL/h" in rows
    assert "Clearance | 4.12 | 3.29 \u2013 4.94 | mL/h/kg" in rows
    assert "Central volume (V1) | 15.0 | 12.0 \u2013 18.0 | dL" in rows
    assert "Volume at steady state (Vss) | 19.9 | 15.9 \u2013 23.8 | dL" in rows
    assert "Incremental recovery | 2.04 | 1.84 \u2013 2.24 | IU/dL per IU/kg" in rows
    assert ("Time to 5 IU/dL after the last infusion | 61.6 | 49.3 \u2013 73.9 | h"
            in rows)
    assert ("Time to 1 IU/dL after a standard dose of 1,500 IU (50 IU/kg) "
            "| not reached | 71.0 \u2013 \u221e | h") in rows


def test_html_levels(html):
    rows = _rows(html)
    assert "4 | 58.0 | 55.9 | 49.2 \u2013 62.7" in rows
    assert "116 | BLQ (&lt; LLOQ 1) | 0.520 | 0.260 \u2013 0.780" in rows


def test_html_regimens(html):
    assert ("smallest dose, rounded up to vial sizes, with P(trough ≥ target) "
            "≥ 90%") in html
    rows = _rows(html)
    # grouped by interval (48 h first), targets ascending within each group
    order = [rows.index(r) for r in (
        "every 48 h (every 2 days) | 1 | 1,000 | 33.3 | 93% | 70.2 (56.2 \u2013 84.2)"
        " | 0",
        "3 | 2,000 | 66.7 | 91% | 140 (112 \u2013 169) | 1.20",
        "every 72 h (every 3 days) | 1 | 3,500 | 117 | 90% | 245 (196 \u2013 294)"
        " | 3.40",
        "3 | not reachable with listed vials",
    )]
    assert order == sorted(order)
    assert html.count('<tbody class="group">') == 2
    assert ("<strong>Current regimen:</strong> 1,500 IU every 48 h (every 2 days): "
            "P(trough ≥ 1 IU/dL) = 97%, P(trough ≥ 3 IU/dL) = 62%, "
            "P(trough ≥ 5 IU/dL) = 21%") in html


def test_html_model_and_uncertainty_note(html):
    assert "Unverified model values: iiv, iov, residual, vial_sizes_IU." in html
    assert "not checked against the primary paper" in html
    assert "<dd>age 1\u201365 y; body weight 11\u2013108 kg</dd>" in html
    assert "<dd>product library</dd>" in html
    assert "<dd>objective: 12.3; converged: yes</dd>" in html
    assert "90% probability" in html and "assay error of future samples" in html
    assert "extrapolations" in html and "The treating clinician decides" in html
    assert "Software: phems_clinical 0.1.0 · jax 0.4.30." in html


def test_html_escapes_user_strings(result, png):
    evil = "<script>alert(1)</script>"
    result["patient_id"] = evil
    result["warnings"] = [{"field": "x", "message": evil}]
    result["model"]["citation"] = evil
    out = render_report(result, png, generated=evil)
    assert evil not in out and "<script" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out


def test_html_model_file_and_time_origin(result, png):
    result["product"] = None
    result["model"] |= {"source": "file", "path": "/models/fit.yaml",
                        "unverified": []}
    result["time_origin"] = "2024-05-01T08:00"
    out = render_report(result, png, generated=GENERATED)
    assert "<dd>model file /models/fit.yaml</dd>" in out
    assert "No model values are flagged as unverified." in out
    assert "116 | 2024-05-06 04:00 | BLQ (&lt; LLOQ 1)" in "\n".join(_rows(out))
    assert "against time since 2024-05-01T08:00 (h)" in out


def test_html_generated_defaults_to_now(result, png):
    out = render_report(result, png)
    assert re.search(r"<dd>\d{4}-\d\d-\d\d \d\d:\d\d", out)
    result["generated"] = "2023-01-02 03:04"
    assert "<dd>2023-01-02 03:04</dd>" in render_report(result, png)


def test_write_examples(png, html):
    """Save an example render for visual inspection (looks are not asserted)."""
    with open("/tmp/curve_example.png", "wb") as fh:
        fh.write(png)
    with open("/tmp/report_example.html", "w", encoding="utf-8") as fh:
        fh.write(html)
