"""Federated FOCEI: each hospital returns its share of the objective, its gradient
and (by default) its Hessian; the server runs the optimiser.

NONMEM's FOCEI objective is a sum over subjects (:mod:`phems_clinical.pk.focei`), so
``OFV(x) = sum_k OFV_k(x)`` with ``OFV_k`` the sum over site ``k``'s patients, and its
gradient and Hessian are the sums of the sites' ones. A site computes them at the
population parameters it receives, keeping its patients' conditional modes (the
warm start of the inner problem, the ETAs) at home; only ``ofv`` (a scalar),
``grad`` (one entry per free population parameter, d) and ``hess`` (d x d) leave,
and the server needs only their sums, so secure aggregation applies unchanged. The
result is the pooled FOCEI estimate, not an approximation of it.

Server optimisers (``hessian=``):

* ``"exact"`` (default): trust-region Newton on the summed site Hessians (Nocedal &
  Wright, Numerical Optimization, 2nd ed., Alg. 4.1; subproblem solved exactly in
  the Hessian's eigenbasis, section 4.3). A site's Hessian is the central
  difference of its exact FOCEI gradient (the gradient differentiates the inner
  modes implicitly; its second derivative through ``jax.hessian`` would not, since
  the modes are found under ``stop_gradient``), the 2d perturbed gradients vmapped
  and warm-started from the modes at the broadcast point, then symmetrised. On
  the Advate model (d = 10, hospitals of 8 patients): 9 and 7 rounds for 3 and
  5 hospitals against 94 and 81 for BFGS, measured in the same run
  (``experiments/benchmarks/federation_cpu_newton.md``). Each round costs a site
  about 2d + 1 gradients, so the warm in-process run is not faster (8.4 s
  against 5.4 s for K = 3) and compiling it takes longer (about 5 min on 2
  loaded cores): the gain is in rounds, i.e. in a deployment's messages.
* ``"bhhh"``: the same trust-region Newton with the outer-product curvature
  ``1/2 sum_i g_i g_i'`` over the site's patients (``g_i`` the gradient of patient
  ``i``'s OFV term, -2 log-likelihood; Berndt, Hall, Hall & Hausman, 1974), free
  given the per-patient gradients. It estimates the Hessian only at the optimum
  (information equality) and carries no negative curvature, so as a per-round
  model it gains little and is unreliable: 73 and 59 rounds on the same
  cohorts, but 1170 on the 3-hospital cohort of the tests (simulation seed 7)
  before the trust region collapsed. Using it only to start BFGS was not
  measured.
* ``"bfgs"``: the BFGS Hessian update inside a classical trust region (optimistix's
  BFGS update, damped Newton descent and classical trust-region search); only
  ``ofv`` and ``grad`` leave. 81-122 rounds for 3 to 100 hospitals (the identity
  start is far from a Hessian whose eigenvalues span about 1 to 1.2e5).

Both optimisers run "ask and tell": a round evaluates the objective exactly once,
at the point the server broadcasts, and the whole optimiser state is an explicit
pytree (checkpointable). The Newton server is a small pure-JAX implementation
rather than optimistix: optimistix's quasi-Newton ``update_hessian`` cannot take a
Hessian that arrives with the round's sums, and its trust-region descents
(``DampedNewtonDescent``'s damping 1/radius, ``IndirectDampedNewtonDescent``'s
radius relative to the Newton step with damping >= 1e-5) assume a positive
definite Hessian, while the FOCEI Hessian away from the optimum can be indefinite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx

from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.pk_sites import SiteCohort
from phems_clinical.pk.focei import compiled_fit_functions, r_standard_errors
from phems_clinical.pk.model import PopParams, initial_params
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel

HESSIANS = ("exact", "bhhh", "bfgs")
"""The server optimisers of :func:`fed_focei` (see the module docstring)."""


class TrustRegionBFGS(optx.AbstractBFGS):
    """BFGS Hessian approximation inside a classical trust region (Nocedal & Wright,
    Numerical Optimization, 2nd ed., Alg. 4.1 with a quasi-Newton model)."""

    rtol: float
    atol: float
    norm: Callable[[Any], jax.Array] = eqx.field(static=True, default=optx.max_norm)
    use_inverse: bool = eqx.field(static=True, default=False)
    descent: optx.DampedNewtonDescent = eqx.field(
        default_factory=optx.DampedNewtonDescent
    )
    search: optx.ClassicalTrustRegion = eqx.field(
        default_factory=optx.ClassicalTrustRegion
    )
    verbose: Callable[..., None] = eqx.field(static=True, default=lambda **kwargs: None)


class FOCEIServer(NamedTuple):
    """BFGS server state: the last accepted point ``y`` and the BFGS state."""

    y: jax.Array
    solver: Any  # optimistix's quasi-Newton state (a private class there)
    round: jax.Array


class NewtonServer(NamedTuple):
    """Trust-region Newton server state (all arrays; checkpointable).

    ``y``, ``f``, ``g``, ``h``: the last accepted point, its summed OFV (+inf before
    the first accepted round), gradient and curvature; ``y_eval``: the point the
    sites evaluate next; ``radius``: trust-region radius (2-norm, on the free
    parameter scale); ``stop``: 0 running, 1 Newton step below tolerance, 2 trust
    region below ``min_radius``, 3 the objective is not finite at the start values.
    """

    y: jax.Array
    f: jax.Array
    g: jax.Array
    h: jax.Array
    y_eval: jax.Array
    radius: jax.Array
    round: jax.Array
    stop: jax.Array


STOPPED_BY = {
    0: "max_rounds",
    1: "Newton step below tolerance",
    2: "trust region below min_radius",
    3: "objective not finite at the start values",
}


def site_objective(model: PopModel, n_occ: int, base: PopParams):
    """``(x, site, b0) -> (ofv_i, grad_i, b)``: each patient's FOCEI objective term,
    its gradient in ``x`` and the new conditional modes at one site (padding rows
    are zero, dropped with ``where`` so no non-finite value leaks)."""
    _, with_jac = compiled_fit_functions(model, n_occ)

    def objective(x, site: SiteCohort, b0):
        per, b, jac = with_jac(x, base, site.cohort, b0)
        per = jnp.where(site.mask, per, 0.0)
        jac = jnp.where(site.mask[:, None], jac, 0.0)
        return per, jac, b

    return objective


def fd_steps(x: jax.Array, rel_step: float) -> jax.Array:
    """Central-difference steps ``rel_step * max(1, |x_j|)`` (free-parameter units)."""
    return rel_step * jnp.maximum(1.0, jnp.abs(x))


def site_newton_terms(
    model: PopModel, n_occ: int, base: PopParams, *, rel_step: float = 1e-4
):
    """``(x, site, b0) -> (per, jac, b, H)``: :func:`site_objective` at ``x`` and the
    Hessian (d x d) of the site's summed FOCEI objective in the free population
    parameters, by central differences of its exact gradient at ``x +- h_j e_j``,
    symmetrised.

    The 2d + 1 evaluations (``x`` first) run as one ``lax.map`` over a single
    compiled objective, all warm-started from ``b0``: one FOCEI program to compile
    instead of two (the centre and a vmapped batch): a cold in-process fit of 3
    hospitals x 8 Advate patients took 51 s instead of 95 s on 2 cores, in the same
    9 rounds, at about the same time per round. The truncation error is O(h^2), and the
    warm starts at ``+h`` and ``-h`` are the same, so their error cancels in the
    difference (Nocedal & Wright, Numerical Optimization, 2nd ed., section 8.1).
    Padding rows contribute exactly zero.
    """
    objective = site_objective(model, n_occ, base)

    def terms(x, site: SiteCohort, b0):
        d = x.shape[0]
        h = fd_steps(x, rel_step)
        e = jnp.eye(d, dtype=x.dtype) * h[:, None]
        pts = jnp.concatenate([x[None], x[None] + e, x[None] - e])
        per, jac, b = jax.lax.map(lambda xx: objective(xx, site, b0), pts)
        grads = jnp.sum(jac[1:], axis=1)
        hess = (grads[:d] - grads[d:]) / (2.0 * h[:, None])
        return per[0], jac[0], b[0], 0.5 * (hess + hess.T)

    return terms


def site_hessian(
    model: PopModel, n_occ: int, base: PopParams, *, rel_step: float = 1e-4
):
    """``(x, site, b0) -> H``: the Hessian part of :func:`site_newton_terms`."""
    terms = site_newton_terms(model, n_occ, base, rel_step=rel_step)

    def hessian(x, site: SiteCohort, b0):
        return terms(x, site, b0)[3]

    return hessian


def trust_region_step(
    g: jax.Array, h: jax.Array, radius: jax.Array, iters: int = 200
) -> jax.Array:
    """The exact minimiser of ``g'p + p'Hp/2`` over ``||p||_2 <= radius``.

    In the eigenbasis of ``H`` (Nocedal & Wright, section 4.3): the Newton step when
    ``H`` is positive definite and the step lies inside; otherwise
    ``p = -(H + mu I)^-1 g`` with ``mu > max(0, -lambda_min)`` on the boundary,
    found by bisection on ``mu`` (monotone ``||p(mu)||``), and in the hard case
    (``g`` orthogonal to the lowest eigenvector) that step plus the lowest
    eigenvector to reach the boundary.
    """
    lam, q = jnp.linalg.eigh(0.5 * (h + h.T))
    gt = q.T @ g
    lmin = lam[0]
    scale = jnp.maximum(jnp.max(jnp.abs(lam)), 1e-300)

    def step(mu):
        return -q @ (gt / (lam + mu))

    def norm(mu):
        return jnp.linalg.norm(gt / (lam + mu))

    newton_ok = lmin > 1e-12 * scale
    p_newton = step(jnp.where(newton_ok, 0.0, 1.0 + jnp.abs(lmin)))
    inside = newton_ok & (jnp.linalg.norm(p_newton) <= radius)

    lo = jnp.maximum(0.0, -lmin) + 1e-12 * scale
    hi = lo + jnp.linalg.norm(g) / radius + scale

    def bisect(_, bounds):
        a, b = bounds
        m = 0.5 * (a + b)
        long = norm(m) > radius
        return jnp.where(long, m, a), jnp.where(long, b, m)

    hard = norm(lo) <= radius
    a, b = jax.lax.fori_loop(0, iters, bisect, (lo, hi))
    p_boundary = step(b)
    # hard case: the step at mu = -lambda_min without the (vanishing) components
    # along the lowest eigenvectors, completed to the boundary along one of them
    shift = jnp.maximum(0.0, -lmin)
    keep = lam + shift > 1e-10 * scale
    p_lo = -q @ jnp.where(keep, gt / jnp.where(keep, lam + shift, 1.0), 0.0)
    tau = jnp.sqrt(jnp.maximum(radius**2 - jnp.dot(p_lo, p_lo), 0.0))
    v = q[:, 0]
    v = jnp.where(jnp.dot(g, v) > 0, -v, v)
    p_hard = p_lo + tau * v
    return jnp.where(inside, p_newton, jnp.where(hard, p_hard, p_boundary))


def _surrogate(y, args):
    """Linear in ``y`` with value ``f`` and gradient ``g`` at ``y0``."""
    f, g, y0 = args
    return f + jnp.dot(g, y - y0), None


def fed_focei(
    model: PopModel,
    n_occ: int = 1,
    *,
    init: PopParams | None = None,
    hessian: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    min_radius: float = 1e-10,
    radius: float = 1.0,
    max_radius: float = 100.0,
    fd_step: float = 1e-4,
    max_rounds: int = 2000,
) -> Algorithm:
    """Federated FOCEI of ``model`` (all sites must agree on ``n_occ``).

    One round is one evaluation of the pooled objective. ``hessian`` picks the
    server optimiser (``"exact"``, ``"bhhh"`` or ``"bfgs"``; the module docstring
    compares them). The run stops when the trust region has collapsed below
    ``min_radius`` (Nocedal & Wright, Alg. 4.1): every step is then rejected
    because the summed OFV is flat to the inner problems' precision (about 1e-10).

    Newton (``"exact"``, ``"bhhh"``): stops at an accepted point whose Hessian is
    positive definite and whose Newton step satisfies ``|p_j| <= atol + rtol |y_j|``
    (defaults 1e-8, free-parameter units); ``radius`` / ``max_radius`` are the
    initial and largest trust-region radius (2-norm in the free parameters: log
    thetas, log Cholesky diagonals, log SDs); ``fd_step`` is the relative step of
    the site Hessian's central differences (:func:`site_hessian`).

    BFGS (``"bfgs"``): ``rtol``/``atol`` are optimistix's Cauchy termination
    tolerances on the free-parameter vector and on the OFV (defaults 1e-9, tight so
    that the estimate equals the pooled fit to about 1e-6 relative).

    ``result`` gives the parameters on NONMEM's scale and the OFV; with
    ``hessian="exact"`` also ``se``, R-based standard errors (NONMEM's
    ``$COVARIANCE MATRIX=R``) from the summed site Hessians, NaN unless the Newton
    test stopped the run.
    """
    if hessian not in HESSIANS:
        raise ValueError(
            f"hessian: expected one of {', '.join(HESSIANS)}, got {hessian!r}"
        )
    for name, value in (
        ("min_radius", min_radius),
        ("radius", radius),
        ("max_radius", max_radius),
        ("fd_step", fd_step),
    ):
        if not (isinstance(value, int | float) and 0 < value < float("inf")):
            raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    if radius > max_radius:
        raise ValueError(
            f"radius: expected at most max_radius ({max_radius}), got {radius}"
        )
    default_tol = 1e-9 if hessian == "bfgs" else 1e-8
    rtol = default_tol if rtol is None else rtol
    atol = default_tol if atol is None else atol
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and 0 <= value < float("inf")):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    base = initial_params(model) if init is None else init
    packer = build_packer(model, base)
    y0 = jnp.asarray(packer.pack(base), dtype=jnp.float64)
    n_free = int(y0.shape[0])
    if hessian == "bfgs":
        return _bfgs(
            model,
            n_occ,
            base,
            packer,
            y0,
            n_free,
            rtol=rtol,
            atol=atol,
            min_radius=min_radius,
            max_rounds=max_rounds,
        )
    return _newton(
        model,
        n_occ,
        base,
        packer,
        y0,
        n_free,
        hessian,
        rtol=rtol,
        atol=atol,
        min_radius=min_radius,
        radius=radius,
        max_radius=max_radius,
        fd_step=fd_step,
        max_rounds=max_rounds,
    )


def _init_site(model: PopModel, n_occ: int):
    def init_site(site: SiteCohort):
        n_b = model.n_eta + n_occ * model.n_kappa
        return jnp.zeros((site.cohort.n_subjects, n_b))

    return init_site


def _newton(
    model,
    n_occ,
    base,
    packer,
    y0,
    n_free,
    hessian,
    *,
    rtol,
    atol,
    min_radius,
    radius,
    max_radius,
    fd_step,
    max_rounds,
) -> Algorithm:
    """Trust-region Newton on the summed site curvatures (Nocedal & Wright,
    Alg. 4.1: eta = 1e-4, shrink to ||p|| / 4 below rho = 1/4, double on the
    boundary above rho = 3/4)."""
    objective = site_objective(model, n_occ, base)
    newton_terms = site_newton_terms(model, n_occ, base, rel_step=fd_step)
    d = n_free

    def init_server(key):
        del key
        return NewtonServer(
            y0,
            jnp.asarray(jnp.inf),
            jnp.zeros(d),
            jnp.zeros((d, d)),
            y0,
            jnp.asarray(radius, jnp.float64),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def broadcast(server: NewtonServer):
        return {"x": server.y_eval}

    def local_update(message, site: SiteCohort, b0, key):
        del key
        x = message["x"]
        if hessian == "exact":
            per, jac, b, hess = newton_terms(x, site, b0)
        else:  # BHHH: -2 log L_i per patient, so the information is g g' / 2
            per, jac, b = objective(x, site, b0)
            hess = 0.5 * jac.T @ jac
        ofv, grad = jnp.sum(per), jnp.sum(jac, axis=0)
        ok = (
            jnp.isfinite(ofv)
            & jnp.all(jnp.isfinite(grad))
            & jnp.all(jnp.isfinite(hess))
        )
        # A failed inner problem reports +inf, which the trust region rejects; the
        # warm start is kept (as the pooled fit does).
        payload = {
            "ofv": jnp.where(ok, ofv, jnp.inf),
            "grad": jnp.where(ok, grad, 0.0),
            "hess": jnp.where(ok, hess, 0.0),
        }
        return payload, jnp.where(ok, b, b0), {"ofv": ofv}

    def newton_small(y, g, h):
        lam = jnp.linalg.eigvalsh(h)
        p = jnp.linalg.solve(h, g)
        return (lam[0] > 0) & jnp.all(jnp.abs(p) <= atol + rtol * jnp.abs(y))

    def aggregate(server: NewtonServer, total, key):
        del key
        f_e = jnp.where(jnp.isfinite(total["ofv"]), total["ofv"], jnp.inf)
        ok = jnp.isfinite(f_e)
        g_e = jnp.where(ok, total["grad"], 0.0)
        h_e = jnp.where(ok, 0.5 * (total["hess"] + total["hess"].T), 0.0)
        first = ~jnp.isfinite(server.f)
        p = server.y_eval - server.y
        pred = -(jnp.dot(server.g, p) + 0.5 * p @ server.h @ p)
        rho = (server.f - f_e) / pred
        accept = ok & (first | ((pred > 0) & (rho > 1e-4)))
        pnorm = jnp.linalg.norm(p)
        new_radius = jnp.where(
            first,
            server.radius,
            jnp.where(
                ~accept | (rho < 0.25),
                0.25 * pnorm,
                jnp.where(
                    (rho > 0.75) & (pnorm >= 0.99 * server.radius),
                    jnp.minimum(2.0 * server.radius, max_radius),
                    server.radius,
                ),
            ),
        )
        y = jnp.where(accept, server.y_eval, server.y)
        f = jnp.where(accept, f_e, server.f)
        g = jnp.where(accept, g_e, server.g)
        h = jnp.where(accept, h_e, server.h)
        stop = jnp.where(
            first & ~ok,
            3,
            jnp.where(
                accept & newton_small(y, g, h),
                1,
                jnp.where(new_radius < min_radius, 2, 0),
            ),
        )
        step = trust_region_step(g, h, new_radius)
        y_eval = jnp.where(stop == 0, y + step, y)
        return NewtonServer(
            y, f, g, h, y_eval, new_radius, server.round + 1, stop.astype(jnp.int32)
        )

    def done(server: NewtonServer):
        return server.stop != 0

    def result(server: NewtonServer):
        params = packer.unpack(server.y)
        out = {
            "params": params,
            "estimates": jnp.asarray(packer.to_natural(params)),
            "names": packer.natural_names,
            "ofv": server.f,
            "rounds": int(server.round),
            "stopped_by": STOPPED_BY[int(server.stop)],
        }
        if hessian == "exact":
            # the summed site Hessians at the accepted point are NONMEM's R
            # matrix of the pooled OFV: R-based standard errors come with it
            # (no sandwich: that needs per-patient gradients, which stay home)
            se, _ = r_standard_errors(
                server.y, server.h, lambda y: packer.to_natural(packer.unpack(y))
            )
            out["se"] = jnp.asarray(
                se if int(server.stop) == 1 else jnp.full(se.shape, jnp.nan)
            )
        return out

    spec = {"ofv": (), "grad": (n_free,), "hess": (n_free, n_free)}
    return Algorithm(
        "fed_focei",
        init_server,
        _init_site(model, n_occ),
        broadcast,
        local_update,
        aggregate,
        done,
        result,
        spec,
        max_rounds=max_rounds,
    )


def _bfgs(
    model, n_occ, base, packer, y0, n_free, *, rtol, atol, min_radius, max_rounds
) -> Algorithm:
    """Trust-region BFGS (optimistix), ask and tell: every optimistix ``step``
    evaluates the objective exactly once, at ``state.y_eval``; a round sends
    ``y_eval`` to the sites and feeds the summed answer back through a linear
    surrogate whose value and gradient at ``y_eval`` are the summed ones."""
    solver = TrustRegionBFGS(rtol=rtol, atol=atol)
    objective = site_objective(model, n_occ, base)
    dummy = (jnp.zeros(()), jnp.zeros(n_free), y0)

    def init_server(key):
        del key
        f_struct = jax.ShapeDtypeStruct((), jnp.float64)
        state = solver.init(_surrogate, y0, dummy, {}, f_struct, None, frozenset())
        return FOCEIServer(y0, state, jnp.zeros((), jnp.int32))

    def broadcast(server: FOCEIServer):
        return {"x": server.solver.y_eval}

    def local_update(message, site: SiteCohort, b0, key):
        del key
        per, jac, b = objective(message["x"], site, b0)
        ofv, grad = jnp.sum(per), jnp.sum(jac, axis=0)
        ok = jnp.isfinite(ofv) & jnp.all(jnp.isfinite(grad))
        # A failed inner problem reports +inf, which the line search rejects; the
        # warm start is kept (as the pooled fit does).
        payload = {"ofv": jnp.where(ok, ofv, jnp.inf), "grad": jnp.where(ok, grad, 0.0)}
        return payload, jnp.where(ok, b, b0), {"ofv": ofv}

    def aggregate(server: FOCEIServer, total, key):
        del key
        f = jnp.where(jnp.isfinite(total["ofv"]), total["ofv"], jnp.inf)
        g = jnp.where(jnp.isfinite(f), total["grad"], 0.0)
        args = (f, g, server.solver.y_eval)
        y, state, _ = solver.step(
            _surrogate, server.y, args, {}, server.solver, frozenset()
        )
        return FOCEIServer(y, state, server.round + 1)

    def done(server: FOCEIServer):
        terminate, _ = solver.terminate(
            _surrogate, server.y, dummy, {}, server.solver, frozenset()
        )
        return terminate | _collapsed(server)

    def _collapsed(server: FOCEIServer):
        return server.solver.search_state.step_size < min_radius

    def result(server: FOCEIServer):
        params = packer.unpack(server.y)
        return {
            "params": params,
            "estimates": jnp.asarray(packer.to_natural(params)),
            "names": packer.natural_names,
            "ofv": server.solver.f_info.f,
            "rounds": int(server.round),
            "stopped_by": (
                "trust region below min_radius"
                if bool(_collapsed(server))
                else "Cauchy test"
            ),
        }

    return Algorithm(
        "fed_focei",
        init_server,
        _init_site(model, n_occ),
        broadcast,
        local_update,
        aggregate,
        done,
        result,
        {"ofv": (), "grad": (n_free,)},
        max_rounds=max_rounds,
    )


__all__ = [
    "HESSIANS",
    "STOPPED_BY",
    "FOCEIServer",
    "NewtonServer",
    "TrustRegionBFGS",
    "fd_steps",
    "fed_focei",
    "site_hessian",
    "site_newton_terms",
    "site_objective",
    "trust_region_step",
]
