"""Closed-form linear mammillary PK: disposition macro-constants and IV dose responses.

A 1-, 2- or 3-compartment model with IV input into, and observation in, the central
compartment. Its unit-bolus response is ``C(t) = sum_i A_i exp(-lambda_i t)``; a dose of
``amt`` IU infused at a constant rate over ``dur`` h (``dur == 0``: bolus) gives

``C(t) = amt/dur * sum_i A_i/lambda_i * (1 - exp(-lambda_i min(t, dur)))
* exp(-lambda_i max(t - dur, 0))``,

and a dose history gives the sum over its doses (superposition, the model is linear).

Units: time h, amounts IU, volumes dL, clearances dL/h, levels IU/dL.

One patient's parameters are a 1-D array in the order of ``PARAM_NAMES[n_cmt]``:
``(CL, V1)``, ``(CL, V1, Q2, V2)`` or ``(CL, V1, Q2, V2, Q3, V3)``. All functions are
pure and single-patient: batch with ``jax.vmap``, compile with ``jax.jit`` at the call
site. ``n_cmt`` is a static Python int.

References
----------
.. [1] Abuhelwa AY, Foster DJR, Upton RN. ADVAN-style analytical solutions for common
   pharmacokinetic models. J Pharmacol Toxicol Methods 2015;73:42-48.
.. [2] Gibaldi M, Perrier D. Pharmacokinetics, 2nd ed. New York: Marcel Dekker; 1982,
   ch. 2-3 and appendix C.

Examples
--------
>>> import jax.numpy as jnp
>>> lam, a = macro_constants(jnp.array([2.0, 40.0]), 1)
>>> round(float(lam[0]), 6), round(float(a[0]), 6)
(0.05, 0.025)
>>> round(float(dose_response(0.0, 1000.0, 0.0, jnp.array([2.0, 40.0]), 1)), 4)
25.0
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from phems_clinical._typing import Array, Float

__all__ = [
    "PARAM_NAMES",
    "concentration",
    "dose_response",
    "macro_constants",
    "macro_constants_eigh",
    "steady_state",
    # building blocks shared with derived.py and occasions.py
    "as_float",
    "check_params",
    "exprel1",
    "exprel2",
    "per_dose_macro",
    "macro_response",
    "macro_response_slope",
    "unit_modes",
]

PARAM_NAMES: dict[int, tuple[str, ...]] = {
    1: ("CL", "V1"),
    2: ("CL", "V1", "Q2", "V2"),
    3: ("CL", "V1", "Q2", "V2", "Q3", "V3"),
}

# Below this argument the exprel functions switch to their Taylor series: the direct
# formulas lose ~eps/x relative accuracy in their derivatives. Nine terms keep the
# truncation error below 3e-16 at the switch.
_SERIES_BELOW = 0.1
_N_TERMS = 9


def as_float(x: ArrayLike) -> Array:
    """``x`` as a JAX float array (float64 under ``jax_enable_x64``)."""
    return jnp.asarray(x, dtype=float)


def check_params(params: ArrayLike, n_cmt: int) -> Array:
    """``params`` as floats, checked to hold the ``2 * n_cmt`` parameters of an
    ``n_cmt``-compartment model in its last axis (``ValueError`` otherwise)."""
    if n_cmt not in PARAM_NAMES:
        raise ValueError(f"n_cmt must be 1, 2 or 3, got {n_cmt!r}")
    params = as_float(params)
    if params.shape[-1:] != (2 * n_cmt,):
        raise ValueError(
            f"a {n_cmt}-compartment model takes {2 * n_cmt} parameters "
            f"{PARAM_NAMES[n_cmt]}; got params of shape {params.shape}"
        )
    return params


def _series(x: Array, coeffs: list[float]) -> Array:
    out = jnp.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def exprel1(x: Array) -> Array:
    """``(1 - exp(-x)) / x``, 1 at 0; finite value and derivatives."""
    small = jnp.abs(x) < _SERIES_BELOW
    xs = jnp.where(small, 1.0, x)
    direct = -jnp.expm1(-xs) / xs
    series = _series(x, [(-1.0) ** k / math.factorial(k + 1) for k in range(_N_TERMS)])
    return jnp.where(small, series, direct)


def exprel2(x: Array) -> Array:
    """``(x - 1 + exp(-x)) / x**2``, 1/2 at 0; finite value and derivatives."""
    small = jnp.abs(x) < _SERIES_BELOW
    xs = jnp.where(small, 1.0, x)
    direct = (xs + jnp.expm1(-xs)) / (xs * xs)
    series = _series(x, [(-1.0) ** k / math.factorial(k + 2) for k in range(_N_TERMS)])
    return jnp.where(small, series, direct)


def _coefficients(lam: Array, k_back: Array, v1: Array) -> Array:
    """``A_i = prod_j (k_j1 - lam_i) / (V1 prod_{m != i} (lam_m - lam_i))``."""
    n = lam.shape[0]
    num = jnp.prod(k_back[None, :] - lam[:, None], axis=1)
    gaps = jnp.where(jnp.eye(n, dtype=bool), 1.0, lam[None, :] - lam[:, None])
    return num / (v1 * jnp.prod(gaps, axis=1))


def macro_constants(
    params: Float[ArrayLike, " n_par"], n_cmt: int
) -> tuple[Float[Array, " n_cmt"], Float[Array, " n_cmt"]]:
    """Disposition rate constants and coefficients of the unit-bolus response.

    The response of the central concentration to a 1 IU bolus is
    ``C(t) = sum_i A_i exp(-lambda_i t)``. Computed in closed form: the quadratic
    formula (2 compartments) or the trigonometric (Viete) roots of the characteristic
    cubic (3 compartments), refined by one Newton step because the smallest root
    comes out of the trigonometric form with an absolute, not relative, error of
    ``eps * (k10 + k12 + k13 + k21 + k31)``. Then ``A_i`` from the residues
    (Gibaldi & Perrier, app. C).

    Parameters
    ----------
    params : (2 * n_cmt,) array
        ``PARAM_NAMES[n_cmt]``: clearances in dL/h, volumes in dL, all positive.
    n_cmt : {1, 2, 3}
        Number of compartments (static).

    Returns
    -------
    lambdas : (n_cmt,) array
        Rate constants in 1/h, ascending: ``lambdas[0]`` is the terminal one.
    A : (n_cmt,) array
        Coefficients in 1/dL; positive, ``sum(A) == 1/V1`` and
        ``sum(A / lambdas) == 1/CL``.

    See Also
    --------
    macro_constants_eigh : the same from a symmetric eigendecomposition.

    References
    ----------
    Abuhelwa, Foster & Upton 2015 (PKADVAN), J Pharmacol Toxicol Methods 73:42-48;
    Gibaldi & Perrier, Pharmacokinetics, 2nd ed., 1982.
    """
    params = check_params(params, n_cmt)
    if params.ndim != 1:
        raise ValueError(f"params must be 1-D (one patient), got {params.shape}")
    cl, v1 = params[0], params[1]
    k10 = cl / v1
    k_out = params[2::2] / v1
    k_back = params[2::2] / params[3::2]
    if n_cmt == 1:
        return k10[None], (1.0 / v1)[None]
    if n_cmt == 2:
        k12, k21 = k_out[0], k_back[0]
        # discriminant as a sum of squares: no cancellation, and > 0 whenever Q > 0
        s = jnp.sqrt((k10 + k12 - k21) ** 2 + 4.0 * k12 * k21)
        fast = 0.5 * (k10 + k12 + k21 + s)
        slow = k10 * k21 / fast  # product of the roots, avoids a - s cancellation
        lam = jnp.stack([slow, fast])
    else:
        k12, k13 = k_out[0], k_out[1]
        k21, k31 = k_back[0], k_back[1]
        a2 = k10 + k12 + k13 + k21 + k31
        a1 = k10 * k21 + k10 * k31 + k12 * k31 + k13 * k21 + k21 * k31
        a0 = k10 * k21 * k31
        # lambda^3 - a2 lambda^2 + a1 lambda - a0 = 0; shift by a2/3 to x^3 + p x + q
        p = a1 - a2 * a2 / 3.0
        q = -2.0 * a2**3 / 27.0 + a1 * a2 / 3.0 - a0
        r = jnp.sqrt(-p / 3.0)
        # roots are real and distinct (interlaced by k21, k31); the clip only absorbs
        # rounding when two of them nearly coincide
        theta = jnp.arccos(jnp.clip(-q / (2.0 * r**3), -1.0, 1.0)) / 3.0
        shifts = jnp.array([4.0, 2.0, 0.0]) * (jnp.pi / 3.0)
        lam = a2 / 3.0 + 2.0 * r * jnp.cos(theta - shifts)
        poly = ((lam - a2) * lam + a1) * lam - a0
        dpoly = (3.0 * lam - 2.0 * a2) * lam + a1
        lam = lam - poly / dpoly
    return lam, _coefficients(lam, k_back, v1)


def macro_constants_eigh(
    params: Float[ArrayLike, " n_par"], n_cmt: int
) -> tuple[Float[Array, " n_cmt"], Float[Array, " n_cmt"]]:
    """:func:`macro_constants` from a symmetric eigendecomposition (cross-check).

    In concentrations the model is ``V dC/dt = -M C`` with ``V = diag(V1, V2, ...)``
    and ``M`` the symmetric clearance matrix (``M_11 = CL + sum Q``,
    ``M_jj = -M_1j = Q_j``). ``S = V^-1/2 M V^-1/2 = U diag(lambda) U^T`` then gives
    the rate constants and ``A_i = U_1i**2 / V1``.

    Parameters and returns are as for :func:`macro_constants`. Gradients are undefined
    where eigenvalues coincide; use :func:`macro_constants` in models.
    """
    params = check_params(params, n_cmt)
    cl, v1 = params[0], params[1]
    q = params[2::2]
    vols = params[1::2]
    diag = jnp.concatenate([(cl + jnp.sum(q))[None], q])
    edge = jnp.concatenate([jnp.zeros(1), -q])
    e0 = jnp.zeros(n_cmt).at[0].set(1.0)
    m = jnp.diag(diag) + jnp.outer(e0, edge) + jnp.outer(edge, e0)
    scale = 1.0 / jnp.sqrt(vols)
    lam, u = jnp.linalg.eigh(m * jnp.outer(scale, scale))
    return lam, u[0] ** 2 / v1


def macro_response(t_rel: Array, amt: Array, dur: Array, lam: Array, a: Array) -> Array:
    """Dose response given the macro-constants; see :func:`dose_response`."""
    t = t_rel[..., None]
    shape = (1,) * t_rel.ndim + (-1,)
    lam = lam.reshape(shape)
    a = a.reshape(shape)
    return amt * jnp.sum(a * unit_modes(t, dur, lam), axis=-1)


def unit_modes(t: Array, dur: Array, lam: Array) -> Array:
    """Per-mode response ``g_i`` of a unit dose (``t`` and ``lam`` broadcast): the
    dose response is ``amt * sum_i A_i g_i``; see :func:`dose_response`."""
    after = t >= dur
    during = (t > 0.0) & ~after
    # t/dur only where it is selected, so that dur == 0 gives no 0/0 in gradients;
    # after the infusion the fraction is exactly 1 and d/d(dur) goes through exprel.
    frac = jnp.where(
        after, 1.0, jnp.where(during, t / jnp.where(during, dur, 1.0), 0.0)
    )
    tau = jnp.clip(t, 0.0, dur)
    since_end = jnp.maximum(t - dur, 0.0)
    return frac * exprel1(lam * tau) * jnp.exp(-lam * since_end)


def macro_response_slope(
    t_rel: Array, amt: Array, dur: Array, lam: Array, a: Array
) -> Array:
    """d/dt of :func:`macro_response` (right derivative at the end of an infusion)."""
    t = t_rel[..., None]
    shape = (1,) * t_rel.ndim + (-1,)
    lam = lam.reshape(shape)
    a = a.reshape(shape)
    after = t >= dur
    during = (t > 0.0) & ~after
    rise = jnp.exp(-lam * jnp.maximum(t, 0.0)) / jnp.where(during, dur, 1.0)
    fall = -lam * exprel1(lam * dur) * jnp.exp(-lam * jnp.maximum(t - dur, 0.0))
    g = jnp.where(after, fall, jnp.where(during, rise, 0.0))
    return amt * jnp.sum(a * g, axis=-1)


def dose_response(
    t_rel: Float[ArrayLike, "*shape"],
    amt: Float[ArrayLike, ""],
    dur: Float[ArrayLike, ""],
    params: Float[ArrayLike, " n_par"],
    n_cmt: int,
) -> Float[Array, "*shape"]:
    """Central concentration after one IV dose (bolus or zero-order infusion).

    Parameters
    ----------
    t_rel : array, any shape
        Time since the start of the dose, h. The response is 0 for ``t_rel < 0``; a
        bolus counts from ``t_rel == 0`` on.
    amt : scalar
        Dose, IU. 0 is valid (padding) and gives 0 with finite gradients.
    dur : scalar
        Infusion duration, h; 0 is an IV bolus, the ``dur -> 0`` limit, so that the
        value and its derivatives (also with respect to ``dur``) are continuous there.
    params : (2 * n_cmt,) array
        ``PARAM_NAMES[n_cmt]`` in dL/h and dL.
    n_cmt : {1, 2, 3}
        Number of compartments (static).

    Returns
    -------
    array, shape of ``t_rel``
        Concentration above baseline, IU/dL.

    Notes
    -----
    ``C = amt * sum_i A_i f exprel(lambda_i tau) exp(-lambda_i max(t - dur, 0))``
    with ``tau = clip(t, 0, dur)``, ``f = tau/dur`` (exactly 1 after the infusion)
    and ``exprel(x) = (1 - exp(-x))/x`` through ``expm1`` (its series near 0): the
    infusion formula of the module docstring, rearranged to be exact as
    ``dur -> 0`` (Abuhelwa et al. 2015).
    """
    lam, a = macro_constants(params, n_cmt)
    return macro_response(as_float(t_rel), as_float(amt), as_float(dur), lam, a)


def per_dose_macro(params: Array, n_cmt: int, n_dose: int) -> tuple[Array, Array]:
    """Macro-constants of shape (n_dose, n_cmt) from shared or per-dose parameters."""
    params = check_params(params, n_cmt)
    if params.ndim == 1:
        lam, a = macro_constants(params, n_cmt)
        return (
            jnp.broadcast_to(lam, (n_dose, n_cmt)),
            jnp.broadcast_to(a, (n_dose, n_cmt)),
        )
    if params.ndim == 2 and params.shape[0] == n_dose:
        return jax.vmap(lambda p: macro_constants(p, n_cmt))(params)
    raise ValueError(
        f"params must have shape ({2 * n_cmt},) or ({n_dose}, {2 * n_cmt}) for "
        f"{n_dose} doses; got {params.shape}"
    )


def _dose_curves(
    t: Array,
    dose_time: Array,
    dose_amt: Array,
    dose_dur: Array,
    params: Array,
    n_cmt: int,
) -> Array:
    """Per-dose concentration curves, shape (n_dose, n_t)."""
    lam, a = per_dose_macro(params, n_cmt, dose_time.shape[0])
    t_rel = t[None, :] - dose_time[:, None]
    return jax.vmap(macro_response)(t_rel, dose_amt, dose_dur, lam, a)


def concentration(
    t: Float[ArrayLike, " n_t"],
    dose_time: Float[ArrayLike, " n_dose"],
    dose_amt: Float[ArrayLike, " n_dose"],
    dose_dur: Float[ArrayLike, " n_dose"],
    params: Float[ArrayLike, " n_par"] | Float[ArrayLike, "n_dose n_par"],
    n_cmt: int,
    baseline: Float[ArrayLike, ""] = 0.0,
) -> Float[Array, " n_t"]:
    """Central concentration over a dose history, by superposition.

    Parameters
    ----------
    t : (n_t,) array
        Observation times, h (same clock as ``dose_time``).
    dose_time, dose_amt, dose_dur : (n_dose,) arrays
        Dose start (h), amount (IU) and infusion duration (h, 0 for a bolus). Padded
        doses have ``dose_amt == 0`` and contribute nothing.
    params : (2 * n_cmt,) or (n_dose, 2 * n_cmt) array
        ``PARAM_NAMES[n_cmt]``, either shared by all doses or one row per dose. Per-dose
        rows implement inter-occasion variability: each dose is disposed of with the
        parameters of its occasion, for its whole residual curve.
    n_cmt : {1, 2, 3}
        Number of compartments (static).
    baseline : scalar, optional
        Endogenous level added to the dose contributions, IU/dL.

    Returns
    -------
    (n_t,) array
        Level, IU/dL.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> c = concentration(jnp.array([0.0, 24.0]), jnp.array([0.0, 24.0]),
    ...                   jnp.array([1000.0, 1000.0]), jnp.zeros(2),
    ...                   jnp.array([2.0, 40.0]), 1)
    >>> [round(float(x), 2) for x in c]
    [25.0, 32.53]
    """
    t = as_float(t)
    curves = _dose_curves(
        t,
        as_float(dose_time),
        as_float(dose_amt),
        as_float(dose_dur),
        as_float(params),
        n_cmt,
    )
    return as_float(baseline) + jnp.sum(curves, axis=0)


def steady_state(
    t_rel: Float[ArrayLike, "*shape"],
    tau: Float[ArrayLike, ""],
    amt: Float[ArrayLike, ""],
    dur: Float[ArrayLike, ""],
    params: Float[ArrayLike, " n_par"],
    n_cmt: int,
) -> Float[Array, "*shape"]:
    """Level above baseline at steady state of a regular regimen, in closed form.

    The regimen is ``amt`` IU infused over ``dur`` h every ``tau`` h (``dur <= tau``),
    repeated for ever; ``t_rel`` in ``[0, tau]`` is the time since the start of the
    current dose. Every earlier dose ``k >= 1`` has finished its infusion, so its
    exponential terms ``amt A_i exprel(lambda_i dur) exp(-lambda_i (t + k tau - dur))``
    form a geometric series with sum ``... / expm1(lambda_i tau)``.

    Parameters
    ----------
    t_rel : array, any shape
        Time since the start of the current dose, h, in ``[0, tau]``: ``0`` is the
        pre-dose trough and ``tau`` the trough before the next dose.
    tau : scalar
        Dosing interval, h.
    amt, dur, params, n_cmt
        As for :func:`dose_response`.

    Returns
    -------
    array, shape of ``t_rel``
        Concentration above baseline, IU/dL.

    References
    ----------
    Gibaldi M, Perrier D. Pharmacokinetics, 2nd ed. 1982, ch. 3 (multiple dosing,
    the accumulation factor ``1 / (1 - exp(-lambda tau))``).

    Examples
    --------
    >>> import math
    >>> import jax.numpy as jnp
    >>> p = jnp.array([2.0, 40.0])  # k = 0.05 /h
    >>> trough = steady_state(24.0, 24.0, 1000.0, 0.0, p, 1)
    >>> round(float(trough), 4), round(25.0 / (math.exp(1.2) - 1.0), 4)  # C0 = 25
    (10.7753, 10.7753)
    """
    lam, a = macro_constants(params, n_cmt)
    t, amt, dur = as_float(t_rel), as_float(amt), as_float(dur)
    current = macro_response(t, amt, dur, lam, a)
    earlier = amt * a * exprel1(lam * dur) / jnp.expm1(lam * as_float(tau))
    decay = jnp.exp(-lam * (t[..., None] - dur))
    return current + jnp.sum(earlier * decay, axis=-1)
