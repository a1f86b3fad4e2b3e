"""Sepsis prediction models in JAX, one stay per example (federatable).

Two models predict, at every stay-hour, the probability of Phoenix sepsis onset
within the next ``H`` hours (labels and features: :mod:`.sepsis_features`):

* ``"logistic"``: L2-regularised logistic regression on the windowed features;
* ``"tcn"``: a temporal convolution network (Bai, Kolter & Koltun, arXiv:1803.01271,
  2018) on the hourly sequence: a 1x1 input projection to ``channels``, residual
  blocks ``h <- h + relu(causal_conv_d(h))`` with dilation ``d = 2^i``
  (kernel ``k``: receptive field ``1 + (k - 1)(2^B - 1)`` hours; 31 h for k = 3,
  B = 4), and a per-hour linear read-out plus a linear skip from the inputs. The
  convolutions pad on the left only, so the output at hour t depends on hours <= t.

The parameters are one flat vector (``jax.flatten_util.ravel_pytree``); the pytree's
structure alone says which model it is, so ``unravel`` is all a loss needs.

A stay's loss (:func:`make_loss`) is its mean binary cross-entropy over the hours
used (present, before onset) plus the L2 penalty ``l2/2 ||W||^2`` on the weights
(not the biases). A site minimises the MEAN over its stays, i.e.
``mean_i BCE_i + l2/2 ||W||^2`` (equivalently ``sum_i BCE_i + n l2/2 ||W||^2``);
each patient counts once whatever the stay length, which keeps a patient's
gradient bounded for patient-level DP.

Examples: :class:`Examples` ``(data, mask)`` with ``data`` a dict of stay arrays
``x (n, T, F)``, ``y, w, sepsis_label (n, T)`` float32 and ``present (n, T)`` bool,
and ``mask (n,)`` bool (False for padding) -- the same structure as
``phems_clinical.federation.strategies.Examples``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from phems_clinical.models.sepsis_features import (
    LOGISTIC,
    TCN,
    FeatureStats,
    SepsisInputError,
    SiteTensors,
    build_site,
    feature_stats,
    standardise,
)

__all__ = [
    "Examples",
    "LOGISTIC",
    "TCN",
    "apply",
    "fit_central",
    "init_params",
    "make_loss",
    "make_predict",
    "pad_examples",
    "pool_examples",
    "site_examples",
    "to_examples",
]


class Examples(NamedTuple):
    """Stays of one site: ``data`` (dict of arrays with a leading stay axis) and
    ``mask`` (n,) bool, True for real stays."""

    data: Any
    mask: Any


# --- data ------------------------------------------------------------------------


def to_examples(site: SiteTensors, stats: FeatureStats | None = None) -> Examples:
    """Standardised :class:`Examples` of one site (``stats``: pooled sums across
    sites; default this site's own)."""
    stats = feature_stats(site) if stats is None else stats
    names = site.names if site.model == LOGISTIC else None  # TCN: all features
    data = {
        "x": standardise(site.x, stats, names),
        "y": site.y,
        "w": site.w,
        "sepsis_label": site.sepsis_label,
        "present": site.present,
    }
    return Examples(data, np.ones(site.stay_id.shape[0], dtype=bool))


def site_examples(
    hourly,
    onset,
    *,
    model: str = LOGISTIC,
    horizon_h: int = 6,
    max_hours: int = 168,
    stats: FeatureStats | None = None,
    lookback_h: int = 24,
    windows: Sequence[int] = (6, 24),
    return_ids: bool = False,
):
    """One site's hourly table and onsets -> :class:`Examples` (one stay each).

    stats : pooled :class:`~.sepsis_features.FeatureStats` (sum of
        ``feature_stats(build_site(...))`` over the training sites); default: this
        site's own.
    return_ids : also return the stay ids (n,) in example order.
    """
    site = build_site(
        hourly,
        onset,
        model=model,
        horizon_h=horizon_h,
        max_hours=max_hours,
        lookback_h=lookback_h,
        windows=windows,
    )
    ex = to_examples(site, stats)
    return (ex, site.stay_id) if return_ids else ex


def _pad_to(a: np.ndarray, n: int, T: int | None) -> np.ndarray:
    pad = [(0, n - a.shape[0])]
    if a.ndim >= 2 and T is not None:
        pad.append((0, T - a.shape[1]))
    pad += [(0, 0)] * (a.ndim - len(pad))
    return np.pad(np.asarray(a), pad)


def pad_examples(
    sites: Sequence[Examples], n: int | None = None, T: int | None = None
) -> list[Examples]:
    """Pad every site to the same number of stays and hours (zeros, ``mask`` and
    ``present`` False) so the sites can be vmapped."""
    n = max(int(s.mask.shape[0]) for s in sites) if n is None else n
    T = max(int(s.data["x"].shape[1]) for s in sites) if T is None else T
    out = []
    for s in sites:
        if s.mask.shape[0] > n or s.data["x"].shape[1] > T:
            raise SepsisInputError(
                f"pad_examples: a site has more than n={n} stays or T={T} hours"
            )
        data = {k: _pad_to(v, n, T) for k, v in s.data.items()}
        out.append(Examples(data, _pad_to(s.mask, n, None)))
    return out


def pool_examples(sites: Sequence[Examples]) -> Examples:
    """All sites' real stays in one :class:`Examples` (centralised training)."""
    padded = pad_examples(sites)
    data = {
        k: np.concatenate([np.asarray(s.data[k])[np.asarray(s.mask)] for s in padded])
        for k in padded[0].data
    }
    return Examples(data, np.ones(data["x"].shape[0], dtype=bool))


# --- models ----------------------------------------------------------------------


def init_params(
    key,
    n_features: int,
    model: str = LOGISTIC,
    *,
    channels: int = 32,
    kernel_size: int = 3,
    n_blocks: int = 4,
    prior: float | None = None,
) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """Initial flat parameters and ``unravel``.

    prior : outcome prevalence for the output bias (``logit(prior)``); default 0.
    The TCN's weights are uniform on ``+-1/sqrt(fan_in)`` (PyTorch/Equinox default);
    the logistic weights and the TCN's input skip start at 0.
    """
    b0 = 0.0 if prior is None else math.log(prior / (1.0 - prior))
    if model == LOGISTIC:
        params = {"w": jnp.zeros(n_features), "b": jnp.asarray(b0)}
    elif model == TCN:
        keys = jax.random.split(key, n_blocks + 2)

        def uni(k, shape, fan_in):
            lim = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(k, shape, minval=-lim, maxval=lim)

        params = {
            "inp": {
                "w": uni(keys[0], (n_features, channels), n_features),
                "b": jnp.zeros(channels),
            },
            "blocks": [
                {
                    "w": uni(
                        keys[1 + i],
                        (kernel_size, channels, channels),
                        kernel_size * channels,
                    ),
                    "b": jnp.zeros(channels),
                }
                for i in range(n_blocks)
            ],
            "out": {"w": uni(keys[-1], (channels,), channels), "b": jnp.asarray(b0)},
            "skip": {"w": jnp.zeros(n_features)},
        }
    else:
        raise SepsisInputError(
            f"model: expected {LOGISTIC!r} or {TCN!r}, got {model!r}"
        )
    x0, unravel = ravel_pytree(params)
    return x0, unravel


def _causal_conv(h: jax.Array, w: jax.Array, dilation: int) -> jax.Array:
    """(T, C) x (k, C, C') -> (T, C'): ``out[t] = sum_j h[t - d (k-1-j)] @ w[j]``
    (zeros before hour 0). Written as k shifted matmuls rather than
    ``lax.conv_general_dilated``: per-stay gradients of a convolution under
    ``vmap`` become grouped convolutions, which are very slow on CPU."""
    k, T = w.shape[0], h.shape[0]
    out = h @ w[k - 1]
    for j in range(k - 1):
        s = dilation * (k - 1 - j)
        if s < T:
            shifted = jnp.concatenate([jnp.zeros((s, h.shape[1]), h.dtype), h[: T - s]])
            out = out + shifted @ w[j]
    return out


def apply(params, x: jax.Array) -> jax.Array:
    """Per-hour logits (T,) of one stay's features ``x`` (T, F)."""
    if "blocks" not in params:  # logistic
        return x @ params["w"] + params["b"]
    dtype = params["inp"]["w"].dtype
    x = x.astype(dtype)
    h = x @ params["inp"]["w"] + params["inp"]["b"]
    for i, blk in enumerate(params["blocks"]):
        h = h + jax.nn.relu(_causal_conv(h, blk["w"], 2**i) + blk["b"])
    return h @ params["out"]["w"] + params["out"]["b"] + x @ params["skip"]["w"]


def _penalty(params) -> jax.Array:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(jnp.sum(v**2) for p, v in leaves if getattr(p[-1], "key", None) == "w")


def make_loss(
    unravel,
    *,
    l2: float = 1e-4,
    pos_weight: float = 1.0,
    hours_norm: float | None = None,
) -> Callable[[jax.Array, Any], jax.Array]:
    """``loss(x_flat, example) -> scalar``: the stay's weighted BCE over its used
    hours (``example["w"]``) + ``l2/2 ||W||^2`` (see the module docstring).

    hours_norm : ``None`` (default): the stay's MEAN over its used hours (every
        stay counts once). A number ``c``: the stay's SUM over used hours divided by
        ``c``; the mean over stays is then the pooled hour-level loss (times
        ``n_hours / (n_stays c)``), whose minimiser is calibrated per hour; take
        ``c`` = the mean number of used hours per stay (a ratio of two sums).
    pos_weight : weight of the positive hours' term (1 keeps the probabilities
        calibrated).
    """

    def loss(x, ex):
        params = unravel(x)
        z = apply(params, ex["x"])
        y = ex["y"].astype(z.dtype)
        w = ex["w"].astype(z.dtype)
        bce = pos_weight * y * jax.nn.softplus(-z) + (1.0 - y) * jax.nn.softplus(z)
        den = jnp.maximum(jnp.sum(w), 1.0) if hours_norm is None else hours_norm
        return jnp.sum(w * bce) / den + 0.5 * l2 * _penalty(params)

    return loss


def make_predict(unravel) -> Callable[[jax.Array, Any], jax.Array]:
    """``predict(x_flat, examples) -> (n, T)`` probabilities for every stay-hour
    (padding included; select with ``present``/``w``)."""

    @jax.jit
    def predict(x, data_x):
        params = unravel(x)
        return jax.nn.sigmoid(jax.vmap(lambda s: apply(params, s))(data_x))

    def run(x, examples):
        data = examples if isinstance(examples, Mapping) else examples.data
        return predict(x, jnp.asarray(data["x"]))

    return run


class CentralFit(NamedTuple):
    """Result of :func:`fit_central`: parameters and the mean loss per epoch."""

    x: jax.Array
    losses: np.ndarray


def fit_central(
    key,
    loss,
    x0,
    examples: Examples,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    optimizer: optax.GradientTransformation | None = None,
) -> CentralFit:
    """Minibatch training over stays (optax, default Adam) of the mean stay loss.

    Each epoch visits the stays once in an order drawn from ``key``; the last batch
    is padded (mask False), so one compiled step serves every batch.
    """
    opt = optax.adam(learning_rate) if optimizer is None else optimizer
    mask = np.asarray(examples.mask)
    idx_real = np.flatnonzero(mask)
    n = idx_real.size
    if n == 0:
        raise SepsisInputError("fit_central: no stays (mask all False)")
    bs = min(batch_size, n)
    nb = -(-n // bs)
    data = jax.tree.map(jnp.asarray, examples.data)
    vg = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))

    @jax.jit
    def epoch(carry, perm, data):
        def step(c, ids):
            x, st = c
            batch = jax.tree.map(lambda a: a[jnp.maximum(ids, 0)], data)
            m = (ids >= 0).astype(x.dtype)
            v, g = vg(x, batch)
            grad = jnp.sum(g * m[:, None], 0) / jnp.sum(m)
            upd, st = opt.update(grad, st, x)
            return (optax.apply_updates(x, upd), st), jnp.sum(v * m) / jnp.sum(m)

        carry, losses = jax.lax.scan(step, carry, perm)
        return carry, jnp.mean(losses)

    x0 = jnp.asarray(x0)
    carry = (x0, opt.init(x0))
    hist = []
    for k in jax.random.split(key, epochs):
        order = np.asarray(jax.random.permutation(k, n))
        ids = np.full(nb * bs, -1, dtype=np.int64)
        ids[:n] = idx_real[order]
        carry, lv = epoch(carry, jnp.asarray(ids.reshape(nb, bs)), data)
        hist.append(float(lv))
    return CentralFit(carry[0], np.asarray(hist))
