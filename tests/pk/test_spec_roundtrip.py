"""``to_spec``/``save_model`` invert ``parse_model``/``load_model`` exactly.

Every library product and the pheno reference model is written to YAML text, read
back and compared field by field (values bit-for-bit: YAML floats are written with
``repr``); typical parameters at the reference covariates must be identical too.
"""

import math

import numpy as np
import pytest
import yaml

from phems_clinical.pk.library import list_products, load_product
from phems_clinical.pk.model import covariate_vector, typical_parameters
from phems_clinical.pk.spec import (
    PopModel,
    Residual,
    load_model,
    parse_model,
    save_model,
    to_spec,
    with_values,
)
from phems_clinical.resources import configs_dir

MODELS = [*list_products(), "pheno"]


def _load(name: str) -> PopModel:
    if name == "pheno":
        return load_model(configs_dir() / "model" / "pheno.yaml")
    return load_product(name)


def _yaml_roundtrip(model: PopModel) -> PopModel:
    text = yaml.safe_dump(to_spec(model), sort_keys=False, allow_unicode=True)
    return parse_model(yaml.safe_load(text))


def _plain_only(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain_only(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain_only(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


def assert_same_model(a: PopModel, b: PopModel) -> None:
    assert a.name == b.name
    assert a.n_cmt == b.n_cmt and a.structural == b.structural
    assert a.thetas == b.thetas  # names, values, bounds, fixed, unit
    assert a.covariate_effects == b.covariate_effects
    assert a.iiv_parameters == b.iiv_parameters
    np.testing.assert_array_equal(a.omega, b.omega)
    assert a.omega.shape == b.omega.shape
    assert a.omega_structure == b.omega_structure
    assert a.omega_blocks == b.omega_blocks
    assert a.omega_fixed == b.omega_fixed
    assert a.iov_parameters == b.iov_parameters
    np.testing.assert_array_equal(a.omega_iov, b.omega_iov)
    assert a.omega_iov.shape == b.omega_iov.shape
    assert a.omega_iov_fixed == b.omega_iov_fixed
    assert a.residual == b.residual
    assert a.baseline == b.baseline
    assert a.baseline_estimated == b.baseline_estimated
    assert a.blq == b.blq
    assert a.metadata == b.metadata
    assert a.reference_covariates == b.reference_covariates


def assert_same_typical(a: PopModel, b: PopModel) -> None:
    cov = covariate_vector(a, a.reference_covariates)
    np.testing.assert_array_equal(
        np.asarray(typical_parameters(a, a.theta_values, cov)),
        np.asarray(typical_parameters(b, b.theta_values, cov)),
    )


@pytest.mark.parametrize("name", MODELS)
def test_library_model_roundtrips_through_yaml(name):
    model = _load(name)
    spec = to_spec(model)
    assert _plain_only(spec)
    back = _yaml_roundtrip(model)
    assert_same_model(model, back)
    assert_same_typical(model, back)


@pytest.mark.parametrize("name", MODELS)
def test_changed_values_roundtrip_through_save_model(name, tmp_path):
    model = _load(name)
    rng = np.random.default_rng(7)
    thetas = {
        t.name: t.value * (1 + 0.1 * rng.standard_normal()) + 1e-13
        for t in model.thetas
    }
    omega = model.omega * 1.37 + np.eye(model.n_eta) * 1e-3 / 3
    changed = with_values(
        model,
        thetas=thetas,
        omega=omega,
        omega_iov=np.asarray(model.omega_iov) * 0.71 + 1 / 7,
        residual=Residual(0.123456789, 0.0987654321, False),
        baseline=1.0 / 3,
    )
    path = save_model(changed, tmp_path / "model.yaml", header="a test\nheader")
    text = path.read_text()
    assert text.startswith("# a test\n# header\n")
    back = load_model(path)
    assert_same_model(changed, back)
    assert_same_typical(changed, back)
    assert [t.value for t in back.thetas] != [t.value for t in model.thetas]


def test_nondefault_bounds_blocks_and_flags_roundtrip(tmp_path):
    model = parse_model(
        {
            "name": "edge",
            "description": "hand-written edge cases",
            "structure": {"compartments": 3},
            "parameters": {
                "CL": {"value": 2.0, "lower": -math.inf, "fixed": True},
                "V": {"value": 30.0, "lower": 1.0, "upper": 100.0, "unit": "dL"},
                "Q": 1.5,
                "VP": 8.0,
                "Q3": 0.5,
                "VP2": 4.0,
            },
            "covariates": [
                {
                    "parameter": "CL",
                    "covariate": "age",
                    "effect": "linear",
                    "piecewise": "below",
                    "reference": 1.0,
                    "coefficient": 0.149,
                    "lower": -1.0,
                },
                {
                    "parameter": "CL",
                    "covariate": "vwf",
                    "effect": "exponential",
                    "reference": 100,
                    "coefficient": -0.002,
                    "upper": 0.0,
                },
                {
                    "parameter": "V1",
                    "covariate": "BG",
                    "effect": "indicator",
                    "condition": ">= 2.5e-3",
                    "coefficient": -0.2,
                },
                {
                    "parameter": "V1",
                    "covariate": "WT",
                    "effect": "power",
                    "reference": 70,
                    "coefficient": 1.0,
                    "fixed": True,
                    "name": "V_WT",
                },
            ],
            "iiv": {
                "parameters": ["CL", "V1", "Q2"],
                "variance": [[0.1, 0.02, 0.0], [0.02, 0.05, 0.0], [0.0, 0.0, 0.2]],
                "structure": "block",
                "blocks": [["CL", "V1"], ["Q2"]],
                "fixed": True,
            },
            "iov": {"parameters": ["CL", "V1"], "cv": [0.2, 0.1]},
            "residual": {"additive": 0.5, "fixed": True},
            "baseline": {"value": 0.7, "estimate": True},
            "blq": "drop",
        }
    )
    back = load_model(save_model(model, tmp_path / "edge.yaml"))
    assert_same_model(model, back)
    assert_same_typical(model, back)
    assert back.thetas[0].lower == -math.inf
    assert back.covariate_effects[2].condition == (">=", 2.5e-3)


def test_correlated_iov_and_residual_form_roundtrip(tmp_path):
    """A correlated IOV block (pdFIX: CL 21.4 %, V1 20.1 %, r 0.902; Brekkan et al.,
    J Thromb Haemost 2016;14:724-732) stays a full matrix, ``iov.fixed`` may differ
    from ``iiv.fixed``, and the Monolix ``combined1`` residual form is kept."""
    model = parse_model(
        {
            "name": "corr-iov",
            "structure": {"compartments": 2},
            "parameters": {"CL": 3.0, "V1": 60.0, "Q2": 4.0, "V2": 40.0},
            "iiv": {"parameters": ["CL"], "sd": [0.3], "fixed": True},
            "iov": {
                "parameters": ["CL", "V1"],
                "sd": [0.214, 0.201],
                "correlation": [[1.0, 0.902], [0.902, 1.0]],
                "fixed": False,
            },
            "residual": {"additive": 0.868, "proportional": 0.108, "form": "combined1"},
        }
    )
    assert model.omega_iov[0, 1] == pytest.approx(0.902 * 0.214 * 0.201, rel=1e-15)
    assert model.omega_fixed and not model.omega_iov_fixed
    spec = to_spec(model)
    assert spec["iov"]["fixed"] is False and spec["residual"]["form"] == "combined1"
    back = load_model(save_model(model, tmp_path / "corr.yaml"))
    assert_same_model(model, back)


def test_to_spec_omits_default_and_infinite_bounds():
    spec = to_spec(_load("pheno"))
    assert spec["parameters"]["CL"] == {"value": 0.00469307}
    apgr = next(c for c in spec["covariates"] if c["name"] == "V_APGR")
    assert apgr["lower"] == -0.99 and apgr["upper"] == 1e6
    assert all("upper" not in c for c in spec["covariates"] if c is not apgr)
