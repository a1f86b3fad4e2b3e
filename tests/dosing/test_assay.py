"""Assay conversion against the published label factors, on synthetic product
entries: Afstyla, one-stage results x 2 (AFSTYLA US Prescribing Information, CSL
Behring 2016); Altuviiio, chromogenic results / 2.5 (ALTUVIIIO EU SmPC, Sobi 2024)."""

import pytest

from phems_clinical.dosing.assay import canonical, conversion

AFSTYLA = (
    "chromogenic",
    {"one-stage": {"factor": 2.0, "source": "AFSTYLA US Prescribing Information"}},
)
ALTUVIIIO = (
    "one-stage",
    {"chromogenic": {"factor": 1 / 2.5, "source": "ALTUVIIIO EU SmPC"}},
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("one-stage", "one-stage"),
        ("OSA", "one-stage"),
        ("one-stage (OSA)", "one-stage"),
        ("CSA", "chromogenic"),
        ("chromogenic (CSA)", "chromogenic"),
        (None, None),
        ("chromogenic (CSA) reference; one-stage (OSA) data also included", None),
        ("aPTT", None),
    ],
)
def test_canonical(text, expected):
    assert canonical(text) == expected


def test_published_factor_is_applied_and_named():
    c = conversion(*AFSTYLA, "one-stage")
    assert (c.factor, c.warning) == (2.0, None)
    assert "AFSTYLA US Prescribing Information" in c.source
    # 10 IU/dL by one-stage is 20 IU/dL on the model's (chromogenic) scale
    assert 10.0 * c.factor == 20.0
    c = conversion(*ALTUVIIIO, "chromogenic")
    assert c.factor == pytest.approx(0.4) and c.warning is None
    assert 100.0 * c.factor == pytest.approx(40.0)


def test_same_assay_is_not_converted():
    for model, table in (AFSTYLA, ALTUVIIIO):
        c = conversion(model, table, model)
        assert (c.factor, c.source, c.warning) == (1.0, "same assay", None)


def test_mismatch_without_published_factor_warns_by_name():
    c = conversion("one-stage (OSA)", {}, "chromogenic")
    assert c.factor == 1.0 and c.source == "no published conversion"
    assert "chromogenic substrate assay" in c.warning
    assert "one-stage clotting assay" in c.warning
    assert "unconverted" in c.warning


def test_missing_assay_asks_for_it_when_the_label_converts():
    c = conversion(*AFSTYLA, None)
    assert c.factor == 1.0 and c.measured is None
    assert "assay of the levels was not given" in c.warning
    assert "one-stage clotting assay are multiplied by 2" in c.warning
    assert "AFSTYLA US Prescribing Information" in c.warning
    # nothing to ask when the product has no conversion
    assert conversion("one-stage", {}, None).warning is None


def test_model_with_assay_covariate_converts_nothing():
    c = conversion(*AFSTYLA, "one-stage", covariate=True)
    assert (c.factor, c.warning) == (1.0, None)


def test_model_without_recorded_assay_says_so():
    c = conversion(None, None, "one-stage")
    assert c.factor == 1.0 and "does not record the assay" in c.warning


@pytest.mark.parametrize(
    "bad",
    [
        {"one-stage": {"factor": 0}},
        {"one-stage": {"factor": float("nan")}},
        {"one-stage": {"factor": "2"}},
        {"one-stage": 2.0},
    ],
)
def test_malformed_factor_is_never_applied(bad):
    c = conversion("chromogenic", bad, "one-stage")
    assert c.factor == 1.0 and "no published conversion" in c.warning
