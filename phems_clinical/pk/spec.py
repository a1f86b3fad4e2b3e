"""Population PK model specifications, declared as data (YAML) rather than code.

One format serves the product library (``configs/model/<product>.yaml``), user models
passed to ``phems fit --model MODEL.yaml`` and the Hydra ``model/`` config group.

A specification compiles to a flat vector of named fixed effects (``thetas``): the
typical value of every structural parameter plus every covariate coefficient, each
with NONMEM-style bounds and a ``fixed`` flag. Random effects are log-normal:
``P_i = TV(theta, covariates) * exp(eta_i + kappa_io)`` with ``eta ~ N(0, Omega)``
(IIV) and ``kappa ~ N(0, diag(omega_iov))`` per occasion (IOV).

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
ALIASES = {"V": "V1", "VC": "V1", "Q": "Q2", "VP": "V2", "VP1": "V2", "VP2": "V3",
           "Q1": "Q2"}
EFFECTS = ("power", "linear", "exponential", "indicator")
_COND = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.eE+-]+)\s*$")


class ModelSpecError(ValueError):
    """A population-model specification is invalid; the message names the field."""


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
    """Residual error: ``Var(y) = additive**2 + (proportional * f)**2``.

    ``additive`` in IU/dL, ``proportional`` a fraction (0.1 = 10% CV). NONMEM's
    ``SIGMA`` entries are the squares of these.
    """

    additive: float = 0.0
    proportional: float = 0.0
    fixed: bool = False

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
        return (self.metadata.get("half_life_class") == "extended"
                or self.metadata.get("factor") == "FIX")

    @property
    def n_eta(self) -> int:
        return len(self.iiv_parameters)

    @property
    def n_kappa(self) -> int:
        return len(self.iov_parameters)


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


def _omega(block: dict, params: tuple[str, ...], where: str) -> np.ndarray:
    n = len(params)
    if n == 0:
        return np.zeros((0, 0))
    if "variance" in block:
        om = np.asarray(block["variance"], dtype=np.float64)
        if om.ndim == 1:
            om = np.diag(om)
    elif "sd" in block:
        sd = np.asarray(block["sd"], dtype=np.float64).reshape(-1)
        if sd.shape != (n,):
            raise ModelSpecError(f"{where}.sd: expected {n} values, got {sd.size}")
        corr = np.asarray(block.get("correlation", np.eye(n)), dtype=np.float64)
        if corr.shape != (n, n):
            raise ModelSpecError(f"{where}.correlation: expected a {n}x{n} matrix")
        om = corr * np.outer(sd, sd)
    elif "cv" in block:
        cv = np.asarray(block["cv"], dtype=np.float64).reshape(-1)
        om = np.diag(np.log1p(cv**2))
    else:
        raise ModelSpecError(
            f"{where}: give 'variance', 'sd' (+ 'correlation') or 'cv'")
    if om.shape != (n, n):
        raise ModelSpecError(f"{where}: expected a {n}x{n} matrix for {list(params)}")
    if not np.allclose(om, om.T):
        raise ModelSpecError(f"{where}: the covariance matrix must be symmetric")
    if np.any(np.linalg.eigvalsh(om) <= 0):
        raise ModelSpecError(
            f"{where}: the covariance matrix must be positive definite")
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
    name = str(spec.get("name", "unnamed"))
    struct = spec.get("structure", {}) or {}
    n_cmt = int(struct.get("compartments", 0) or 0)
    if n_cmt not in STRUCTURAL:
        raise ModelSpecError("structure.compartments: expected 1, 2 or 3")
    params = spec.get("parameters")
    if not isinstance(params, dict):
        raise ModelSpecError("parameters: expected a mapping of structural parameters")

    thetas: list[Theta] = []
    given = {}
    for pname, p in params.items():
        canon = _canonical(pname, n_cmt, f"parameters.{pname}")
        if not isinstance(p, dict):
            p = {"value": p}
        given[canon] = p
    for canon in STRUCTURAL[n_cmt]:
        if canon not in given:
            raise ModelSpecError(f"parameters.{canon}: missing (needed by "
                                 f"a {n_cmt}-compartment model)")
        p = given[canon]
        value = _float(p.get("value"), f"parameters.{canon}.value")
        if value <= 0:
            raise ModelSpecError(f"parameters.{canon}.value: must be > 0")
        thetas.append(Theta(canon, value, _float(p.get("lower", 0.0), canon),
                            _float(p.get("upper", math.inf), canon),
                            bool(p.get("fixed", False)), str(p.get("unit", ""))))

    effects: list[CovariateEffect] = []
    for k, c in enumerate(spec.get("covariates", []) or []):
        where = f"covariates[{k}]"
        if not isinstance(c, dict):
            raise ModelSpecError(f"{where}: expected a mapping")
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
                    f"{where}.condition: expected e.g. '< 5' or '== 1'")
            cond = (m.group(1), float(m.group(2)))
        piecewise = c.get("piecewise")
        if piecewise not in (None, "above", "below"):
            raise ModelSpecError(f"{where}.piecewise: expected 'above' or 'below'")
        tname = str(c.get("name", f"{par}_{cov}_{eff[:3]}"))
        if tname in {t.name for t in thetas}:
            raise ModelSpecError(f"{where}.name: duplicate fixed-effect name {tname!r}")
        lower_default = -0.999 if eff == "indicator" else -math.inf
        thetas.append(Theta(tname, _float(c.get("coefficient"), f"{where}.coefficient"),
                            _float(c.get("lower", lower_default), f"{where}.lower"),
                            _float(c.get("upper", math.inf), f"{where}.upper"),
                            bool(c.get("fixed", False))))
        ref = _float(c.get("reference", 1.0 if eff == "power" else 0.0),
                     f"{where}.reference")
        if eff == "power" and ref <= 0:
            raise ModelSpecError(
                f"{where}.reference: a power effect needs reference > 0")
        effects.append(CovariateEffect(par, cov, eff, tname, ref, cond, piecewise))

    iiv = spec.get("iiv", {}) or {}
    iiv_params = tuple(_canonical(p, n_cmt, "iiv.parameters")
                       for p in iiv.get("parameters", []) or [])
    omega = _omega(iiv, iiv_params, "iiv") if iiv_params else np.zeros((0, 0))
    structure = str(iiv.get("structure", "auto"))
    blocks: tuple[tuple[str, ...], ...]
    if structure == "auto":
        off = omega - np.diag(np.diag(omega)) if omega.size else omega
        structure = "full" if omega.size and np.any(off != 0) else "diagonal"
    if structure == "diagonal":
        if omega.size and np.any(omega - np.diag(np.diag(omega)) != 0):
            raise ModelSpecError(
                "iiv.structure: 'diagonal' but correlations were given")
        blocks = tuple((p,) for p in iiv_params)
    elif structure == "full":
        blocks = (iiv_params,) if iiv_params else ()
    elif structure == "block":
        raw = iiv.get("blocks")
        if not raw:
            raise ModelSpecError("iiv.blocks: 'block' structure needs a list of groups")
        blocks = tuple(tuple(_canonical(p, n_cmt, "iiv.blocks") for p in b)
                       for b in raw)
        flat = [p for b in blocks for p in b]
        if sorted(flat) != sorted(iiv_params):
            raise ModelSpecError(
                "iiv.blocks: each IIV parameter must appear in one block")
    else:
        raise ModelSpecError("iiv.structure: expected diagonal, block, full or auto")

    iov = spec.get("iov", {}) or {}
    iov_params = tuple(_canonical(p, n_cmt, "iov.parameters")
                       for p in iov.get("parameters", []) or [])
    omega_iov = (np.diag(_omega(iov, iov_params, "iov")) if iov_params
                 else np.zeros((0,)))

    res = spec.get("residual", {}) or {}
    residual = Residual(_float(res.get("additive", 0.0), "residual.additive"),
                        _float(res.get("proportional", 0.0), "residual.proportional"),
                        bool(res.get("fixed", False)))
    if residual.additive < 0 or residual.proportional < 0:
        raise ModelSpecError("residual: standard deviations must be >= 0")
    if residual.additive == 0 and residual.proportional == 0:
        raise ModelSpecError("residual: give 'additive' (IU/dL) and/or 'proportional'")

    base = spec.get("baseline", {}) or {}
    blq = str(spec.get("blq", "m3"))
    if blq not in ("m3", "drop"):
        raise ModelSpecError("blq: expected 'm3' (likelihood) or 'drop'")

    meta = {k: v for k, v in spec.items()
            if k not in ("structure", "parameters", "covariates", "iiv", "iov",
                         "residual", "baseline", "blq", "name")}
    fitted = meta.get("fitted")
    if fitted is not None and not isinstance(fitted, dict):
        raise ModelSpecError("fitted: expected a mapping (written by phems fit)")
    if fitted is not None and not isinstance(fitted.get("converged", False), bool):
        raise ModelSpecError(f"fitted.converged: expected true or false, got "
                             f"{fitted['converged']!r:.40}")
    return PopModel(
        name=name, n_cmt=n_cmt, thetas=tuple(thetas), structural=STRUCTURAL[n_cmt],
        covariate_effects=tuple(effects), iiv_parameters=iiv_params, omega=omega,
        omega_structure=structure, omega_blocks=blocks,
        omega_fixed=bool(iiv.get("fixed", False)), iov_parameters=iov_params,
        omega_iov=omega_iov, residual=residual,
        baseline=_float(base.get("value", 0.0), "baseline.value"),
        baseline_estimated=bool(base.get("estimate", False)), blq=blq, metadata=meta,
    )


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
    return (f"model {model.name!r}: its fit is not recorded as converged "
            f"(fitted.converged: {fitted.get('converged', 'missing')}); refit it with "
            "phems fit")


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


def with_values(model: PopModel, *, thetas: dict[str, float] | None = None,
                omega: np.ndarray | None = None, omega_iov: np.ndarray | None = None,
                residual: Residual | None = None, baseline: float | None = None
                ) -> PopModel:
    """Return a copy of ``model`` with new parameter values (models are immutable)."""
    from dataclasses import replace

    new_thetas = model.thetas
    if thetas:
        unknown = set(thetas) - set(model.theta_names)
        if unknown:
            raise ModelSpecError(f"unknown fixed effects {sorted(unknown)}")
        new_thetas = tuple(replace(t, value=float(thetas.get(t.name, t.value)))
                           for t in model.thetas)
    return replace(
        model, thetas=new_thetas,
        omega=model.omega if omega is None else np.asarray(omega, np.float64),
        omega_iov=model.omega_iov if omega_iov is None else np.asarray(omega_iov),
        residual=model.residual if residual is None else residual,
        baseline=model.baseline if baseline is None else float(baseline),
    )


_SECTIONS = ("name", "structure", "parameters", "covariates", "iiv", "iov", "residual",
             "baseline", "blq")


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
    other infinite bound is written as YAML's ``.inf``/``-.inf``. IIV is written as
    the full ``variance`` matrix with an explicit ``structure`` (and ``blocks``).

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
        c: dict[str, Any] = {"parameter": e.parameter, "covariate": e.covariate,
                             "effect": e.effect, "reference": float(e.reference)}
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
        iov["variance"] = _plain(np.asarray(model.omega_iov, dtype=np.float64)
                                 .reshape(-1))

    residual: dict[str, Any] = {"additive": float(model.residual.additive),
                                "proportional": float(model.residual.proportional)}
    if model.residual.fixed:
        residual["fixed"] = True

    spec: dict[str, Any] = {"name": model.name}
    spec.update(_plain({k: v for k, v in model.metadata.items()
                        if k not in _SECTIONS}))
    spec.update({
        "structure": {"compartments": int(model.n_cmt)},
        "parameters": parameters,
        "covariates": covariates,
        "iiv": iiv,
        "iov": iov,
        "residual": residual,
        "baseline": {"value": float(model.baseline),
                     "estimate": bool(model.baseline_estimated)},
        "blq": model.blq,
    })
    return spec


def save_model(model: PopModel, path: str | Path, *, header: str | None = None
               ) -> Path:
    """Write ``model`` as a YAML specification that :func:`load_model` reads back.

    ``header`` (optional, may span lines) is written as ``#`` comments above a
    standard line naming the format. Returns the path written.
    """
    path = Path(path)
    lines = [f"# {line}".rstrip() for line in (header or "").splitlines()]
    lines.append("# Population PK model, phems_clinical.pk.spec format "
                 "(read with load_model).")
    text = yaml.safe_dump(to_spec(model), sort_keys=False, allow_unicode=True,
                          default_flow_style=None, width=88)
    path.write_text("\n".join(lines) + "\n" + text, encoding="utf-8")
    return path
