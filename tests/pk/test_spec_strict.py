"""The model YAML is strict: an unknown key at any level is refused with the field
path and the closest known key; every PK model of ``configs/model`` parses."""

import copy

import pytest
import yaml

from phems_clinical.pk.spec import ModelSpecError, load_model, parse_model
from phems_clinical.resources import configs_dir

SPEC = {
    "name": "strict",
    "citation": "test",
    "product": "Test",
    "structure": {"compartments": 2},
    "parameters": {
        "CL": {"value": 2.0, "lower": 0.0},
        "V1": 30.0,
        "Q2": 3.0,
        "V2": {"value": 10.0, "fixed": True},
    },
    "covariates": [
        {
            "parameter": "CL",
            "covariate": "WT",
            "effect": "power",
            "reference": 70.0,
            "coefficient": 0.75,
        }
    ],
    "iiv": {"parameters": ["CL", "V1"], "sd": [0.3, 0.2]},
    "iov": {"parameters": ["CL"], "sd": [0.15]},
    "residual": {"additive": 0.5, "proportional": 0.1},
    "baseline": {"value": 0.0, "estimate": False},
    "blq": "m3",
    "fitted": {"method": "focei", "converged": True},
}

# (path to the mapping, misspelt key, value, expected message)
MISSPELT = [
    (
        (),
        "strucure",
        {"compartments": 2},
        "strucure: unknown key; did you mean 'structure'?",
    ),
    (
        (),
        "vial_size_IU",
        [250],
        "vial_size_IU: unknown key; did you mean 'vial_sizes_IU'?",
    ),
    (
        ("structure",),
        "compartment",
        2,
        "structure.compartment: unknown key; did you mean 'compartments'?",
    ),
    (
        ("parameters", "CL"),
        "lowr",
        0.0,
        "parameters.CL.lowr: unknown key; did you mean 'lower'?",
    ),
    (
        ("parameters", "V2"),
        "fixd",
        True,
        "parameters.V2.fixd: unknown key; did you mean 'fixed'?",
    ),
    (
        ("covariates", 0),
        "refrence",
        70.0,
        r"covariates\[0\].refrence: unknown key; "
        "did you mean 'reference'?",
    ),
    (
        ("iiv",),
        "correlations",
        [[1, 0], [0, 1]],
        "iiv.correlations: unknown key; did you mean 'correlation'?",
    ),
    (("iov",), "fixd", True, "iov.fixd: unknown key; did you mean 'fixed'?"),
    (
        ("residual",),
        "exponential",
        0.1,
        "residual.exponential: unknown key; expected "
        "one of additive, proportional, form, fixed",
    ),
    (
        ("residual",),
        "proportionnal",
        0.1,
        "residual.proportionnal: unknown key; did you mean 'proportional'?",
    ),
    (
        ("baseline",),
        "estimated",
        True,
        "baseline.estimated: unknown key; did you mean 'estimate'?",
    ),
    (
        ("fitted",),
        "convergd",
        True,
        "fitted.convergd: unknown key; did you mean 'converged'?",
    ),
]


def _at(spec, path):
    node = spec
    for k in path:
        node = node[k]
    return node


def test_the_base_spec_parses():
    model = parse_model(SPEC)
    assert model.metadata["product"] == "Test"
    assert [t.fixed for t in model.thetas][:4] == [False, False, False, True]


@pytest.mark.parametrize(
    ("path", "key", "value", "message"),
    MISSPELT,
    ids=[".".join(map(str, (*p, k))) for p, k, *_ in MISSPELT],
)
def test_unknown_key_is_refused_with_a_suggestion(path, key, value, message):
    spec = copy.deepcopy(SPEC)
    _at(spec, path)[key] = value
    with pytest.raises(ModelSpecError, match=message):
        parse_model(spec)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (
            ("parameters", "CL", "fixed"),
            "yes",
            "parameters.CL.fixed: expected true or false",
        ),
        (
            ("covariates", 0, "fixed"),
            1,
            r"covariates\[0\].fixed: expected true or false",
        ),
        (("iov", "fixed"), "true", "iov.fixed: expected true or false"),
        (("residual", "fixed"), 0, "residual.fixed: expected true or false"),
        (("baseline", "estimate"), "no", "baseline.estimate: expected true or false"),
        (("residual", "form"), "combined", r"residual.form: 'combined' is not one of"),
        (("structure",), 2, "structure: expected a mapping"),
        (("iiv", "parameters"), ["CL", "CL"], "iiv.parameters: CL listed twice"),
        (("iov", "sd"), [0.1, 0.2], "iov.sd: expected 1 values, got 2"),
        (
            ("iiv", "correlation"),
            [[1.0, 0.5], [0.5, 2.0]],
            "iiv.correlation: expected 1 on the diagonal",
        ),
    ],
)
def test_bad_values_are_refused_by_field(where, value, message):
    spec = copy.deepcopy(SPEC)
    _at(spec, where[:-1])[where[-1]] = value
    with pytest.raises(ModelSpecError, match=message):
        parse_model(spec)


def test_a_parameter_given_twice_through_an_alias_is_refused():
    spec = copy.deepcopy(SPEC)
    spec["parameters"]["V"] = 31.0
    with pytest.raises(ModelSpecError, match="parameters.V: V1 is already given"):
        parse_model(spec)


def test_variance_and_sd_together_are_refused():
    spec = copy.deepcopy(SPEC)
    spec["iov"]["variance"] = [0.02]
    with pytest.raises(
        ModelSpecError,
        match="iov: give one of 'variance', 'sd', 'cv', not variance and sd",
    ):
        parse_model(spec)


def test_library_metadata_keys_are_accepted():
    spec = copy.deepcopy(SPEC)
    spec.update(
        brand="Advate",
        inn="octocog alfa",
        model_label="Björkman 2012",
        choose_when="children",
        assay="one-stage",
        assay_conversion={"chromogenic": {"factor": 1.1, "source": "x"}},
        sources={"iiv": {"grade": "verified", "where": "Table 2"}},
        external_validation=[{"reference": "x", "n": 10}],
        vial_notes="250-3000 IU",
    )
    assert parse_model(spec).metadata["inn"] == "octocog alfa"


# the Hydra ``model/`` group also holds the configs of non-PK use cases
NOT_PK = {"multistate.yaml", "sepsis_logistic.yaml"}


def _model_files():
    return sorted((configs_dir() / "model").glob("*.yaml"))


def test_model_group_is_known():
    names = {p.name for p in _model_files()}
    assert NOT_PK <= names
    for p in _model_files():
        spec = yaml.safe_load(p.read_text())
        assert ("structure" in spec) == (p.name not in NOT_PK), p.name


@pytest.mark.parametrize(
    "path", [p for p in _model_files() if p.name not in NOT_PK], ids=lambda p: p.name
)
def test_every_pk_model_file_parses(path):
    model = load_model(path)
    assert model.n_cmt in (1, 2, 3)
