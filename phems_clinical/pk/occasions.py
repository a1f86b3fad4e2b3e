"""Inter-occasion variability with NONMEM's semantics: parameters switch for all
drug in the body.

With IOV, each occasion has its own individual parameters ``TV exp(eta + kappa_o)``.
NONMEM computes the parameters record by record, so when the occasion changes the
new parameters govern the *whole* system from then on, including the drug left from
earlier doses. The rule implemented here:

    From the start of each dose until the start of the next dose (in time order),
    every compartment evolves with the parameters of that dose's occasion.

With the usual data layout (the records of an occasion are contiguous and the
occasion begins with its dose) this is: occasion ``k`` starts at the time of its
first dose, and its parameters govern all drug in the body until the next occasion
starts. Samples taken exactly at a dose time see the dose's occasion (and the dose,
as everywhere in :mod:`~phems_clinical.pk.analytic`); samples before the first dose
see no drug. (NONMEM would already switch at an occasion's first *record*, e.g. a
pre-dose sample coded with the new occasion; that only matters between such a sample
and the dose.)

Between dose starts the system is linear with constant parameters, so the solution
is exact in closed form: the compartment amounts ``x`` at a switch are carried over
and propagated in the eigenbasis of the new parameters, ``x(t) = sum_i z_i(t) r_i``
with ``z_i(t) = exp(-lambda_i (t - s)) z_i(s)``, plus the doses of the segment (and
the rest of any infusion still running at the switch) by superposition. For the
mammillary system with central elimination the right and left eigenvectors of the
rate matrix are, for rate constant ``lambda_i`` (Gibaldi & Perrier, app. C),

    r_i = (1, k12 / (k21 - lambda_i), k13 / (k31 - lambda_i)),
    l_i = (1, k21 / (k21 - lambda_i), k31 / (k31 - lambda_i)),

normalised by ``w_i = 1 / (l_i . r_i) = V1 A_i`` (the ``A_i`` of
:func:`~phems_clinical.pk.analytic.macro_constants`); ``lambda_i`` never equals a
``kj1`` because the roots interlace with them. Everything is differentiable (FOCEI,
MAP Newton and NUTS use it). Without IOV, or with one occasion, the plain
superposition of :func:`~phems_clinical.pk.analytic.concentration` is the same
function and is used instead.

Units: time h, amounts IU, volumes dL, clearances dL/h, levels IU/dL.

References
----------
Karlsson MO, Sheiner LB. The importance of modeling interoccasion variability in
population pharmacokinetic analyses. J Pharmacokinet Biopharm 1993;21:735-750.
Gibaldi M, Perrier D. Pharmacokinetics, 2nd ed. New York: Marcel Dekker; 1982,
app. C.

Examples
--------
The issue's example: 1 compartment, 1000 IU at 0 h and at 24 h, CL doubled at the
second occasion, level at 30 h.

>>> import jax.numpy as jnp
>>> p = jnp.array([[2.0, 40.0], [4.0, 40.0]])
>>> c = occasion_concentration(jnp.array([30.0]), jnp.array([0.0, 24.0]),
...                            jnp.array([1000.0, 1000.0]), jnp.zeros(2),
...                            jnp.array([0, 1]), p, 1)
>>> round(float(c[0]), 2)
17.85
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from phems_clinical._typing import Array, Float, Int
from phems_clinical.pk.analytic import (
    as_float,
    check_params,
    macro_constants,
    macro_response,
    unit_modes,
)

__all__ = ["eigenvectors", "occasion_concentration"]


def eigenvectors(
    params: Float[ArrayLike, " n_par"], lam: Float[ArrayLike, " n_cmt"], n_cmt: int
) -> tuple[Float[Array, "n_cmt n_cmt"], Float[Array, "n_cmt n_cmt"]]:
    """Right and left eigenvectors (rows ``r_i``, ``l_i``) of the amount system.

    ``dx/dt = K x`` with ``x`` the compartment amounts (IU, central first) has
    eigenvalues ``-lam`` (from :func:`~phems_clinical.pk.analytic.macro_constants`).
    Both are scaled to a first (central) component of 1, so that
    ``exp(K t) = sum_i exp(-lam_i t) w_i outer(r_i, l_i)`` with ``w_i = V1 A_i``.
    """
    params = check_params(params, n_cmt)
    lam = as_float(lam)
    v1 = params[1]
    k_out = params[2::2] / v1
    k_back = params[2::2] / params[3::2]
    denom = k_back[None, :] - lam[:, None]
    ones = jnp.ones((n_cmt, 1))
    right = jnp.concatenate([ones, k_out[None, :] / denom], axis=1)
    left = jnp.concatenate([ones, k_back[None, :] / denom], axis=1)
    return right, left


def occasion_concentration(
    t: Float[ArrayLike, " n_t"],
    dose_time: Float[ArrayLike, " n_dose"],
    dose_amt: Float[ArrayLike, " n_dose"],
    dose_dur: Float[ArrayLike, " n_dose"],
    dose_occ: Int[ArrayLike, " n_dose"],
    occ_params: Float[ArrayLike, "n_occ n_par"],
    n_cmt: int,
    baseline: Float[ArrayLike, ""] = 0.0,
) -> Float[Array, " n_t"]:
    """Central level over a dose history whose parameters change by occasion.

    Parameters
    ----------
    t : (n_t,) array
        Times, h (same clock as ``dose_time``).
    dose_time, dose_amt, dose_dur : (n_dose,) arrays
        Dose start (h), amount (IU), infusion duration (h, 0 for a bolus). Doses with
        ``dose_amt == 0`` are padding: they neither add drug nor switch occasion.
        Need not be sorted.
    dose_occ : (n_dose,) int array
        Occasion of each dose, an index into ``occ_params``.
    occ_params : (n_occ, 2 * n_cmt) array
        Individual parameters per occasion, ``PARAM_NAMES[n_cmt]`` order.
    n_cmt : {1, 2, 3}
        Number of compartments (static).
    baseline : scalar, optional
        Endogenous level added, IU/dL.

    Returns
    -------
    (n_t,) array
        Level, IU/dL, with the switching rule of the module docstring. An infusion
        running across a switch continues at its rate under the new parameters.
    """
    t = as_float(t)
    dose_time, dose_amt, dose_dur = (
        as_float(x) for x in (dose_time, dose_amt, dose_dur)
    )
    occ_params = check_params(occ_params, n_cmt)
    dose_occ = jnp.asarray(dose_occ)
    if occ_params.ndim != 2:
        raise ValueError(
            f"occ_params must be (n_occ, {2 * n_cmt}); got {occ_params.shape}"
        )
    lam_all, a_all = jax.vmap(lambda p: macro_constants(p, n_cmt))(occ_params)
    r_all, l_all = jax.vmap(lambda p, lam: eigenvectors(p, lam, n_cmt))(
        occ_params, lam_all
    )

    # segments start at each real dose, in time order (stable for ties); padding
    # sorts last with an infinite start and contributes empty segments
    start = jnp.where(dose_amt > 0.0, dose_time, jnp.inf)
    order = jnp.argsort(start, stable=True)
    seg_start = start[order]
    seg_next = jnp.concatenate([seg_start[1:], jnp.full((1,), jnp.inf)])
    seg_occ = dose_occ[order]

    end = dose_time + dose_dur
    infusion = dose_dur > 0.0
    dur_safe = jnp.where(infusion, dose_dur, 1.0)

    def segment(carry, xs):
        amounts, level = carry
        s, s_next, occ = xs
        live = jnp.isfinite(s)
        s = jnp.where(live, s, 0.0)
        lam, a, right, left = lam_all[occ], a_all[occ], r_all[occ], l_all[occ]
        v1 = occ_params[occ, 1]
        w = a * v1
        z0 = w * (left @ amounts)  # modal amounts at the segment start
        # what each dose still delivers from s on: a bolus given at or after s, the
        # rest of an infusion (its rate times the remaining duration)
        piece_start = jnp.maximum(dose_time, s)
        piece_dur = jnp.where(infusion, jnp.maximum(end - piece_start, 0.0), 0.0)
        piece_amt = jnp.where(
            infusion,
            dose_amt * piece_dur / dur_safe,
            jnp.where(dose_time >= s, dose_amt, 0.0),
        )

        inside = live & (t >= s) & (t < s_next)
        since = jnp.maximum(t - s, 0.0)
        carried = jnp.sum(z0 / v1 * jnp.exp(-lam[None, :] * since[:, None]), axis=-1)
        doses = jnp.sum(
            jax.vmap(macro_response, in_axes=(0, 0, 0, None, None))(
                t[None, :] - piece_start[:, None], piece_amt, piece_dur, lam, a
            ),
            axis=0,
        )
        level = level + jnp.where(inside, carried + doses, 0.0)

        # amounts at the next switch (doses starting there belong to the next segment)
        has_next = live & jnp.isfinite(s_next)
        s_end = jnp.where(has_next, s_next, s)
        before = jnp.where(dose_time < s_end, piece_amt, 0.0)
        g = unit_modes((s_end - piece_start)[:, None], piece_dur[:, None], lam[None, :])
        z = jnp.exp(-lam * (s_end - s)) * z0 + w * jnp.sum(before[:, None] * g, axis=0)
        amounts = jnp.where(has_next, right.T @ z, amounts)
        return (amounts, level), None

    init = (jnp.zeros(n_cmt, dtype=t.dtype), jnp.zeros_like(t))
    (_, level), _ = jax.lax.scan(segment, init, (seg_start, seg_next, seg_occ))
    return as_float(baseline) + level
