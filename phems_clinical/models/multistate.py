"""Multi-state model of the post-operative cardiac pathway with piecewise-constant
transition hazards (JAX; maximum likelihood by Newton, optional NumPyro).

States CICU, WARD, HOME, READMIT (transient) and DEAD (absorbing); transitions as in
:data:`phems_clinical.data.cardiac.simulate.TRANSITIONS`. Time ``t`` is days since
surgery (clock-forward Markov model). Transition ``k`` has the hazard

    lambda_k(t | x) = exp(alpha[k, j(t)] + beta[k] . x),

constant on the intervals ``[cuts[j], cuts[j+1])`` (the last one open-ended), with
covariates ``x`` = (neonate, infant, weight-for-age z, STAT 2..5 dummies, pre-operative
ventilation). The likelihood is Poisson with exposure (e.g. Aalen, Borgan & Gjessing,
*Survival and event history analysis*, 2008, sec. 5.1): for one episode,

    ll = sum_{k,j} D[k,j] (alpha[k,j] + beta[k].x) - E[from(k), j] exp(...),

``D`` = transitions k in interval j, ``E`` = days spent in the source state in
interval j. Without covariates the MLE is closed form, ``alpha = log(sum D / sum E)``
(occurrence/exposure rates), whose sufficient statistics are sums.

Predictions (per patient): state-occupation probabilities
``P(0, t) = prod_j expm(Q_j dt_j)`` (the Markov transition matrix, e.g. Andersen et
al., *Statistical models based on counting processes*, 1993), P(first CICU stay > 7
days), mortality and (first) readmission by a horizon.

Federation: one example = ONE EPISODE; :func:`make_loss` gives
``loss(x_flat, example)``, :func:`site_examples` pads a site's episodes to a common
``n`` with a mask. This module does not import ``phems_clinical.federation``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.flatten_util import ravel_pytree

from phems_clinical.data.cardiac.simulate import STATES, TRANSITIONS

COVARIATES = (
    "neonate",
    "infant",
    "weight_z",
    "stat2",
    "stat3",
    "stat4",
    "stat5",
    "ventilation",
)
DEFAULT_CUTS = (
    0.0,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.0,
    10.0,
    14.0,
    21.0,
    30.0,
    60.0,
    120.0,
    200.0,
)


class MultistateSpec(NamedTuple):
    """Static model structure: state names, (from, to) transitions, interval cuts
    (days since surgery; the last interval is open-ended) and covariate names
    (columns built by :func:`covariate_matrix`; ``()`` = covariate-free)."""

    states: tuple = STATES
    transitions: tuple = TRANSITIONS
    cuts: tuple = DEFAULT_CUTS
    covariates: tuple = COVARIATES

    @property
    def n_transient(self) -> int:
        return len({a for a, _ in self.transitions})

    @property
    def dims(self) -> tuple[int, int, int]:
        """(K transitions, J intervals, P covariates)."""
        return len(self.transitions), len(self.cuts), len(self.covariates)


DEFAULT_SPEC = MultistateSpec()


class Params(NamedTuple):
    """``alpha`` (K, J): baseline log-hazards per transition and interval (per
    day); ``beta`` (K, P): log hazard ratios per transition and covariate."""

    alpha: jax.Array
    beta: jax.Array


class EpisodeExamples(NamedTuple):
    """Per-episode data (``x`` (n, P), ``E`` (n, S, J), ``D`` (n, K, J)) and the
    mask of real rows (padding is False); same fields as the federation's
    ``Examples``."""

    data: dict
    mask: jax.Array


# ----------------------------------------------------------------------- data
def covariate_matrix(
    first: pd.DataFrame, spec: MultistateSpec = DEFAULT_SPEC
) -> np.ndarray:
    """(n, P) covariates from one row per episode of the sojourn table."""

    def col(name):
        if name == "neonate":
            return (first.age_group == "neonate").to_numpy(float)
        if name == "infant":
            return (first.age_group == "infant").to_numpy(float)
        if name.startswith("stat") and name[4:].isdigit():
            return (first.stat == int(name[4:])).to_numpy(float)
        if name in first.columns:
            return first[name].to_numpy(float)
        raise ValueError(f"covariates: unknown covariate {name!r}")

    if not spec.covariates:
        return np.zeros((len(first), 0))
    return np.stack([col(c) for c in spec.covariates], axis=1)


def design(
    sojourns: pd.DataFrame, spec: MultistateSpec = DEFAULT_SPEC
) -> tuple[dict, np.ndarray]:
    """Sufficient statistics per episode from the sojourn table of
    :func:`phems_clinical.data.cardiac.pathways.episodes`.

    Returns ``({"x": (n, P), "E": (n, S, J), "D": (n, K, J)}, episode_ids (n,))``,
    episodes in order of first appearance.
    """
    names = list(spec.states)
    cuts = np.asarray(spec.cuts, float)
    edges = np.append(cuts, np.inf)
    K, J, _ = spec.dims
    S = spec.n_transient
    ep, first_idx, inv = np.unique(
        sojourns.episode_id.to_numpy(), return_index=True, return_inverse=True
    )
    order = np.argsort(first_idx)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    row_ep = rank[inv]
    n = len(ep)
    s_from = sojourns.state.map({s: i for i, s in enumerate(names)}).to_numpy()
    entry = sojourns.entry.to_numpy(float)
    exit_ = sojourns.exit.to_numpy(float)
    if np.any(~np.isin(sojourns.state, names[:S])):
        raise ValueError(
            "sojourns.state: expected one of "
            f"{names[:S]}, got {sorted(set(sojourns.state) - set(names))}"
        )
    lo = np.maximum(entry[:, None], edges[None, :-1])
    hi = np.minimum(exit_[:, None], edges[None, 1:])
    expo = np.clip(hi - lo, 0.0, None)
    E = np.zeros((n, S, J))
    np.add.at(E, (row_ep, s_from), expo)
    tk = {t: k for k, t in enumerate(spec.transitions)}
    nxt = sojourns.next_state.to_numpy()
    D = np.zeros((n, K, J))
    has_event = nxt != "CENSORED"
    to_idx = np.array([names.index(s) if s in names else -1 for s in nxt])
    k_of = np.array([tk.get((a, b), -1) for a, b in zip(s_from, to_idx, strict=True)])
    if np.any(has_event & (k_of < 0)):
        bad = sorted(
            {
                (names[a], nxt[i])
                for i, a in enumerate(s_from)
                if has_event[i] and k_of[i] < 0
            }
        )
        raise ValueError(f"sojourns.next_state: transitions {bad} not in the model")
    j_of = np.clip(np.searchsorted(cuts, exit_, side="right") - 1, 0, J - 1)
    ev = np.flatnonzero(has_event)
    np.add.at(D, (row_ep[ev], k_of[ev], j_of[ev]), 1.0)
    first = sojourns.iloc[first_idx[order]]
    return {"x": covariate_matrix(first, spec), "E": E, "D": D}, ep[order]


def site_examples(
    sojourns: pd.DataFrame,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    n_pad: int | None = None,
) -> EpisodeExamples:
    """One site's episodes as examples padded to ``n_pad`` rows (default: no
    padding); padding rows have zero exposure and events and mask False."""
    data, _ = design(sojourns, spec)
    n = data["x"].shape[0]
    n_pad = n if n_pad is None else int(n_pad)
    if n_pad < n:
        raise ValueError(f"n_pad: expected >= {n} episodes, got {n_pad}")
    pad = {
        k: np.concatenate([v, np.zeros((n_pad - n, *v.shape[1:]))])
        for k, v in data.items()
    }
    return EpisodeExamples(
        {k: jnp.asarray(v) for k, v in pad.items()}, jnp.arange(n_pad) < n
    )


def stack_examples(examples: list[EpisodeExamples]) -> EpisodeExamples:
    """Pool several sites' examples (rows concatenated, padding dropped)."""
    data = {
        k: jnp.concatenate([e.data[k][np.asarray(e.mask)] for e in examples])
        for k in examples[0].data
    }
    return EpisodeExamples(data, jnp.ones(data["x"].shape[0], bool))


# --------------------------------------------------------------------- likelihood
def init_params(
    key, spec: MultistateSpec = DEFAULT_SPEC, examples: EpisodeExamples | None = None
) -> Params:
    """Starting values: ``alpha`` = the covariate-free occurrence/exposure rates of
    ``examples`` (slightly shrunk, finite) or log 0.05/day; ``beta`` = 0.
    ``key`` is unused (deterministic start) but kept for the federation contract."""
    del key
    K, J, P = spec.dims
    if examples is None:
        alpha = jnp.full((K, J), jnp.log(0.05))
    else:
        alpha = _shrunk_log_rates(*sufficient_totals(examples, spec))
    return Params(alpha, jnp.zeros((K, P)))


def _shrunk_log_rates(D, E):
    """log((D + 0.5 r_k) / (E + 0.5)): occupation/exposure rates shrunk towards the
    transition's overall rate r_k (half a day of pseudo-exposure); finite even
    without events or exposure."""
    r = (D.sum(1, keepdims=True) + 0.5) / (E.sum(1, keepdims=True) + 0.5)
    return jnp.log((D + 0.5 * r) / (E + 0.5))


def sufficient_totals(examples: EpisodeExamples, spec: MultistateSpec = DEFAULT_SPEC):
    """Pooled events (K, J) and matching exposures (K, J) over real rows (sums:
    securely aggregatable across sites)."""
    m = jnp.asarray(examples.mask, float)
    D = jnp.einsum("n,nkj->kj", m, examples.data["D"])
    E = jnp.einsum("n,nsj->sj", m, examples.data["E"])
    return D, E[jnp.asarray([a for a, _ in spec.transitions])]


def covariate_free_mle(
    examples: EpisodeExamples, spec: MultistateSpec = DEFAULT_SPEC
) -> jax.Array:
    """Closed-form MLE of ``alpha`` without covariates: log(sum D / sum E)
    (``-inf`` where there are no events, also without exposure)."""
    D, E = sufficient_totals(examples, spec)
    rate = jnp.where(D > 0, D, 1.0) / jnp.where(E > 0, E, 1.0)
    return jnp.where(D > 0, jnp.log(rate), -jnp.inf)


def log_likelihood(
    params: Params, example: dict, spec: MultistateSpec = DEFAULT_SPEC
) -> jax.Array:
    """Poisson log-likelihood (up to a constant) of ONE episode."""
    frm = jnp.asarray([a for a, _ in spec.transitions])
    eta = params.alpha + (params.beta @ example["x"])[:, None]  # (K, J)
    return jnp.sum(example["D"] * eta - example["E"][frm] * jnp.exp(eta))


class Scaling(NamedTuple):
    """Reparametrisation ``beta = s_beta * v``, ``alpha = a0 + s_alpha * u -
    beta . xbar_k`` (covariates centred at their event-weighted means ``xbar``
    (K, P)), with ``s ~ 1/sqrt(events per episode)``: the per-episode loss then has
    near-unit, near-diagonal curvature, so plain SGD/FedAvg converges at one
    learning rate."""

    a0: jax.Array
    s_alpha: jax.Array
    s_beta: jax.Array
    xbar: jax.Array


def scaling_totals(
    examples: EpisodeExamples, spec: MultistateSpec = DEFAULT_SPEC
) -> dict:
    """The sums behind :func:`scaling_from_totals`: events ``D`` (K, J), exposures
    ``E`` (K, J), ``Dx2`` (K, P) = sum_i events_ik x_ip^2 and ``n`` (all sums over
    episodes, so a federation gets them by one secure aggregation)."""
    D, E = sufficient_totals(examples, spec)
    m = jnp.asarray(examples.mask, float)
    x = examples.data["x"]
    Dx = jnp.einsum("n,nkj,np->kp", m, examples.data["D"], x)
    Dx2 = jnp.einsum("n,nkj,np->kp", m, examples.data["D"], x**2)
    return {"D": D, "E": E, "Dx": Dx, "Dx2": Dx2, "n": jnp.sum(m)}


def scaling_from_totals(totals: dict) -> Scaling:
    """:class:`Scaling` from pooled :func:`scaling_totals` (summed over sites):
    ``s_alpha = 1/sqrt(D/n)``, ``s_beta = 1/sqrt(Dx2/n)`` (floors at 0.5 events)."""
    D, E, n = totals["D"], totals["E"], totals["n"]
    a0 = _shrunk_log_rates(D, E)
    s_alpha = 1.0 / jnp.sqrt(jnp.maximum(D, 0.5) / n)
    dk = jnp.maximum(D.sum(axis=1), 0.5)[:, None]
    xbar = totals["Dx"] / dk
    var = totals["Dx2"] - totals["Dx"] ** 2 / dk
    s_beta = 1.0 / jnp.sqrt(jnp.maximum(var, 0.5) / n)
    return Scaling(a0, s_alpha, s_beta, xbar)


def identity_scaling(spec: MultistateSpec = DEFAULT_SPEC) -> Scaling:
    K, J, P = spec.dims
    return Scaling(
        jnp.zeros((K, J)), jnp.ones((K, J)), jnp.ones((K, P)), jnp.zeros((K, P))
    )


def to_params(u: Params, scaling: Scaling) -> Params:
    beta = scaling.s_beta * u.beta
    shift = jnp.sum(beta * scaling.xbar, axis=1)[:, None]
    return Params(scaling.a0 + scaling.s_alpha * u.alpha - shift, beta)


def from_params(p: Params, scaling: Scaling) -> Params:
    shift = jnp.sum(p.beta * scaling.xbar, axis=1)[:, None]
    return Params(
        (p.alpha + shift - scaling.a0) / scaling.s_alpha, p.beta / scaling.s_beta
    )


def make_loss(
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    ridge: float = 0.0,
    scaling: Scaling | None = None,
    prior_sd_alpha: float | None = None,
    prior_mean_alpha: float = 0.0,
    n_total: float = 1.0,
):
    """Per-episode loss ``loss(x_flat, example) = -ll_i + ridge/2 |beta|^2
    [+ |alpha - prior_mean_alpha|^2 / (2 prior_sd_alpha^2 n_total)]`` on the flat
    (scaled) parameters. n_total times the mean over the n_total episodes is
    :func:`penalised_nll` with the same arguments (ridge: a N(0, 1/(n ridge)) prior
    on beta; the alpha prior keeps cells without events finite).

    Returns ``(loss, x0, to_natural)``: ``x0`` the flat start (zeros = ``a0`` of the
    scaling) and ``to_natural(x_flat) -> Params``.
    """
    scaling = identity_scaling(spec) if scaling is None else scaling
    K, J, P = spec.dims
    x0, unravel = ravel_pytree(Params(jnp.zeros((K, J)), jnp.zeros((K, P))))

    def to_natural(x):
        return to_params(unravel(x), scaling)

    prec = 0.0 if prior_sd_alpha is None else 1.0 / prior_sd_alpha**2

    def loss(x, example):
        p = to_natural(x)
        return (
            -log_likelihood(p, example, spec)
            + 0.5 * ridge * jnp.sum(p.beta**2)
            + 0.5 * prec / n_total * jnp.sum((p.alpha - prior_mean_alpha) ** 2)
        )

    return loss, x0, to_natural


def penalised_nll(
    params: Params,
    examples: EpisodeExamples,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    ridge: float = 0.0,
    prior_sd_alpha: float | None = None,
    prior_mean_alpha: float = 0.0,
) -> jax.Array:
    """Sum over real episodes of ``-ll_i + ridge/2 |beta|^2`` plus an optional
    N(prior_mean_alpha, prior_sd_alpha^2) prior on every alpha."""
    ll = jax.vmap(log_likelihood, in_axes=(None, 0, None))(params, examples.data, spec)
    m = jnp.asarray(examples.mask, float)
    out = -jnp.sum(m * ll) + 0.5 * ridge * jnp.sum(m) * jnp.sum(params.beta**2)
    if prior_sd_alpha is not None:
        dev = params.alpha - prior_mean_alpha
        out += 0.5 * jnp.sum(dev**2) / prior_sd_alpha**2
    return out


def _newton_parts(params: Params, data: dict, mask, frm, ridge, prec_alpha, mean_alpha):
    """Objective, gradient and the (K, J+P, J+P) block-diagonal Hessian of the
    penalised negative log-likelihood (the likelihood factorises over
    transitions; Poisson GLM: H = sum mu [1, x][1, x]^T)."""
    m = jnp.asarray(mask, float)
    x, E, D = data["x"], data["E"][:, frm], data["D"]  # (n,P) (n,K,J) (n,K,J)
    eta = params.alpha[None] + jnp.einsum("kp,np->nk", params.beta, x)[..., None]
    mu = m[:, None, None] * E * jnp.exp(eta)
    Dm = m[:, None, None] * D
    n = jnp.sum(m)
    f = (
        -jnp.sum(Dm * eta - mu)
        + 0.5 * ridge * n * jnp.sum(params.beta**2)
        + 0.5 * prec_alpha * jnp.sum((params.alpha - mean_alpha) ** 2)
    )
    r = Dm - mu
    g_a = -r.sum(0) + prec_alpha * (params.alpha - mean_alpha)  # (K, J)
    g_b = -jnp.einsum("nkj,np->kp", r, x) + ridge * n * params.beta  # (K, P)
    K, J = params.alpha.shape
    P = x.shape[1]
    h_aa = jax.vmap(jnp.diag)(mu.sum(0) + prec_alpha)  # (K,J,J)
    h_ab = jnp.einsum("nkj,np->kjp", mu, x)  # (K,J,P)
    h_bb = (
        jnp.einsum("nkj,np,nq->kpq", mu, x, x) + ridge * n * jnp.eye(P)[None]
    )  # (K,P,P)
    H = jnp.concatenate(
        [
            jnp.concatenate([h_aa, h_ab], 2),
            jnp.concatenate([jnp.swapaxes(h_ab, 1, 2), h_bb], 2),
        ],
        1,
    )
    g = jnp.concatenate([g_a, g_b], 1)  # (K,J+P)
    del K, J
    return f, g, H


class FitResult(NamedTuple):
    params: Params
    se: Params  # from the inverse observed (penalised) information
    nll: float
    iterations: int
    converged: bool


def fit(
    examples: EpisodeExamples,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    ridge: float = 0.0,
    prior_sd_alpha: float | None = None,
    prior_mean_alpha: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-9,
) -> FitResult:
    """(Penalised) maximum likelihood by damped Newton with the analytic,
    per-transition block Hessian (the Poisson log-likelihood is concave). The
    objective is :func:`penalised_nll`. Cells without events drift towards
    ``-inf`` (their rate MLE is 0) unless ``prior_sd_alpha`` is given."""
    K, J, P = spec.dims
    frm = jnp.asarray([a for a, _ in spec.transitions])
    prec = 0.0 if prior_sd_alpha is None else 1.0 / prior_sd_alpha**2
    parts = jax.jit(
        lambda p: _newton_parts(
            p, examples.data, examples.mask, frm, ridge, prec, prior_mean_alpha
        )
    )
    obj = jax.jit(lambda p: parts(p)[0])
    p = init_params(None, spec, examples)
    fx, g, H = parts(p)
    converged, it = False, 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported)
        step = jnp.linalg.solve(H + 1e-12 * jnp.eye(J + P)[None], g[..., None])[..., 0]
        dec = float(jnp.sum(g * step))
        t = 1.0
        while True:
            pn = Params(p.alpha - t * step[:, :J], p.beta - t * step[:, J:])
            fn = float(obj(pn))
            if fn <= float(fx) - 1e-4 * t * dec or t < 1e-10:
                break
            t *= 0.5
        p = pn
        fx, g, H = parts(p)
        if dec / 2 < tol * max(1.0, abs(float(fx))):
            converged = True
            break
    cov = jnp.linalg.pinv(H)
    sd = jnp.sqrt(jnp.clip(jnp.diagonal(cov, axis1=1, axis2=2), 0.0, None))
    return FitResult(p, Params(sd[:, :J], sd[:, J:]), float(fx), it, converged)


# -------------------------------------------------------------------- NumPyro
def numpyro_model(
    examples: EpisodeExamples,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    prior_mean_alpha: float = float(np.log(0.05)),
    prior_sd_alpha: float = 3.0,
    prior_sd_beta: float = 1.0,
):
    """NumPyro model: alpha ~ N(log 0.05/day, 3^2), beta ~ N(0, 1), Poisson
    likelihood with exposure as a ``factor`` (masked padding)."""
    import numpyro
    import numpyro.distributions as dist

    K, J, P = spec.dims
    alpha = numpyro.sample(
        "alpha",
        dist.Normal(prior_mean_alpha, prior_sd_alpha).expand((K, J)).to_event(2),
    )
    beta = numpyro.sample(
        "beta", dist.Normal(0.0, prior_sd_beta).expand((K, P)).to_event(2)
    )
    ll = jax.vmap(log_likelihood, in_axes=(None, 0, None))(
        Params(alpha, beta), examples.data, spec
    )
    numpyro.factor("loglik", jnp.sum(jnp.where(examples.mask, ll, 0.0)))


def fit_nuts(
    key,
    examples: EpisodeExamples,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    num_warmup: int = 300,
    num_samples: int = 300,
    **prior,
) -> dict:
    """Posterior draws (dict of alpha (S, K, J), beta (S, K, P)) by NUTS."""
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(
        NUTS(numpyro_model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        progress_bar=False,
    )
    mcmc.run(key, examples, spec, **prior)
    return mcmc.get_samples()


# ------------------------------------------------------------------ predictions
def hazards(params: Params, x: jax.Array) -> jax.Array:
    """(K, J) transition hazards (per day) of one patient with covariates x (P,)."""
    return jnp.exp(params.alpha + (params.beta @ x)[:, None])


def _generators(lam: jax.Array, spec: MultistateSpec) -> jax.Array:
    """(J, S, S) intensity matrices from hazards (K, J)."""
    S = len(spec.states)
    frm = jnp.asarray([a for a, _ in spec.transitions])
    to = jnp.asarray([b for _, b in spec.transitions])
    Q = jnp.zeros((lam.shape[1], S, S)).at[:, frm, to].add(lam.T)
    return Q - jnp.eye(S) * Q.sum(-1)[..., None]


def _segments(spec: MultistateSpec, times) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static segmentation of [0, max(times)]: lengths, interval index of each
    segment, and the segment index after which each requested time is reached."""
    times = np.asarray(times, float)
    cuts = np.asarray(spec.cuts, float)
    pts = np.unique(np.concatenate([[0.0], cuts[cuts < times.max()], times]))
    dt = np.diff(pts)
    j = np.clip(np.searchsorted(cuts, pts[:-1], side="right") - 1, 0, len(cuts) - 1)
    at = np.searchsorted(pts, times) - 1  # -1: time 0
    return dt, j, at


def transition_matrices(
    params: Params,
    x: jax.Array,
    times,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    keep: tuple | None = None,
) -> jax.Array:
    """P(0, t) (T, S, S) for one patient: product of ``expm(Q_j dt)`` over the
    segments up to each time (``jax.scipy.linalg.expm``). ``keep``: indices of the
    transitions allowed (others set to 0; e.g. first-exit problems)."""
    dt, j, at = _segments(spec, times)
    lam = hazards(params, x)
    if keep is not None:
        lam = lam * jnp.zeros(lam.shape[0]).at[jnp.asarray(keep)].set(1.0)[:, None]
    Q = _generators(lam, spec)[jnp.asarray(j)] * jnp.asarray(dt)[:, None, None]
    M = jax.vmap(jax.scipy.linalg.expm)(Q)
    S = len(spec.states)

    def step(P, m):
        P = P @ m
        return P, P

    _, cum = jax.lax.scan(step, jnp.eye(S), M)
    cum = jnp.concatenate([jnp.eye(S)[None], cum])
    return cum[jnp.asarray(at) + 1]


@partial(jax.jit, static_argnames=("times", "spec", "keep", "row"))
def _rows(params, x, times, spec, keep, row):
    return jax.vmap(
        lambda xi: transition_matrices(params, xi, times, spec, keep=keep)[:, row]
    )(x)


def _tuple(times) -> tuple:
    return tuple(float(t) for t in np.atleast_1d(np.asarray(times, float)))


def occupation(
    params: Params,
    x: jax.Array,
    times,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    start: int = 0,
) -> jax.Array:
    """State-occupation probabilities (n, T, S) from ``start`` (CICU) at t = 0 for
    patients x (n, P)."""
    return _rows(
        params, jnp.atleast_2d(jnp.asarray(x, float)), _tuple(times), spec, None, start
    )


def first_exit_cif(
    params: Params,
    x: jax.Array,
    times,
    from_state: int = 0,
    spec: MultistateSpec = DEFAULT_SPEC,
) -> jax.Array:
    """Cumulative incidence (n, T, S) of the first exit from ``from_state`` (entered
    at t = 0) into each state (competing risks: other transitions switched off)."""
    keep = tuple(k for k, (a, _) in enumerate(spec.transitions) if a == from_state)
    return _rows(
        params,
        jnp.atleast_2d(jnp.asarray(x, float)),
        _tuple(times),
        spec,
        keep,
        from_state,
    )


def prob_stay_longer(
    params: Params,
    x: jax.Array,
    days: float = 7.0,
    state: int = 0,
    spec: MultistateSpec = DEFAULT_SPEC,
) -> jax.Array:
    """P(first sojourn in ``state`` entered at t = 0 lasts > ``days``) (n,),
    ``exp(-int_0^days sum of its exit hazards)``."""
    cuts = np.append(np.asarray(spec.cuts, float), np.inf)
    overlap = np.clip(np.minimum(cuts[1:], days) - cuts[:-1], 0, None)  # (J,)
    out_k = np.array([a == state for a, _ in spec.transitions], float)
    xs = jnp.atleast_2d(x)
    eta = jnp.einsum("kp,np->nk", params.beta, xs)[..., None]
    lam = jnp.exp(params.alpha[None] + eta)
    return jnp.exp(
        -jnp.einsum("nkj,k,j->n", lam, jnp.asarray(out_k), jnp.asarray(overlap))
    )


def readmission_cif(
    params: Params, x: jax.Array, times, spec: MultistateSpec = DEFAULT_SPEC
) -> jax.Array:
    """P(first readmission by t) (n, T): READMIT made absorbing."""
    ri = spec.states.index("READMIT")
    keep = tuple(k for k, (a, _) in enumerate(spec.transitions) if a != ri)
    return _rows(
        params, jnp.atleast_2d(jnp.asarray(x, float)), _tuple(times), spec, keep, 0
    )[..., ri]


def predict(
    params: Params | jax.Array,
    examples: EpisodeExamples | jax.Array,
    spec: MultistateSpec = DEFAULT_SPEC,
    *,
    horizons=(30.0, 365.0),
    to_natural=None,
) -> dict[str, Any]:
    """Per-patient predictions: ``occupation`` (n, H, S) at the horizons,
    ``mortality`` and ``readmission`` (n, H), ``cicu_gt7`` (n,). ``params`` may be
    a flat vector with ``to_natural`` (from :func:`make_loss`)."""
    if to_natural is not None:
        params = to_natural(params)
    x = examples.data["x"] if isinstance(examples, EpisodeExamples) else examples
    occ = occupation(params, x, horizons, spec)
    return {
        "occupation": occ,
        "mortality": occ[..., spec.states.index("DEAD")],
        "readmission": readmission_cif(params, x, horizons, spec),
        "cicu_gt7": prob_stay_longer(params, x, 7.0, 0, spec),
        "horizons": np.asarray(horizons, float),
    }


__all__ = [
    "COVARIATES",
    "DEFAULT_CUTS",
    "DEFAULT_SPEC",
    "EpisodeExamples",
    "FitResult",
    "MultistateSpec",
    "Params",
    "Scaling",
    "covariate_free_mle",
    "covariate_matrix",
    "design",
    "first_exit_cif",
    "fit",
    "fit_nuts",
    "from_params",
    "hazards",
    "identity_scaling",
    "init_params",
    "log_likelihood",
    "make_loss",
    "numpyro_model",
    "occupation",
    "penalised_nll",
    "predict",
    "prob_stay_longer",
    "readmission_cif",
    "scaling_from_totals",
    "scaling_totals",
    "site_examples",
    "stack_examples",
    "sufficient_totals",
    "to_params",
    "transition_matrices",
]
