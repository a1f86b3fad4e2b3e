"""Tests for the dosing report: the curve PNG and the self-contained HTML page."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np
import pytest

from phems_clinical.dosing.wording import display
from phems_clinical.evaluation.numbers import label, number
from phems_clinical.evaluation.report import curve_figure, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GENERATED = "2024-05-06 09:30"


def _est(median, rel=0.2):
    return {"median": median, "lo90": median * (1 - rel), "hi90": median * (1 + rel)}


def _reg(label, every_h, target, dose, prob, peak, status="ok", peak_flag=None):
    per_week = 168 / every_h if every_h else 3.0
    return {
        "schedule": {
            "label": label,
            "every_h": every_h,
            "weekdays": [] if every_h else [0, 2, 4],
        },
        "target_IU_dL": target,
        "status": status,
        "dose_IU": dose,
        "dose_IU_kg": dose / 30.0,
        "infusions_per_week": per_week,
        "dose_IU_kg_week": dose / 30.0 * per_week,
        "vials": [{"size_IU": 1000, "count": dose // 1000}],
        "trough_IU_dL": _est(target * 1.5),
        "trough_prob": prob,
        "peak_IU_dL": _est(peak),
        "peak_flag": peak_flag,
        "time_above_h_per_week": {"1": _est(150.0, 0.05)},
        "hours_below_target_per_week": _est(3.4),
        "cap_IU_kg": 100.0,
    }


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
        med += np.where(
            t >= t0, 100.0 * (0.35 * np.exp(-dt / 2.5) + 0.65 * np.exp(-dt / 14.0)), 0.0
        )
    sd = 0.12 + 0.004 * t
    z = {"p05": -1.645, "p25": -0.674, "p50": 0.0, "p75": 0.674, "p95": 1.645}
    curve = {"time_h": t.tolist()} | {
        k: (med * np.exp(v * sd)).tolist() for k, v in z.items()
    }
    return {
        "schema_version": 1,
        "patient_id": "PK-0042",
        "product": "advate",
        "model": {
            "name": "Björkman 2012",
            "citation": "Björkman S, et al. Blood 2012;119:612-618.",
            "source": "library",
            "path": None,
            "factor": "FVIII",
            "half_life_class": "standard",
            "unverified": ["iiv", "iov", "residual", "vial_sizes_IU"],
            "validated_range": {"AGE": [1, 65], "WT": [11, 108]},
        },
        "method": "map",
        "uncertainty": "Laplace approximation at the posterior mode, 4000 draws",
        "seed": 0,
        "covariates": {
            "WT": {"value": 30.0, "source": "given"},
            "AGE": {"value": 8.5, "source": "given"},
            "BGO": {"value": 0.0, "source": "assumed"},
        },
        "half_life_h": _est(12.345),
        "effective_half_life_h": _est(10.21),
        "clearance_dL_h": _est(1.2345),
        "clearance_mL_h_kg": _est(4.115),
        "v1_dL": _est(15.01),
        "vss_dL": _est(19.87),
        "incremental_recovery": _est(2.04, 0.1),
        "time_to_threshold_h": {"1": _est(92.3), "2": _est(80.1), "5": _est(61.6)},
        "standard_dose_IU": 1500.0,
        "standard_dose_IU_kg": 50.0,
        "time_to_threshold_after_standard_dose_h": {
            "1": {"median": math.inf, "lo90": 71.0, "hi90": math.inf},
            "2": _est(60.4),
            "5": _est(42.2),
        },
        "trough_probability": 0.9,
        "regimens": [
            _reg("every 48 h", 48, 1, 1000, 0.93, 70.2),
            _reg("Mon/Wed/Fri", None, 3, 2000, 0.912, 140.5),
            _reg(
                "every 72 h",
                72,
                3,
                3000,
                0.62,
                245.0,
                status="above_cap",
                peak_flag="above",
            ),
        ],
        "evaluated_regimens": [],
        "max_dose_IU_kg": 100.0,
        "peak_flag_IU_dL": 150.0,
        "current_regimen": {"interval_h": 48, "dose_IU": 1500},
        "current_regimen_trough_prob": {"1": 0.97, "3": 0.62, "5": 0.21},
        "levels": [
            {
                "time_h": 4.0,
                "value_IU_dL": 58.03,
                "blq": False,
                "lloq_IU_dL": None,
                "predicted": _est(55.94, 0.12),
            },
            {
                "time_h": 24.0,
                "value_IU_dL": 12.9,
                "blq": False,
                "lloq_IU_dL": None,
                "predicted": _est(11.7, 0.15),
            },
            {
                "time_h": 116.0,
                "value_IU_dL": None,
                "blq": True,
                "lloq_IU_dL": 1.0,
                "predicted": _est(0.52, 0.5),
            },
        ],
        "infusions": [
            {"time_h": 0.0, "dose_IU": 1500.0, "duration_h": 0.0},
            {"time_h": 48.0, "dose_IU": 1500.0, "duration_h": 0.0},
        ],
        "time_origin": None,
        "curve": curve,
        "thresholds_IU_dL": [1, 2, 5],
        "diagnostics": {"objective": 12.3456, "converged": True},
        "warnings": [
            {
                "field": "age_y",
                "message": "age 0.5 y is outside the validated range 1-65 y",
            }
        ],
        "versions": {"phems_clinical": "0.1.0", "jax": "0.4.30"},
    }


@pytest.fixture
def result() -> dict:
    return make_result()


@pytest.fixture
def png(result) -> bytes:
    return curve_figure(result)


def _render(result, png, **kw) -> str:
    return render_report({**result, "display": display(result)}, png, **kw)


@pytest.fixture
def html(result, png) -> str:
    return _render(result, png, generated=GENERATED)


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
    assert number(12.345) == "12.3"
    assert number(0.0213456) == "0.0213"
    assert number(9.9996) == "10.0"
    assert number(1234.5) == "1,230"
    assert label(48.0) == "48"
    assert number(None) == number(float("nan")) == "\u2013"
    assert number(math.inf, inf="not reached") == "not reached"


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
        "2024-05-01T08:00",
        None,
        None,
    )
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


def test_html_needs_display(result, png):
    with pytest.raises(ValueError, match="display"):
        render_report(result, png)


def test_html_header_summary_and_covariates(html, result):
    assert "<h1>Individual PK report</h1>" in html
    assert f"<dd>{GENERATED}</dd>" in html
    rows = _rows(html)
    summary = display(result)["summary"]
    # standard half-life: the terminal half-life first
    assert summary[0] == {
        "label": "Terminal half-life",
        "value": "12.3 h (90 % interval 9.88\u201314.8 h)",
    }
    item = {
        "label": "Time to 1 IU/dL after 1,500 IU (50 IU/kg)",
        "value": "not reached (90 % interval 71.0 h\u2013\u221e)",
    }
    assert item in summary
    assert (
        f'<tr><th scope="row">{item["label"]}</th><td>{item["value"]}</td></tr>' in html
    )
    assert "Blood group (BGO) | non-O | assumed | assumed, not measured" in rows


def test_extended_half_life_leads_with_the_effective_one(result):
    result["model"]["half_life_class"] = "extended"
    assert display(result)["summary"][0]["label"] == "Effective half-life"


def test_html_flags_covariate_outside_validated_range(result, png):
    result["covariates"]["AGE"]["value"] = 0.5
    out = _render(result, png, generated=GENERATED)
    assert "Age (AGE) | 0.5 y | given | outside the model range 1\u201365 y" in _rows(
        out
    )


def test_html_warnings(html):
    box = re.search(r'<section class="warnings".*?</section>', html, flags=re.S)
    assert box is not None
    assert "age_y: age 0.5 y is outside the validated range 1-65 y" in box.group()


def test_html_no_warning_box_without_warnings(result, png):
    result["warnings"] = []
    assert 'class="warnings"' not in _render(result, png, generated=GENERATED)


def test_html_levels(html):
    rows = _rows(html)
    assert (
        "4 h | \u2013 | 58.0 IU/dL | 55.9 IU/dL (90 % interval 49.2\u201362.7 IU/dL)"
    ) in rows
    assert any(r.startswith("116 h | \u2013 | below LLOQ 1.00 IU/dL") for r in rows)


def test_html_regimens(html):
    rows = _rows(html)
    assert rows.index(next(r for r in rows if r.startswith("every 48 h"))) < rows.index(
        next(r for r in rows if r.startswith("Mon/Wed/Fri"))
    )
    row = next(r for r in rows if r.startswith("Mon/Wed/Fri")).split(" | ")
    assert row[:8] == [
        "Mon/Wed/Fri",
        "3 IU/dL",
        "2,000 IU",
        "66.7 IU/kg",
        "200 IU/kg",
        "2 \u00d7 1,000",
        "4.50 IU/dL (90 % interval 3.60\u20135.40 IU/dL)",
        "91 %",
    ]
    cap = next(r for r in rows if r.startswith("every 72 h"))
    assert "3,000 IU (cap)" in cap and "cap of 100 IU/kg" in cap
    assert "peak 245 IU/dL is above 150 IU/dL" in cap and "Koster" in cap
    assert "Hours above 1 IU/dL per week" in html


def test_html_model_and_notes_without_internals(html):
    rows = _rows(html)
    assert "Unverified model sections | iiv, iov, residual, vial_sizes_IU" in rows
    assert "Age range of the model | 1\u201365 y" in rows
    assert "Source | product library" in rows
    assert "objective" not in html and "converged" not in html
    assert "90 % probability" in html and "assay error of future samples" in html
    assert "extrapolations" in html and "the treating clinician decides" in html
    assert "Software: phems_clinical 0.1.0 · jax 0.4.30." in html


def test_html_escapes_user_strings(result, png):
    evil = "<script>alert(1)</script>"
    result["patient_id"] = evil
    result["warnings"] = [{"field": "x", "message": evil}]
    result["model"]["citation"] = evil
    out = _render(result, png, generated=evil)
    assert evil not in out and "<script" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out


def test_html_model_file_and_time_origin(result, png):
    result["product"] = None
    result["model"] |= {"source": "file", "path": "/models/fit.yaml", "unverified": []}
    result["time_origin"] = "2024-05-01T08:00"
    out = _render(result, png, generated=GENERATED)
    assert "Source | model file /models/fit.yaml" in _rows(out)
    assert "Unverified model sections | none" in _rows(out)
    assert "against time since 2024-05-01T08:00 (h)" in out


def test_html_comparison_with_a_previous_assessment(result, png):
    previous = copy.deepcopy(result) | {"assessed_at": "2023-05-06T09:30:00"}
    previous["half_life_h"] = _est(10.0)
    out = render_report(
        {**result, "display": display(result, previous)}, png, generated=GENERATED
    )
    assert "Previous assessment" in out
    rows = _rows(out)
    assert any(r.startswith("2023-05-06 09:30 |") and "10.0 h" in r for r in rows)


def test_html_generated_defaults_to_now(result, png):
    out = _render(result, png)
    assert re.search(r"<dd>\d{4}-\d\d-\d\d \d\d:\d\d", out)
    result["generated"] = "2023-01-02 03:04"
    assert "<dd>2023-01-02 03:04</dd>" in _render(result, png)


def test_write_examples(result, png, html, tmp_path):
    """The report as ``phems dose`` saves it (``write_dose_outputs``): exactly
    ``result.json``, ``curve.png`` and ``report.html`` in the output folder, each
    holding what was rendered; the HTML has every section, embeds the curve and
    shows the patient's values."""
    from phems_clinical.app.dose import DoseOutput, write_dose_outputs
    from phems_clinical.outputs import strict_json

    # as the dosing workflow hands it over: JSON values, infinities as None
    full = strict_json({**result, "display": display(result)})
    out = tmp_path / "report"
    paths = write_dose_outputs(DoseOutput(full, png, html), out)
    assert paths == [out / "result.json", out / "curve.png", out / "report.html"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "curve.png",
        "report",
        "report.html",
        "result.json",
    ]  # nothing else
    assert json.loads((out / "result.json").read_text(encoding="utf-8")) == full
    saved_png = (out / "curve.png").read_bytes()
    assert saved_png == png
    assert mpimg.imread(io.BytesIO(saved_png), format="png").shape[:2] == (540, 960)
    saved = (out / "report.html").read_text(encoding="utf-8")
    assert saved == html
    headings = re.findall(r"<h[12][^>]*>(.*?)</h[12]>", saved)
    assert headings == [
        "Individual PK report",
        "Warnings (1)",
        "Summary",
        "Designed regimens",
        "Measured levels",
        "Patient covariates",
        "Model",
        "Notes",
    ]
    assert saved.count('src="data:image/png;base64,') == 1
    assert base64.b64encode(png).decode() in saved
    # values rendered: the patient, the model, the half-life and a covariate row
    assert "PK-0042" in saved and "Björkman 2012" in saved
    assert "12.3 h (90 % interval 9.88\u201314.8 h)" in saved
    assert (
        _row(saved, "Blood group (BGO)")
        == "Blood group (BGO) | non-O | assumed | assumed, not measured"
    )
    # a second save into the same folder is refused, not silently replaced
    with pytest.raises(ValueError, match="--out"):
        write_dose_outputs(DoseOutput(full, png, html), out)
