"""Population PK model specifications, declared as data (YAML) rather than code.

One format serves the product library (``configs/model/<product>.yaml``), user models
passed to ``phems fit --model MODEL.yaml`` and the Hydra ``model/`` config group.

A specification compiles to a flat vector of named fixed effects (``thetas``): the
typical value of every structural parameter plus every covariate coefficient, each
with NONMEM-style bounds and a ``fixed`` flag. Random effects are log-normal:
``P_i = TV(theta, covariates) * exp(eta_i + kappa_io)`` with ``eta ~ N(0, Omega)``
(IIV) and ``kappa ~ N(0, Omega_IOV)`` per occasion (IOV, a full covariance: e.g.
correlated IOV of CL and V1 for Eloctate, Nestorov et al., Clin Pharmacol Drug Dev
2015;4:163-174). Occasion ``k`` starts at its first dose and its parameters govern
all drug in the body from then on (NONMEM's semantics,
:mod:`phems_clinical.pk.occasions`).

The format is strict: an unknown key at any level (top level, ``structure``, a
``parameters`` or ``covariates`` entry, ``iiv``, ``iov``, ``residual``,
``baseline``, ``fitted``) is refused with the closest known key, e.g.
``parameters.CL.lowr: unknown key; did you mean 'lower'?``. Top-level keys other
than the model sections are metadata (:data:`METADATA_KEYS`), free-form values.

Units: time h, amounts IU, volumes dL, clearances dL/h, levels IU/dL.

Examples
--------
>>> m = parse_model({"name": "demo", "structure": {"compartments": 1},
...                  "parameters": {"CL": {"value": 2.0}, "V1": {"value": 30.0}},
...                  "iiv": {"parameters": ["CL"], "sd": [0.3]},
...                  "residual": {"proportional": 0.1}})
>>> m.theta_names
('CL', 'V1')
>>> m.omega.tolist()
[[0.09]]
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

STRUCTURAL = {
    1: ("CL", "V1"),
    2: ("CL", "V1", "Q2", "V2"),
    3: ("CL", "V1", "Q2", "V2", "Q3", "V3"),
}
ALIASES = {
    "V": "V1",
    "VC": "V1",
    "Q": "Q2",
    "VP": "V2",
    "VP1": "V2",
    "VP2": "V3",
    "Q1": "Q2",
}
EFFECTS = ("power", "linear", "exponential", "indicator")
RESIDUAL_FORMS = ("combined2", "combined1")

SECTIONS = (
    "name",
    "structure",
    "parameters",
    "covariates",
    "iiv",
    "iov",
    "residual",
    "baseline",
    "blq",
)
METADATA_KEYS = (
    "citation",
    "product",
    "brand",
    "inn",
    "model_label",
    "factor",
    "half_life_class",
    "population",
    "validated_range",
    "assay",
    "assay_conversion",
    "choose_when",
    "software",
    "reference_covariates",
    "covariate_units",
    "vial_sizes_IU",
    "vial_notes",
    "unverified",
    "sources",
    "external_validation",
    "reference_values",
    "notes",
    "description",
    "baseline_estimated_IU_dL",
    "fitted",
)
"""Top-level keys besides :data:`SECTIONS`: descriptive metadata of the library
(``configs/model/*.yaml``) and of ``phems fit`` outputs (``fitted``), kept in
:attr:`PopModel.metadata`."""
_KEYS = {
    "structure": ("compartments",),
    "parameter": ("value", "lower", "upper", "fixed", "unit"),
    "covariate": (
        "parameter",
        "covariate",
        "effect",
        "coefficient",
        "reference",
        "condition",
        "piecewise",
        "name",
        "lower",
        "upper",
        "fixed",
    ),
    "iiv": (
        "parameters",
        "variance",
        "sd",
        "correlation",
        "cv",
        "structure",
        "blocks",
        "fixed",
    ),
    "iov": ("parameters", "variance", "sd", "correlation", "cv", "fixed"),
    "residual": ("additive", "proportional", "form", "fixed"),
    "baseline": ("value", "estimate"),
    "fitted": (
        "method",
        "data",
        "n_subjects",
        "n_observations",
        "ofv",
        "seed",
        "date",
        "converged",
    ),
}
_COND = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.eE+-]+)\s*$")


class ModelSpecError(ValueError):
    """A population-model specification is invalid; the message names the field."""


def _check_keys(block: dict, allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys of ``block`` not in ``allowed``, suggesting the closest one."""
    for key in block:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else f"expected one of {', '.join(allowed)}"
        )
        raise ModelSpecError(f"{where}{'.' if where else ''}{key}: unknown key; {hint}")


def _mapping(x: Any, where: str, allowed: tuple[str, ...]) -> dict:
    """``x`` (``None`` -> empty) as a mapping with only ``allowed`` keys."""
    if x is None:
        return {}
    if not isinstance(x, dict):
        raise ModelSpecError(f"{where}: expected a mapping, got {x!r:.40}")
    _check_keys(x, allowed, where)
    return x


def _bool(x: Any, where: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise ModelSpecError(f"{where}: expected true or false, got {x!r:.40}")
    return bool(x)


@dataclass(frozen=True)
class Theta:
    """One fixed effect.

    ``lower``/``upper`` are NONMEM-style bounds used to choose the unconstrained
    transform during estimation (log for ``lower == 0``, logit for two bounds).
    """

    name: str
    value: float
    lower: float = -math.inf
    upper: float = math.inf
    fixed: bool = False
    unit: str = ""


@dataclass(frozen=True)
class CovariateEffect:
    """A multiplicative covariate effect on one structural typical value.

    * ``power``: ``TV *= (cov / reference) ** theta``
    * ``linear``: ``TV *= 1 + theta * (cov - reference)``; with ``piecewise="above"``
      only ``max(0, cov - reference)`` counts (``"below"``: ``min(0, ...)``)
    * ``exponential``: ``TV *= exp(theta * (cov - reference))``
    * ``indicator``: ``TV *= 1 + theta * [cov <op> value]`` (e.g. ``"< 5"``, ``"== 1"``)
    """

    parameter: str
    covariate: str
    effect: str
    theta: str
    reference: float = 0.0
    condition: tuple[str, float] | None = None
    piecewise: str | None = None


@dataclass(frozen=True)
class Residual:
    """Residual error of a level ``f`` (IU/dL), in one of two forms:

    * ``combined2`` (default, NONMEM ``Y = F + F*EPS(1) + EPS(2)``):
      ``Var(y) = additive**2 + (proportional * f)**2``;
    * ``combined1`` (Monolix): ``SD(y) = additive + proportional * f``, e.g. Allard
      et al., Pharmaceutics 2020;12:380, Eq. 3.

    ``additive`` in IU/dL, ``proportional`` a fraction (0.1 = 10% CV). NONMEM's
    ``SIGMA`` entries are the squares of these.
    """

    additive: float = 0.0
    proportional: float = 0.0
    fixed: bool = False
    form: str = "combined2"

    @property
    def kind(self) -> str:
        if self.additive > 0 and self.proportional > 0:
            return "combined"
        return "additive" if self.additive > 0 else "proportional"


@dataclass(frozen=True)
class PopModel:
    """A compiled population PK model (immutable)."""

    name: str
    n_cmt: int
    thetas: tuple[Theta, ...]
    structural: tuple[str, ...]
    covariate_effects: tuple[CovariateEffect, ...]
    iiv_parameters: tuple[str, ...]
    omega: np.ndarray
    omega_structure: str
    omega_blocks: tuple[tuple[str, ...], ...]
    omega_fixed: bool
    iov_parameters: tuple[str, ...]
    omega_iov: np.ndarray
    residual: Residual
    omega_iov_fixed: bool = False
    baseline: float = 0.0
    baseline_estimated: bool = False
    blq: str = "m3"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def theta_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.thetas)

    @property
    def theta_values(self) -> np.ndarray:
        return np.array([t.value for t in self.thetas], dtype=np.float64)

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """Covariates the model needs, in the column order of ``Cohort.covariates``."""
        seen: list[str] = []
        for e in self.covariate_effects:
            if e.covariate not in seen:
                seen.append(e.covariate)
        return tuple(seen)

    @property
    def reference_covariates(self) -> dict[str, float]:
        """Covariate values at which typical values are defined (from the spec)."""
        ref = dict(self.metadata.get("reference_covariates", {}))
        for e in self.covariate_effects:
            if e.covariate not in ref:
                ref[e.covariate] = e.reference if e.effect != "indicator" else 0.0
        return ref

    @property
    def extended_half_life(self) -> bool:
        """An extended half-life product or a FIX concentrate (metadata
        ``half_life_class``/``factor``): later ISTH sampling windows and dosing
        intervals up to weekly."""
        return (
            self.metadata.get("half_life_class") == "extended"
            or self.metadata.get("factor") == "FIX"
        )

    @property
    def n_eta(self) -> int:
        return len(self.iiv_parameters)

    @property
    def n_kappa(self) -> int:
        return len(self.iov_parameters)

    @property
    def iov_correlated(self) -> bool:
        """``omega_iov`` has non-zero off-diagonal elements."""
        om = np.asarray(self.omega_iov)
        return bool(om.size and np.any(om - np.diag(np.diag(om)) != 0))


def parameter_units(model: Any, names: Any) -> dict[str, str]:
    """``{name: unit}`` of the NONMEM-named estimates (``THETA(CL)``) whose
    typical value declares a unit in the model (e.g. ``dL/h``); others are left
    out (their unit is not stated)."""
    units = {
        f"THETA({t.name})": t.unit
        for t in getattr(model, "thetas", ())
        if getattr(t, "unit", "")
    }
    return {n: units[n] for n in names if n in units}


def check_iov_estimable(model: PopModel) -> None:
    """Refuse to *estimate* a correlated IOV block (only variances are estimated).

    Forecasting, simulation and dosing use the full block; estimation
    (FOCEI, population NUTS/SVI, federated fits) needs ``iov.fixed: true`` for a
    correlated one.
    """
    if model.iov_correlated and not model.omega_iov_fixed:
        raise ModelSpecError(
            f"iov.correlation: model {model.name!r} has a correlated IOV block; "
            "estimation estimates IOV variances only, so set iov.fixed: true (the "
            "block is then used as given) or remove the correlation"
        )


def _float(x: Any, where: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ModelSpecError(f"{where}: expected a number, got {x!r}") from None


def _canonical(name: str, n_cmt: int, where: str) -> str:
    up = str(name).upper()
    up = ALIASES.get(up, up)
    if up not in STRUCTURAL[n_cmt]:
        raise ModelSpecError(
            f"{where}: unknown parameter {name!r} for a {n_cmt}-compartment model; "
            f"expected one of {', '.join(STRUCTURAL[n_cmt])}"
        )
    return up


def _array(x: Any, where: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelSpecError(f"{where}: expected numbers, got {x!r:.60}") from None


def _omega(block: dict, params: tuple[str, ...], where: str) -> np.ndarray:
    """Covariance matrix from ``variance`` (matrix, or a list of variances), ``sd``
    (+ ``correlation``) or ``cv`` (+ ``correlation``; ``log(1 + cv^2)`` variances)."""
    n = len(params)
    if n == 0:
        return np.zeros((0, 0))
    given = [k for k in ("variance", "sd", "cv") if k in block]
    if len(given) > 1:
        raise ModelSpecError(
            f"{where}: give one of 'variance', 'sd', 'cv', not {' and '.join(given)}"
        )
    if "correlation" in block and "variance" in block:
        raise ModelSpecError(
            f"{where}.correlation: goes with 'sd' or 'cv'; a "
            "'variance' matrix already holds the covariances"
        )
    if "variance" in block:
        om = _array(block["variance"], f"{where}.variance")
        if om.ndim == 1:
            if om.shape != (n,):
                raise ModelSpecError(
                    f"{where}.variance: expected {n} values, got {om.size}"
                )
            om = np.diag(om)
    elif "sd" in block or "cv" in block:
        key = "sd" if "sd" in block else "cv"
        sd = _array(block[key], f"{where}.{key}").reshape(-1)
        if sd.shape != (n,):
            raise ModelSpecError(f"{where}.{key}: expected {n} values, got {sd.size}")
        if key == "cv":
            sd = np.sqrt(np.log1p(sd**2))
        corr = _array(block.get("correlation", np.eye(n)), f"{where}.correlation")
        if corr.shape != (n, n):
            raise ModelSpecError(f"{where}.correlation: expected a {n}x{n} matrix")
        if np.any(np.diag(corr) != 1.0) or np.any(np.abs(corr) > 1.0):
            raise ModelSpecError(
                f"{where}.correlation: expected 1 on the diagonal and values in [-1, 1]"
            )
        om = corr * np.outer(sd, sd)
    else:
        raise ModelSpecError(
            f"{where}: give 'variance', 'sd' (+ 'correlation') or 'cv'"
        )
    if om.shape != (n, n):
        raise ModelSpecError(f"{where}: expected a {n}x{n} matrix for {list(params)}")
    if not np.allclose(om, om.T):
        raise ModelSpecError(f"{where}: the covariance matrix must be symmetric")
    if np.any(np.linalg.eigvalsh(om) <= 0):
        raise ModelSpecError(
            f"{where}: the covariance matrix must be positive definite"
        )
    return om


def parse_model(spec: dict[str, Any]) -> PopModel:
    """Validate a model dictionary (as read from YAML) and compile it.

    Raises
    ------
    ModelSpecError
        Naming the offending field and what was expected.
    """
    if not isinstance(spec, dict):
        raise ModelSpecError("model: expected a mapping")
    _check_keys(spec, SECTIONS + METADATA_KEYS, "")
    name = str(spec.get("name", "unnamed"))
    struct = _mapping(spec.get("structure"), "structure", _KEYS["structure"])
    n_cmt = struct.get("compartments", 0) or 0
    if isinstance(n_cmt, bool) or n_cmt not in STRUCTURAL:
        raise ModelSpecError("structure.compartments: expected 1, 2 or 3")
    n_cmt = int(n_cmt)
    params = spec.get("parameters")
    if not isinstance(params, dict):
        raise ModelSpecError("parameters: expected a mapping of structural parameters")

    thetas: list[Theta] = []
    given: dict[str, tuple[str, dict]] = {}
    for pname, p in params.items():
        canon = _canonical(pname, n_cmt, f"parameters.{pname}")
        if canon in given:
            raise ModelSpecError(
                f"parameters.{pname}: {canon} is already given as {given[canon][0]!r}"
            )
        p = (
            {"value": p}
            if not isinstance(p, dict)
            else _mapping(p, f"parameters.{pname}", _KEYS["parameter"])
        )
        given[canon] = (str(pname), p)
    for canon in STRUCTURAL[n_cmt]:
        if canon not in given:
            raise ModelSpecError(
                f"parameters.{canon}: missing (needed by a {n_cmt}-compartment model)"
            )
        pname, p = given[canon]
        where = f"parameters.{pname}"
        value = _float(p.get("value"), f"{where}.value")
        if value <= 0:
            raise ModelSpecError(f"{where}.value: must be > 0")
        thetas.append(
            Theta(
                canon,
                value,
                _float(p.get("lower", 0.0), f"{where}.lower"),
                _float(p.get("upper", math.inf), f"{where}.upper"),
                _bool(p.get("fixed", False), f"{where}.fixed"),
                str(p.get("unit", "")),
            )
        )

    effects: list[CovariateEffect] = []
    covs = spec.get("covariates", []) or []
    if not isinstance(covs, list):
        raise ModelSpecError("covariates: expected a list of covariate effects")
    for k, c in enumerate(covs):
        where = f"covariates[{k}]"
        if not isinstance(c, dict):
            raise ModelSpecError(f"{where}: expected a mapping")
        _check_keys(c, _KEYS["covariate"], where)
        par = _canonical(c.get("parameter", ""), n_cmt, f"{where}.parameter")
        cov = str(c.get("covariate", "")).upper()
        if not cov:
            raise ModelSpecError(f"{where}.covariate: missing")
        eff = str(c.get("effect", ""))
        if eff not in EFFECTS:
            raise ModelSpecError(f"{where}.effect: {eff!r} is not one of {EFFECTS}")
        cond = None
        if eff == "indicator":
            m = _COND.match(str(c.get("condition", "== 1")))
            if not m:
                raise ModelSpecError(
                    f"{where}.condition: expected e.g. '< 5' or '== 1'"
                )
            cond = (m.group(1), float(m.group(2)))
        piecewise = c.get("piecewise")
        if piecewise not in (None, "above", "below"):
            raise ModelSpecError(f"{where}.piecewise: expected 'above' or 'below'")
        tname = str(c.get("name", f"{par}_{cov}_{eff[:3]}"))
        if tname in {t.name for t in thetas}:
            raise ModelSpecError(f"{where}.name: duplicate fixed-effect name {tname!r}")
        lower_default = -0.999 if eff == "indicator" else -math.inf
        thetas.append(
            Theta(
                tname,
                _float(c.get("coefficient"), f"{where}.coefficient"),
                _float(c.get("lower", lower_default), f"{where}.lower"),
                _float(c.get("upper", math.inf), f"{where}.upper"),
                _bool(c.get("fixed", False), f"{where}.fixed"),
            )
        )
        ref = _float(
            c.get("reference", 1.0 if eff == "power" else 0.0), f"{where}.reference"
        )
        if eff == "power" and ref <= 0:
            raise ModelSpecError(
                f"{where}.reference: a power effect needs reference > 0"
            )
        effects.append(CovariateEffect(par, cov, eff, tname, ref, cond, piecewise))

    iiv = _mapping(spec.get("iiv"), "iiv", _KEYS["iiv"])
    iiv_params = _random_parameters(iiv, n_cmt, "iiv")
    omega = _omega(iiv, iiv_params, "iiv") if iiv_params else np.zeros((0, 0))
    structure = str(iiv.get("structure", "auto"))
    blocks: tuple[tuple[str, ...], ...]
    if structure == "auto":
        off = omega - np.diag(np.diag(omega)) if omega.size else omega
        structure = "full" if omega.size and np.any(off != 0) else "diagonal"
    if structure == "diagonal":
        if omega.size and np.any(omega - np.diag(np.diag(omega)) != 0):
            raise ModelSpecError(
                "iiv.structure: 'diagonal' but correlations were given"
            )
        blocks = tuple((p,) for p in iiv_params)
    elif structure == "full":
        blocks = (iiv_params,) if iiv_params else ()
    elif structure == "block":
        raw = iiv.get("blocks")
        if not raw:
            raise ModelSpecError("iiv.blocks: 'block' structure needs a list of groups")
        blocks = tuple(
            tuple(_canonical(p, n_cmt, "iiv.blocks") for p in b) for b in raw
        )
        flat = [p for b in blocks for p in b]
        if sorted(flat) != sorted(iiv_params):
            raise ModelSpecError(
                "iiv.blocks: each IIV parameter must appear in one block"
            )
    else:
        raise ModelSpecError("iiv.structure: expected diagonal, block, full or auto")

    iov = _mapping(spec.get("iov"), "iov", _KEYS["iov"])
    iov_params = _random_parameters(iov, n_cmt, "iov")
    omega_iov = _omega(iov, iov_params, "iov") if iov_params else np.zeros((0, 0))
    omega_fixed = _bool(iiv.get("fixed", False), "iiv.fixed")
    # IOV is estimated together with IIV unless iov.fixed says otherwise
    omega_iov_fixed = _bool(iov.get("fixed", omega_fixed), "iov.fixed")

    res = _mapping(spec.get("residual"), "residual", _KEYS["residual"])
    form = res.get("form", "combined2")
    if form not in RESIDUAL_FORMS:
        raise ModelSpecError(
            f"residual.form: {form!r} is not one of "
            f"{', '.join(RESIDUAL_FORMS)} (combined2: NONMEM, "
            "Var = a^2 + (b f)^2; combined1: Monolix, SD = a + b f)"
        )
    residual = Residual(
        _float(res.get("additive", 0.0), "residual.additive"),
        _float(res.get("proportional", 0.0), "residual.proportional"),
        _bool(res.get("fixed", False), "residual.fixed"),
        str(form),
    )
    if residual.additive < 0 or residual.proportional < 0:
        raise ModelSpecError("residual: standard deviations must be >= 0")
    if residual.additive == 0 and residual.proportional == 0:
        raise ModelSpecError("residual: give 'additive' (IU/dL) and/or 'proportional'")

    base = _mapping(spec.get("baseline"), "baseline", _KEYS["baseline"])
    blq = str(spec.get("blq", "m3"))
    if blq not in ("m3", "drop"):
        raise ModelSpecError("blq: expected 'm3' (likelihood) or 'drop'")

    meta = {k: v for k, v in spec.items() if k not in SECTIONS}
    fitted = meta.get("fitted")
    if fitted is not None:
        _mapping(fitted, "fitted", _KEYS["fitted"])
        if not isinstance(fitted.get("converged", False), bool):
            raise ModelSpecError(
                f"fitted.converged: expected true or false, got "
                f"{fitted['converged']!r:.40}"
            )
    return PopModel(
        name=name,
        n_cmt=n_cmt,
        thetas=tuple(thetas),
        structural=STRUCTURAL[n_cmt],
        covariate_effects=tuple(effects),
        iiv_parameters=iiv_params,
        omega=omega,
        omega_structure=structure,
        omega_blocks=blocks,
        omega_fixed=omega_fixed,
        iov_parameters=iov_params,
        omega_iov=omega_iov,
        residual=residual,
        omega_iov_fixed=omega_iov_fixed,
        baseline=_float(base.get("value", 0.0), "baseline.value"),
        baseline_estimated=_bool(base.get("estimate", False), "baseline.estimate"),
        blq=blq,
        metadata=meta,
    )


def _random_parameters(block: dict, n_cmt: int, where: str) -> tuple[str, ...]:
    """The canonical names of ``block['parameters']``, each at most once."""
    raw = block.get("parameters", []) or []
    if not isinstance(raw, list):
        raise ModelSpecError(f"{where}.parameters: expected a list of parameter names")
    out = tuple(_canonical(p, n_cmt, f"{where}.parameters") for p in raw)
    dup = sorted({p for p in out if out.count(p) > 1})
    if dup:
        raise ModelSpecError(f"{where}.parameters: {', '.join(dup)} listed twice")
    if not out and any(k in block for k in ("variance", "sd", "cv", "correlation")):
        raise ModelSpecError(
            f"{where}.parameters: missing (the variances given "
            "need the parameters they belong to)"
        )
    return out


def not_converged(model: PopModel) -> str | None:
    """Why a fitted ``model`` must not be used (``None`` when it may be).

    A model written by ``phems fit`` carries ``fitted: {..., converged: true}``;
    one whose ``fitted`` block lacks ``converged: true`` (a failed fit, or one
    written before convergence was recorded) is refused. Library products have no
    ``fitted`` block.
    """
    fitted = model.metadata.get("fitted")
    if fitted is None or fitted.get("converged") is True:
        return None
    return (
        f"model {model.name!r}: its fit is not recorded as converged "
        f"(fitted.converged: {fitted.get('converged', 'missing')}); refit it with "
        "phems fit"
    )


def load_model(path: str | Path) -> PopModel:
    """Read and compile a model YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    with path.open() as fh:
        spec = yaml.safe_load(fh)
    try:
        return parse_model(spec)
    except ModelSpecError as err:
        raise ModelSpecError(f"{path}: {err}") from None


def with_values(
    model: PopModel,
    *,
    thetas: dict[str, float] | None = None,
    omega: np.ndarray | None = None,
    omega_iov: np.ndarray | None = None,
    residual: Residual | None = None,
    baseline: float | None = None,
) -> PopModel:
    """Return a copy of ``model`` with new parameter values (models are immutable).

    ``omega_iov`` is the IOV covariance matrix; a 1-D array is taken as variances.
    """
    from dataclasses import replace

    if omega_iov is not None:
        omega_iov = np.asarray(omega_iov, np.float64)
        if omega_iov.ndim == 1:
            omega_iov = np.diag(omega_iov)
        if omega_iov.shape != (model.n_kappa, model.n_kappa):
            raise ModelSpecError(
                f"omega_iov: expected a {model.n_kappa}x"
                f"{model.n_kappa} matrix, got {omega_iov.shape}"
            )

    new_thetas = model.thetas
    if thetas:
        unknown = set(thetas) - set(model.theta_names)
        if unknown:
            raise ModelSpecError(f"unknown fixed effects {sorted(unknown)}")
        new_thetas = tuple(
            replace(t, value=float(thetas.get(t.name, t.value))) for t in model.thetas
        )
    return replace(
        model,
        thetas=new_thetas,
        omega=model.omega if omega is None else np.asarray(omega, np.float64),
        omega_iov=model.omega_iov if omega_iov is None else omega_iov,
        residual=model.residual if residual is None else residual,
        baseline=model.baseline if baseline is None else float(baseline),
    )


def _plain(x: Any) -> Any:
    """``x`` as plain YAML data: numpy scalars/arrays and tuples become floats/lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _bounds(t: Theta, lower_default: float) -> dict[str, float]:
    """The bounds of ``t`` that differ from :func:`parse_model`'s defaults."""
    out = {}
    if t.lower != lower_default:
        out["lower"] = float(t.lower)
    if t.upper != math.inf:
        out["upper"] = float(t.upper)
    return out


def to_spec(model: PopModel) -> dict[str, Any]:
    """The specification dictionary of ``model``: the inverse of :func:`parse_model`.

    ``parse_model(to_spec(m))`` reproduces every field of ``m`` (values exactly, as
    ``yaml.safe_dump`` writes floats with ``repr``) and its metadata. The result holds
    only plain ``float``/``int``/``bool``/``str``/``list``/``dict`` values, so it can
    be written with ``yaml.safe_dump`` (see :func:`save_model`). Bounds equal to the
    parser's defaults (``lower: 0`` for structural parameters, ``-0.999`` for
    indicator and ``-inf`` for other coefficients, ``upper: inf``) are left out; any
    other infinite bound is written as YAML's ``.inf``/``-.inf``. IIV and IOV are
    written as full ``variance`` matrices (IIV with an explicit ``structure`` and
    ``blocks``), ``iov.fixed`` and ``residual.form`` explicitly.

    Examples
    --------
    >>> m = parse_model({"name": "demo", "structure": {"compartments": 1},
    ...                  "parameters": {"CL": 2.0, "V": 30.0},
    ...                  "iiv": {"parameters": ["CL"], "sd": [0.3]},
    ...                  "residual": {"proportional": 0.1}})
    >>> spec = to_spec(m)
    >>> spec["parameters"]
    {'CL': {'value': 2.0}, 'V1': {'value': 30.0}}
    >>> spec["iiv"]["variance"]
    [[0.09]]
    >>> parse_model(spec).theta_values.tolist() == m.theta_values.tolist()
    True
    """
    by_name = {t.name: t for t in model.thetas}
    parameters: dict[str, Any] = {}
    for p in model.structural:
        t = by_name[p]
        entry: dict[str, Any] = {"value": float(t.value), **_bounds(t, 0.0)}
        if t.fixed:
            entry["fixed"] = True
        if t.unit:
            entry["unit"] = t.unit
        parameters[p] = entry

    covariates = []
    for e in model.covariate_effects:
        t = by_name[e.theta]
        c: dict[str, Any] = {
            "parameter": e.parameter,
            "covariate": e.covariate,
            "effect": e.effect,
            "reference": float(e.reference),
        }
        if e.condition is not None:
            op, value = e.condition
            c["condition"] = f"{op} {float(value)!r}"
        if e.piecewise is not None:
            c["piecewise"] = e.piecewise
        c["coefficient"] = float(t.value)
        c["name"] = e.theta
        c.update(_bounds(t, -0.999 if e.effect == "indicator" else -math.inf))
        if t.fixed:
            c["fixed"] = True
        covariates.append(c)

    iiv: dict[str, Any] = {}
    if model.iiv_parameters:
        iiv["parameters"] = list(model.iiv_parameters)
        iiv["variance"] = _plain(np.asarray(model.omega, dtype=np.float64))
        iiv["structure"] = model.omega_structure
        if model.omega_structure == "block":
            iiv["blocks"] = [list(b) for b in model.omega_blocks]
    if model.omega_fixed:
        iiv["fixed"] = True
    iov: dict[str, Any] = {}
    if model.iov_parameters:
        iov["parameters"] = list(model.iov_parameters)
        iov["variance"] = _plain(np.asarray(model.omega_iov, dtype=np.float64))
        iov["fixed"] = bool(model.omega_iov_fixed)

    residual: dict[str, Any] = {
        "additive": float(model.residual.additive),
        "proportional": float(model.residual.proportional),
        "form": model.residual.form,
    }
    if model.residual.fixed:
        residual["fixed"] = True

    spec: dict[str, Any] = {"name": model.name}
    spec.update(_plain({k: v for k, v in model.metadata.items() if k not in SECTIONS}))
    spec.update(
        {
            "structure": {"compartments": int(model.n_cmt)},
            "parameters": parameters,
            "covariates": covariates,
            "iiv": iiv,
            "iov": iov,
            "residual": residual,
            "baseline": {
                "value": float(model.baseline),
                "estimate": bool(model.baseline_estimated),
            },
            "blq": model.blq,
        }
    )
    return spec


def save_model(model: PopModel, path: str | Path, *, header: str | None = None) -> Path:
    """Write ``model`` as a YAML specification that :func:`load_model` reads back.

    ``header`` (optional, may span lines) is written as ``#`` comments above a
    standard line naming the format. Returns the path written.
    """
    path = Path(path)
    lines = [f"# {line}".rstrip() for line in (header or "").splitlines()]
    lines.append(
        "# Population PK model, phems_clinical.pk.spec format (read with load_model)."
    )
    text = yaml.safe_dump(
        to_spec(model),
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=None,
        width=88,
    )
    path.write_text("\n".join(lines) + "\n" + text, encoding="utf-8")
    return path
