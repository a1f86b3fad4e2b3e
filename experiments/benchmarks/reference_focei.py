"""A plain NumPy/SciPy FOCEI: the "reference approach" of the estimation benchmark.

Written from NONMEM's definition of the FOCEI objective (Wang, J Pharmacokinet
Pharmacodyn 2007;34:575-593), independently of ``phems_clinical.pk`` (no JAX; only
the YAML model *specification* dataclass ``PopModel``, which is plain data, is
shared, so that both implementations read the same model file).

For subject ``i`` with IIV ``eta ~ N(0, Omega)`` the inner objective is

    O_i(eta) = sum_j [log V_j + (y_j - f_j)^2 / V_j] + eta' Omega^-1 eta,
    V_j = add^2 + (prop f_j)^2,

minimised per subject with ``scipy.optimize.minimize`` (BFGS; the gradient is
assembled from ``g = df/deta`` by central finite differences). At the mode
``eta_hat``

    OFV_i = O_i(eta_hat) + log det Omega
            + log det(Omega^-1 + sum_j [g_j g_j' / V_j + 1/2 dV_j dV_j' / V_j^2]),

``dV = 2 prop^2 f g``, and ``OFV = sum_i OFV_i`` (-2 log-likelihood without the
``n_obs log 2 pi`` constant). The outer problem is minimised by
``scipy.optimize.minimize`` (L-BFGS-B) on transformed parameters (log typical
values, logit for two-sided bounds, log-Cholesky Omega, log residual SDs) with
central finite-difference gradients, the inner modes warm-started from the last
accepted point.

Supported: 1- and 2-compartment linear models with IV bolus/zero-order infusion
input (closed-form superposition), log-normal IIV on any structural parameter with
a diagonal or full Omega, the four covariate-effect types of ``spec.py`` (power,
linear incl. piecewise, exponential, indicator), additive + proportional residual
error. Not supported: BLQ (M3), IOV, baseline, 3 compartments.

Units are whatever the data use (the engine is unit-agnostic).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.optimize

_FD_ETA = 1e-5  # central-difference step for df/deta (log-parameter scale)
_OPS = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}


# ---------------------------------------------------------------------------
# Data


@dataclass
class Subject:
    """One subject's events, times relative to its first record."""

    dose_time: np.ndarray
    dose_amt: np.ndarray
    dose_dur: np.ndarray  # 0 = bolus
    obs_time: np.ndarray
    dv: np.ndarray
    covariates: dict


def subjects_from_events(
    df: pd.DataFrame, covariates: tuple[str, ...]
) -> list[Subject]:
    """Subjects from a NONMEM-style event table (upper-case column names).

    Dose rows: ``EVID == 1`` if there is an ``EVID`` column, else ``AMT > 0``.
    Observation rows: ``EVID == 0`` (or ``AMT == 0``) with ``MDV != 1``. Infusion
    length from ``DUR`` (or ``AMT / RATE``), else bolus. BLQ rows are not supported
    and raise.
    """
    df = df.copy()
    df.columns = [str(c).upper() for c in df.columns]
    is_dose = (df["EVID"] == 1) if "EVID" in df else (df["AMT"] > 0)
    is_obs = (df["EVID"] == 0) if "EVID" in df else (df["AMT"] == 0)
    if "MDV" in df:
        is_obs &= df["MDV"] != 1
    if "BLQ" in df and bool((df.loc[is_obs, "BLQ"] == 1).any()):
        raise ValueError("the reference FOCEI does not support BLQ observations")
    out = []
    for _, g in df.groupby("ID", sort=True):
        t0 = float(g["TIME"].min())
        d = g[is_dose.loc[g.index]]
        o = g[is_obs.loc[g.index]]
        if "DUR" in g:
            dur = d["DUR"].fillna(0.0).to_numpy(float)
        elif "RATE" in g:
            rate = d["RATE"].to_numpy(float)
            dur = np.where(
                rate > 0, d["AMT"].to_numpy(float) / np.where(rate > 0, rate, 1.0), 0.0
            )
        else:
            dur = np.zeros(len(d))
        cov = {
            c: float(pd.to_numeric(g[c], errors="coerce").dropna().iloc[0])
            for c in covariates
        }
        out.append(
            Subject(
                d["TIME"].to_numpy(float) - t0,
                d["AMT"].to_numpy(float),
                dur,
                o["TIME"].to_numpy(float) - t0,
                o["DV"].to_numpy(float),
                cov,
            )
        )
    return out


# ---------------------------------------------------------------------------
# Structural model (closed form, vectorised over a stack of parameter sets)


def macro_constants(p: np.ndarray, n_cmt: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-bolus response ``C(t) = sum_k A_k exp(-lam_k t)`` for params ``p (K, 2n)``.

    1 compartment: ``lam = CL/V``, ``A = 1/V``. 2 compartments (Gibaldi & Perrier):
    ``lam`` the roots of ``x^2 - (k10 + k12 + k21) x + k10 k21``,
    ``A_k = (k21 - lam_k) / (V1 (lam_other - lam_k))``.
    """
    cl, v1 = p[:, 0], p[:, 1]
    if n_cmt == 1:
        return (cl / v1)[:, None], (1.0 / v1)[:, None]
    if n_cmt != 2:
        raise NotImplementedError("the reference supports 1 or 2 compartments")
    q, v2 = p[:, 2], p[:, 3]
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s = k10 + k12 + k21
    disc = np.sqrt(s * s - 4.0 * k10 * k21)
    alpha = 0.5 * (s + disc)
    beta = k10 * k21 / alpha
    lam = np.stack([alpha, beta], axis=1)
    a_alpha = (k21 - alpha) / (v1 * (beta - alpha))
    a_beta = (k21 - beta) / (v1 * (alpha - beta))
    return lam, np.stack([a_alpha, a_beta], axis=1)


def concentration(p: np.ndarray, s: Subject, n_cmt: int) -> np.ndarray:
    """Central concentrations ``(K, n_obs)`` for ``K`` parameter sets, superposition.

    Bolus: ``amt sum A exp(-lam t)`` for ``t >= 0``. Infusion at rate
    ``R = amt/dur``: ``R sum A/lam (1 - exp(-lam t))`` during, and
    ``R sum A/lam (1 - exp(-lam dur)) exp(-lam (t - dur))`` after it.
    """
    lam, a = macro_constants(p, n_cmt)  # (K, m)
    lam = lam[:, None, None, :]
    a = a[:, None, None, :]
    t = s.obs_time[None, :, None, None] - s.dose_time[None, None, :, None]
    amt = s.dose_amt[None, None, :, None]
    dur = s.dose_dur[None, None, :, None]
    bolus = dur <= 0.0
    safe_dur = np.where(bolus, 1.0, dur)
    tc = np.maximum(t, 0.0)
    resp_bolus = amt * a * np.exp(-lam * tc)
    during = np.minimum(tc, safe_dur)
    after = np.maximum(tc - safe_dur, 0.0)
    resp_inf = (
        (amt / safe_dur) * a / lam * (-np.expm1(-lam * during)) * np.exp(-lam * after)
    )
    resp = np.where(bolus, resp_bolus, resp_inf)
    resp = np.where(t >= 0.0, resp, 0.0)
    return resp.sum(axis=(2, 3))


# ---------------------------------------------------------------------------
# Parameters


class RefParams(NamedTuple):
    theta: np.ndarray  # all fixed effects, model.theta_names order
    omega: np.ndarray  # (n_eta, n_eta)
    sigma: np.ndarray  # (2,) SDs: additive, proportional


def typical_values(model, theta: np.ndarray, cov: dict) -> np.ndarray:
    """Structural typical values with the four covariate-effect types of spec.py."""
    names = list(model.theta_names)
    tv = {p: theta[names.index(p)] for p in model.structural}
    for e in model.covariate_effects:
        c = theta[names.index(e.theta)]
        x = cov[e.covariate]
        if e.effect == "power":
            fac = (x / e.reference) ** c
        elif e.effect == "linear":
            d = x - e.reference
            if e.piecewise == "above":
                d = max(d, 0.0)
            elif e.piecewise == "below":
                d = min(d, 0.0)
            fac = 1.0 + c * d
        elif e.effect == "exponential":
            fac = math.exp(c * (x - e.reference))
        elif e.effect == "indicator":
            op, value = e.condition
            fac = 1.0 + c if _OPS[op](x, value) else 1.0
        else:
            raise ValueError(e.effect)
        tv[e.parameter] = tv[e.parameter] * fac
    return np.array([tv[p] for p in model.structural], dtype=float)


class Transform:
    """Free vector ``x`` <-> :class:`RefParams` (fixed thetas held at spec values)."""

    def __init__(self, model):
        if model.n_kappa or model.baseline_estimated or model.baseline:
            raise NotImplementedError("no IOV or baseline in the reference")
        self.model = model
        self.free = [i for i, t in enumerate(model.thetas) if not t.fixed]
        self.n_eta = model.n_eta
        self.omega_free = not model.omega_fixed and self.n_eta > 0
        self.full = model.omega_structure != "diagonal"
        res = model.residual
        self.sig_free = [
            k
            for k, v in enumerate((res.additive, res.proportional))
            if v > 0 and not res.fixed
        ]
        self.base = RefParams(
            model.theta_values.copy(),
            np.asarray(model.omega, float).reshape(self.n_eta, self.n_eta),
            np.array([res.additive, res.proportional]),
        )

    def _tri(self):
        if self.full:
            return [(r, c) for r in range(self.n_eta) for c in range(r + 1)]
        return [(r, r) for r in range(self.n_eta)]

    def pack(self, p: RefParams) -> np.ndarray:
        out = []
        for i in self.free:
            t = self.model.thetas[i]
            v = p.theta[i]
            if math.isfinite(t.lower) and math.isfinite(t.upper):
                u = (v - t.lower) / (t.upper - t.lower)
                out.append(math.log(u / (1.0 - u)))
            elif math.isfinite(t.lower):
                out.append(math.log(v - t.lower))
            elif math.isfinite(t.upper):
                out.append(math.log(t.upper - v))
            else:
                out.append(v)
        if self.omega_free:
            ch = (
                np.linalg.cholesky(p.omega)
                if self.full
                else np.diag(np.sqrt(np.diag(p.omega)))
            )
            out += [math.log(ch[r, c]) if r == c else ch[r, c] for r, c in self._tri()]
        out += [math.log(p.sigma[k]) for k in self.sig_free]
        return np.array(out, dtype=float)

    def unpack(self, x: np.ndarray) -> RefParams:
        theta = self.base.theta.copy()
        k = 0
        for i in self.free:
            t = self.model.thetas[i]
            v = x[k]
            if math.isfinite(t.lower) and math.isfinite(t.upper):
                theta[i] = t.lower + (t.upper - t.lower) / (1.0 + math.exp(-v))
            elif math.isfinite(t.lower):
                theta[i] = t.lower + math.exp(v)
            elif math.isfinite(t.upper):
                theta[i] = t.upper - math.exp(v)
            else:
                theta[i] = v
            k += 1
        omega = self.base.omega
        if self.omega_free:
            ch = np.zeros((self.n_eta, self.n_eta))
            for r, c in self._tri():
                ch[r, c] = math.exp(x[k]) if r == c else x[k]
                k += 1
            omega = ch @ ch.T
        sigma = self.base.sigma.copy()
        for j in self.sig_free:
            sigma[j] = math.exp(x[k])
            k += 1
        return RefParams(theta, omega, sigma)

    def natural(self, p: RefParams) -> np.ndarray:
        """NONMEM scale: free thetas, Omega (lower triangle), sigma variances."""
        om = [p.omega[r, c] for r, c in self._tri()] if self.omega_free else []
        return np.concatenate([p.theta[self.free], om, p.sigma[self.sig_free] ** 2])


# ---------------------------------------------------------------------------
# Objective


class _SubjectProblem:
    """Inner problem of one subject at fixed population parameters."""

    def __init__(self, model, s: Subject, p: RefParams, omega_inv: np.ndarray):
        self.s, self.n_cmt = s, model.n_cmt
        self.tv = typical_values(model, p.theta, s.covariates)
        self.idx = [model.structural.index(q) for q in model.iiv_parameters]
        self.omega_inv = omega_inv
        self.add2, self.prop2 = p.sigma[0] ** 2, p.sigma[1] ** 2
        n = len(self.idx)
        self.steps = np.vstack([np.zeros(n), _FD_ETA * np.eye(n), -_FD_ETA * np.eye(n)])

    def f_and_g(self, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prediction ``f (n_obs,)`` and ``g = df/deta (n_obs, n_eta)`` (central FD)."""
        etas = eta[None, :] + self.steps
        p = np.repeat(self.tv[None, :], len(etas), axis=0)
        p[:, self.idx] *= np.exp(etas)
        f = concentration(p, self.s, self.n_cmt)
        n = len(self.idx)
        g = (f[1 : 1 + n] - f[1 + n :]).T / (2.0 * _FD_ETA)
        return f[0], g

    def objective(self, eta: np.ndarray) -> tuple[float, np.ndarray]:
        """``O(eta)`` and its gradient (from the finite-difference ``g``)."""
        with np.errstate(all="ignore"):
            f, g = self.f_and_g(eta)
            v = self.add2 + self.prop2 * f * f
            dv = 2.0 * self.prop2 * f[:, None] * g
            r = self.s.dv - f
            oi_eta = self.omega_inv @ eta
            val = np.sum(np.log(v) + r * r / v) + eta @ oi_eta
            grad = (
                dv / v[:, None]
                - 2.0 * (r / v)[:, None] * g
                - (r * r / (v * v))[:, None] * dv
            ).sum(axis=0) + 2.0 * oi_eta
        if not (np.isfinite(val) and np.all(np.isfinite(grad))):
            return math.inf, np.zeros_like(eta)  # the line search backs off
        return float(val), grad

    def fo_hessian(self, eta: np.ndarray) -> np.ndarray:
        """``Omega^-1 + sum_j [g g'/V + 1/2 dV dV'/V^2]`` (half the Hessian of O)."""
        f, g = self.f_and_g(eta)
        v = self.add2 + self.prop2 * f * f
        dv = 2.0 * self.prop2 * f[:, None] * g
        return (
            self.omega_inv
            + (g / v[:, None]).T @ g
            + 0.5 * (dv / (v * v)[:, None]).T @ dv
        )

    def ofv(self, eta: np.ndarray) -> float:
        """``O(eta) + log det H`` (the caller adds ``log det Omega``)."""
        f, g = self.f_and_g(eta)
        v = self.add2 + self.prop2 * f * f
        dv = 2.0 * self.prop2 * f[:, None] * g
        r = self.s.dv - f
        o = np.sum(np.log(v) + r * r / v) + eta @ self.omega_inv @ eta
        h = (
            self.omega_inv
            + (g / v[:, None]).T @ g
            + 0.5 * (dv / (v * v)[:, None]).T @ dv
        )
        sign, logdet = np.linalg.slogdet(h)
        if not np.isfinite(o):
            return math.inf
        return float(o + logdet) if sign > 0 else math.inf


def focei_ofv(
    model,
    subjects: list[Subject],
    p: RefParams,
    eta0: np.ndarray | None = None,
    inner_gtol: float = 1e-7,
) -> tuple[float, np.ndarray, np.ndarray]:
    """FOCEI OFV, per-subject contributions and modes ``eta_hat (n_sub, n_eta)``."""
    n_eta = model.n_eta
    eta0 = np.zeros((len(subjects), n_eta)) if eta0 is None else eta0
    sign, logdet_omega = np.linalg.slogdet(p.omega)
    if sign <= 0:
        return math.inf, np.full(len(subjects), math.inf), eta0
    omega_inv = np.linalg.inv(p.omega)
    per = np.empty(len(subjects))
    etas = np.empty_like(eta0)
    for i, s in enumerate(subjects):
        prob = _SubjectProblem(model, s, p, omega_inv)
        # BFGS started with the inverse of the first-order Hessian 2 H_FO at the
        # starting point as its curvature (a Gauss-Newton-scaled first step), so
        # that the first step is not a unit step along a gradient of size ~100.
        try:
            h0 = np.linalg.inv(2.0 * prob.fo_hessian(eta0[i]))
            h0 = 0.5 * (h0 + h0.T)  # scipy requires exact symmetry
            if not (np.all(np.isfinite(h0)) and np.all(np.linalg.eigvalsh(h0) > 0)):
                h0 = None
        except np.linalg.LinAlgError:
            h0 = None
        res = scipy.optimize.minimize(
            prob.objective,
            eta0[i],
            jac=True,
            method="BFGS",
            options={"gtol": inner_gtol, "maxiter": 200, "hess_inv0": h0},
        )
        etas[i] = res.x
        per[i] = prob.ofv(res.x) + logdet_omega
    total = float(per.sum())
    return (total if np.isfinite(total) else math.inf), per, etas


class RefResult(NamedTuple):
    ofv: float
    params: RefParams
    estimates: np.ndarray  # NONMEM scale, see Transform.natural
    etas: np.ndarray
    n_iterations: int
    n_ofv_evals: int
    converged: bool
    message: str
    seconds: float


def fit_focei_reference(
    model,
    subjects: list[Subject],
    *,
    maxiter: int = 500,
    fd_step: float = 1e-4,
    ftol: float = 1e-10,
    gtol: float = 1e-3,
) -> RefResult:
    """Minimise the FOCEI OFV from the specification values (L-BFGS-B, FD gradients).

    Each gradient costs ``2 n_free + 1`` OFV evaluations (central differences with
    step ``fd_step`` on the transformed scale); the perturbed evaluations start
    their inner problems from the modes at the centre point, which is what keeps the
    finite differences smooth.
    """
    start = time.perf_counter()
    tr = Transform(model)
    state = {"eta": np.zeros((len(subjects), model.n_eta)), "n": 0}

    def ofv_at(x, eta0):
        state["n"] += 1
        return focei_ofv(model, subjects, tr.unpack(x), eta0)

    def fun(x):
        val, _, eta = ofv_at(x, state["eta"])
        if not math.isfinite(val):
            return 1e30, np.zeros_like(x)
        grad = np.empty_like(x)
        for k in range(x.size):
            e = np.zeros_like(x)
            e[k] = fd_step
            up = ofv_at(x + e, eta)[0]
            dn = ofv_at(x - e, eta)[0]
            grad[k] = (up - dn) / (2.0 * fd_step)
        state["eta"] = eta
        return val, grad

    x0 = tr.pack(tr.base)
    res = scipy.optimize.minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": maxiter, "ftol": ftol, "gtol": gtol, "maxls": 30},
    )
    p = tr.unpack(res.x)
    ofv, _, eta = focei_ofv(model, subjects, p, state["eta"])
    return RefResult(
        ofv,
        p,
        tr.natural(p),
        eta,
        int(res.nit),
        state["n"],
        bool(res.success),
        str(res.message),
        time.perf_counter() - start,
    )


__all__ = [
    "RefParams",
    "RefResult",
    "Subject",
    "Transform",
    "concentration",
    "fit_focei_reference",
    "focei_ofv",
    "subjects_from_events",
    "typical_values",
]
