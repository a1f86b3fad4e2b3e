"""Federated FOCEI: each hospital returns its share of the objective and gradient,
the server runs the optimiser.

NONMEM's FOCEI objective is a sum over subjects (:mod:`phems_clinical.pk.focei`), so
``OFV(x) = sum_k OFV_k(x)`` with ``OFV_k`` the sum over site ``k``'s patients, and its
gradient is the sum of the sites' gradients. A site computes both at the population
parameters it receives, keeping its patients' conditional modes (the warm start of
the inner problem, the ETAs) at home; only ``ofv`` (a scalar) and ``grad`` (one entry
per free population parameter) leave, and the server needs only their sums, so
secure aggregation applies unchanged. The result is the pooled FOCEI estimate, not
an approximation of it.

The server's optimiser is BFGS with a trust region (optimistix's BFGS Hessian update,
damped Newton descent and classical trust-region search; about 100 rounds on the
Advate model where the Armijo line search of ``optx.BFGS`` needed 134), run
"ask and tell": every optimistix ``step`` evaluates the objective exactly once, at
``state.y_eval``; a round sends ``y_eval`` to the sites and feeds the summed answer
back through a linear surrogate whose value and gradient at ``y_eval`` are the
summed ones. The whole optimiser state is an explicit pytree (checkpointable).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx

from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.pk_sites import SiteCohort
from phems_clinical.pk.focei import _compiled as _compiled_focei
from phems_clinical.pk.model import PopParams, initial_params
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel


class TrustRegionBFGS(optx.AbstractBFGS):
    """BFGS Hessian approximation inside a classical trust region (Nocedal & Wright,
    Numerical Optimization, 2nd ed., Alg. 4.1 with a quasi-Newton model)."""

    rtol: float
    atol: float
    norm: object = eqx.field(static=True, default=optx.max_norm)
    use_inverse: bool = eqx.field(static=True, default=False)
    descent: object = eqx.field(default_factory=optx.DampedNewtonDescent)
    search: object = eqx.field(default_factory=optx.ClassicalTrustRegion)
    verbose: object = eqx.field(static=True, default=lambda **kwargs: None)


class FOCEIServer(NamedTuple):
    """Server state: the last accepted point ``y`` and the BFGS state."""

    y: jax.Array
    solver: object
    round: jax.Array


def site_objective(model: PopModel, n_occ: int, base: PopParams):
    """``(x, site, b0) -> (ofv_i, grad_i, b)``: each patient's FOCEI objective term,
    its gradient in ``x`` and the new conditional modes at one site (padding rows
    are zero, dropped with ``where`` so no non-finite value leaks)."""
    _, with_jac = _compiled_focei(model, n_occ)

    def objective(x, site: SiteCohort, b0):
        per, b, jac = with_jac(x, base, site.cohort, b0)
        per = jnp.where(site.mask, per, 0.0)
        jac = jnp.where(site.mask[:, None], jac, 0.0)
        return per, jac, b

    return objective


def _surrogate(y, args):
    """Linear in ``y`` with value ``f`` and gradient ``g`` at ``y0``."""
    f, g, y0 = args
    return f + jnp.dot(g, y - y0), None


def fed_focei(model: PopModel, n_occ: int = 1, *, init: PopParams | None = None,
              rtol: float = 1e-9, atol: float = 1e-9, min_radius: float = 1e-10,
              max_rounds: int = 2000) -> Algorithm:
    """Federated FOCEI of ``model`` (all sites must agree on ``n_occ``).

    One round is one evaluation of the pooled objective. ``rtol``/``atol`` are
    optimistix's Cauchy termination tolerances on the free-parameter vector and on
    the OFV; the defaults are tight so that the estimate equals the pooled
    :func:`phems_clinical.pk.focei.fit_focei` optimum to about 1e-6 relative.
    The run also stops when the trust region has collapsed below ``min_radius``
    (Nocedal & Wright, Alg. 4.1): every step is then rejected because the summed
    OFV is flat to the inner problems' precision (about 1e-10), which otherwise
    leaves the Cauchy test unmet at the optimum.
    ``result`` gives the parameters on NONMEM's scale and the OFV.
    """
    base = initial_params(model) if init is None else init
    packer = build_packer(model, base)
    solver = TrustRegionBFGS(rtol=rtol, atol=atol)
    objective = site_objective(model, n_occ, base)
    y0 = jnp.asarray(packer.pack(base), dtype=jnp.float64)
    n_free = int(y0.shape[0])
    dummy = (jnp.zeros(()), jnp.zeros(n_free), y0)

    def init_server(key):
        del key
        f_struct = jax.ShapeDtypeStruct((), jnp.float64)
        state = solver.init(_surrogate, y0, dummy, {}, f_struct, None, frozenset())
        return FOCEIServer(y0, state, jnp.zeros((), jnp.int32))

    def init_site(site: SiteCohort):
        n_b = model.n_eta + n_occ * model.n_kappa
        return jnp.zeros((site.cohort.n_subjects, n_b))

    def broadcast(server: FOCEIServer):
        return {"x": server.solver.y_eval}

    def local_update(message, site: SiteCohort, b0, key):
        del key
        per, jac, b = objective(message["x"], site, b0)
        ofv, grad = jnp.sum(per), jnp.sum(jac, axis=0)
        ok = jnp.isfinite(ofv) & jnp.all(jnp.isfinite(grad))
        # A failed inner problem reports +inf, which the line search rejects; the
        # warm start is kept (as the pooled fit does).
        payload = {"ofv": jnp.where(ok, ofv, jnp.inf),
                   "grad": jnp.where(ok, grad, 0.0)}
        return payload, jnp.where(ok, b, b0), {"ofv": ofv}

    def aggregate(server: FOCEIServer, total, key):
        del key
        f = jnp.where(jnp.isfinite(total["ofv"]), total["ofv"], jnp.inf)
        g = jnp.where(jnp.isfinite(f), total["grad"], 0.0)
        args = (f, g, server.solver.y_eval)
        y, state, _ = solver.step(_surrogate, server.y, args, {}, server.solver,
                                  frozenset())
        return FOCEIServer(y, state, server.round + 1)

    def done(server: FOCEIServer):
        terminate, _ = solver.terminate(_surrogate, server.y, dummy, {},
                                        server.solver, frozenset())
        return terminate | _collapsed(server)

    def _collapsed(server: FOCEIServer):
        return server.solver.search_state.step_size < min_radius

    def result(server: FOCEIServer):
        params = packer.unpack(server.y)
        return {"params": params,
                "estimates": jnp.asarray(packer.to_natural(params)),
                "names": packer.natural_names,
                "ofv": server.solver.f_info.f,
                "rounds": int(server.round),
                "stopped_by": ("trust region below min_radius"
                               if bool(_collapsed(server)) else "Cauchy test")}

    return Algorithm("fed_focei", init_server, init_site, broadcast, local_update,
                     aggregate, done, result, {"ofv": (), "grad": (n_free,)},
                     max_rounds=max_rounds)


__all__ = ["FOCEIServer", "TrustRegionBFGS", "fed_focei", "site_objective"]
