"""Differential privacy for federated training: per-patient clipping and Gaussian
noise inside each site (local DP-SGD), optional site-level DP on the aggregate
(DP-FedAvg), and (ε, δ) accounting with Google's ``dp-accounting``.

Unit of privacy
    :class:`DPConfig` protects **one patient**: neighbouring data sets differ by
    adding or removing one patient's whole record at one site (every row of the
    objective that belongs to that patient is one row of ``grads``). A patient
    treated at two hospitals is two records; their ε is at most the sum of the
    two sites' ε. :class:`SiteDPConfig` protects **one hospital** (add/remove one
    site's whole update), which is weak with 3-10 hospitals (ref. file §5: q = 1,
    z = 1, 50 rounds gives ε ≈ 55 at δ = 1e-5).

Threat model
    The server and the other sites are honest-but-curious: they follow the
    protocol but may inspect everything they receive (model updates, aggregates,
    the final model). A site is trusted with its own patients' data and its own
    noise: clipping, noise and Poisson subsampling happen at the site, before
    anything leaves it, so everything downstream (server aggregate, SecAgg sums,
    the released model, evaluation metrics computed from it) is post-processing
    and keeps the guarantee. Not covered: a malicious site that skips its noise,
    side channels (timing, message sizes), the non-privatised diagnostics in
    :class:`DPInfo`, and the cohort size N, which is treated as public (it fixes
    the DP-SGD denominator and δ, as in Abadi et al. 2016 and Opacus).

Accounting
    Every noisy release of a site's data is one composition of the (optionally
    Poisson-subsampled) Gaussian mechanism with sensitivity ``clip`` on the sum
    and noise multiplier z (σ = z·clip). *Every local step counts*: a round of E
    local DP-SGD steps is E compositions, although only the last iterate leaves
    the site (conservative; the usual DP-SGD analysis). ε is reported per site at
    δ < 1/N, by the RDP accountant (Mironov 2017; conservative) or the PLD
    accountant (Koskela et al. 2020, Doroshenko et al. 2022; tight up to a
    pessimistic discretisation). Sites hold disjoint patients, so the suite-level
    patient ε is the maximum over sites (parallel composition).

References
----------
.. [1] Abadi M, et al. Deep learning with differential privacy. ACM CCS 2016.
.. [2] Mironov I. Rényi differential privacy. IEEE CSF 2017.
.. [3] Balle B, Wang Y-X. Improving the Gaussian mechanism for differential
   privacy: analytical calibration and optimal denoising. ICML 2018.
.. [4] McMahan HB, Ramage D, Talwar K, Zhang L. Learning differentially private
   recurrent language models. ICLR 2018 (DP-FedAvg).
.. [5] Doroshenko V, Ghazi B, Kamath P, Kumar R, Manurangsi P. Connect the dots:
   tighter discrete approximations of privacy loss distributions. PETS 2022.

Examples
--------
>>> cfg = DPConfig(clip=1.0, noise_multiplier=1.0)
>>> round(epsilon(cfg, n_patients=30, steps=50), 1)  # RDP, delta = 1/(10*30)
47.0
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from phems_clinical._typing import Array, Bool, Float, Int, Key

if TYPE_CHECKING:
    import dp_accounting as dpa

__all__ = [
    "DPAggregateState",
    "DPConfig",
    "DPInfo",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "SiteDPConfig",
    "calibrate_noise_multiplier",
    "check_budget",
    "clip_and_noise_aggregate",
    "clip_rows",
    "clip_vector",
    "dp_aggregate",
    "epsilon",
    "init_ledger",
    "ledger_after",
    "ledger_epsilons",
    "poisson_mask",
    "privacy_report",
    "privatise_mean",
    "privatise_sum",
    "resolve_delta",
    "validate_config",
]

ACCOUNTANTS = ("rdp", "pld")

NOISE_SOURCE = {
    "patient": "each site's OS CSPRNG (secrets), held at the site: not "
    "reproducible from the run seed, by design",
    "hospital": "the server's OS CSPRNG (secrets), held by the server: not "
    "reproducible from the run seed, by design (it protects the "
    "released model from its readers, not the sites from the server)",
}
"""What :func:`privacy_report` states about the noise, per unit of privacy."""

# Pessimistic PLD grid: ε stays an upper bound. 10x coarser than the library default
# (1e-4) and 10x faster; on the ref. §5 examples ε changes by < 1e-4 relative.
_PLD_DISCRETISATION = 1e-3


class DPConfig(NamedTuple):
    """Patient-level DP at one site (local DP-SGD).

    Attributes
    ----------
    clip : float
        L2 bound C on one patient's row of ``grads`` (same units as the gradient).
        ``math.inf`` means no clipping, allowed only with ``noise_multiplier=0``.
    noise_multiplier : float
        z: the noise on the *sum* of clipped rows is N(0, (z·C)² I). 0 = no noise
        (ε = inf).
    delta : float or None
        δ of the reported (ε, δ); None means 1/(10·N) at a site with N patients.
        Must be < 1/N.
    epsilon_budget : float or None
        Largest ε one site may spend for one data user; None = no limit.
    accountant : {"rdp", "pld"}
        RDP (conservative) or PLD (tight) accounting.
    sampling_rate : float
        q in (0, 1]: each step Poisson-samples each patient with probability q
        (amplification by subsampling); 1.0 = full batch.
    unit : str
        Always ``"patient"``: add/remove one patient's whole record at one site.
    """

    clip: float
    noise_multiplier: float
    delta: float | None = None
    epsilon_budget: float | None = None
    accountant: str = "rdp"
    sampling_rate: float = 1.0
    unit: str = "patient"


class SiteDPConfig(NamedTuple):
    """Hospital-level DP on the server aggregate (DP-FedAvg, McMahan et al. 2018).

    Each site clips its update to L2 norm ``clip`` (S) with :func:`clip_vector`;
    the server adds N(0, (z·S)² I) to the sum (:func:`clip_and_noise_aggregate`).
    Fields as in :class:`DPConfig`, with N = number of sites and ``unit`` always
    ``"hospital"`` (add/remove one site's whole update). ``delta`` defaults to
    1e-5 rather than 1/(10·K), which would be a meaningless 1/30 for K = 3.
    """

    clip: float
    noise_multiplier: float
    delta: float | None = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "rdp"
    sampling_rate: float = 1.0
    unit: str = "hospital"


AnyDPConfig = DPConfig | SiteDPConfig


class DPInfo(NamedTuple):
    """Site-side diagnostics of one privatised step. NOT privatised: never send
    these to the server."""

    n_clipped: Int[Array, ""]  # rows whose norm exceeded clip
    batch_size: Int[Array, ""]  # rows summed (real and sampled)
    noise_std: Float[Array, ""]  # σ = z·clip on the sum


class PrivacyBudgetExceeded(ValueError):
    """A planned number of noisy steps would spend more than ``epsilon_budget``."""


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _expected_unit(cfg: AnyDPConfig) -> str:
    return "hospital" if isinstance(cfg, SiteDPConfig) else "patient"


def _population(cfg: AnyDPConfig) -> str:
    return "sites" if isinstance(cfg, SiteDPConfig) else "patients at the site"


def validate_config(cfg: AnyDPConfig, n: int | None = None) -> None:
    """Check a DP configuration; raise ``ValueError`` naming the bad field.

    Parameters
    ----------
    cfg : DPConfig or SiteDPConfig
    n : int, optional
        Number of patients at the site (:class:`DPConfig`) or of sites
        (:class:`SiteDPConfig`); when given, ``delta < 1/n`` is checked.

    Examples
    --------
    >>> validate_config(DPConfig(clip=math.inf, noise_multiplier=1.0))
    Traceback (most recent call last):
    ...
    ValueError: DPConfig.clip must be finite when noise_multiplier > 0 (sigma = z*clip), got inf
    """  # noqa: E501
    name = type(cfg).__name__
    clip, z, q = cfg.clip, cfg.noise_multiplier, cfg.sampling_rate
    if _is_number(clip) and not clip > 0:  # also catches nan
        raise ValueError(
            f"{name}.clip must be > 0 (math.inf = no clipping), got {clip}"
        )
    if _is_number(z) and not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"{name}.noise_multiplier must be finite and >= 0, got {z}")
    if _is_number(z) and _is_number(clip) and z > 0 and math.isinf(clip):
        raise ValueError(
            f"{name}.clip must be finite when noise_multiplier > 0 "
            f"(sigma = z*clip), got {clip}"
        )
    if _is_number(q) and not 0 < q <= 1:
        raise ValueError(f"{name}.sampling_rate must be in (0, 1], got {q}")
    if cfg.accountant not in ACCOUNTANTS:
        raise ValueError(
            f"{name}.accountant must be one of {ACCOUNTANTS}, got {cfg.accountant!r}"
        )
    if cfg.unit != _expected_unit(cfg):
        raise ValueError(
            f"{name}.unit must be {_expected_unit(cfg)!r}, got {cfg.unit!r}"
        )
    b = cfg.epsilon_budget
    if b is not None and not b > 0:
        raise ValueError(f"{name}.epsilon_budget must be > 0 or None, got {b}")
    if n is not None and (int(n) != n or n < 1):
        raise ValueError(
            f"number of {_population(cfg)} must be an integer >= 1, got {n}"
        )
    d = cfg.delta
    if d is not None:
        if not 0 < d < 1:
            raise ValueError(f"{name}.delta must be in (0, 1), got {d}")
        if n is not None and not d < 1 / n:
            raise ValueError(
                f"{name}.delta must be < 1/N = {1 / n:.4g} (N = {n} "
                f"{_population(cfg)}; with delta >= 1/N, releasing one random "
                f"record is '(0, delta)-DP'), got {d}"
            )


def resolve_delta(cfg: AnyDPConfig, n: int) -> float:
    """δ used for a site with ``n`` patients (or ``n`` sites): ``cfg.delta``, or
    ``1/(10 n)`` when None. Validates ``cfg`` and ``δ < 1/n``."""
    validate_config(cfg, n)
    return float(cfg.delta) if cfg.delta is not None else 1.0 / (10 * n)


# ---------------------------------------------------------------- mechanisms


def clip_rows(
    grads: Float[Array, "n d"],
    clip: float | Float[Array, ""],
    mask: Bool[Array, " n"] | None = None,
) -> tuple[Float[Array, "n d"], Int[Array, ""]]:
    """Clip each row to L2 norm ``clip``; zero the masked-out rows.

    Rows with norm <= clip are returned bit-for-bit (``jnp.where``, not a
    multiplication by 1), so ``clip=math.inf`` is the identity on real rows.

    Parameters
    ----------
    grads : (n, d) array
        Row i = gradient of patient i's loss term.
    clip : float
        L2 bound C (> 0, ``math.inf`` allowed).
    mask : (n,) bool array, optional
        True for real (non-padded, sampled) rows; default all True.

    Returns
    -------
    clipped : (n, d) array
        Rows with norm > C rescaled to norm C; masked rows 0.
    n_clipped : int array
        Number of real rows that were rescaled.

    Examples
    --------
    >>> g = jnp.array([[3.0, 4.0], [0.3, 0.4], [9.0, 9.0]])
    >>> c, k = clip_rows(g, 1.0, mask=jnp.array([True, True, False]))
    >>> print(c.round(6), int(k))
    [[0.6 0.8]
     [0.3 0.4]
     [0.  0. ]] 1
    """
    grads = jnp.asarray(grads)
    clip = jnp.asarray(clip, grads.dtype)
    norms = jnp.linalg.norm(grads, axis=-1)
    over = norms > clip
    # Never form 0/0, inf/inf or 0*inf, even in the branch jnp.where discards.
    ones = jnp.ones_like(norms)
    scale = jnp.where(over, clip / jnp.where(over, norms, ones), ones)
    clipped = jnp.where(over[:, None], grads * scale[:, None], grads)
    if mask is None:
        return clipped, jnp.sum(over)
    mask = jnp.asarray(mask, bool)
    clipped = jnp.where(mask[:, None], clipped, jnp.zeros_like(clipped))
    return clipped, jnp.sum(over & mask)


def _noise_std(clip: Any, z: Any, dtype: Any) -> Float[Array, ""]:
    # z = 0 with clip = inf must give exactly 0, not 0*inf = nan.
    clip, z = jnp.asarray(clip, dtype), jnp.asarray(z, dtype)
    on = z > 0
    return jnp.where(
        on, z * jnp.where(on, clip, jnp.zeros_like(clip)), jnp.zeros_like(z)
    )


def _gaussian_sum(
    key: Key, total: Float[Array, " d"], std: Float[Array, ""]
) -> Float[Array, " d"]:
    noise = jax.random.normal(key, total.shape, total.dtype)
    return jnp.where(std > 0, total + std * noise, total)


def privatise_sum(
    key: Key,
    grads: Float[Array, "n d"],
    cfg: DPConfig,
    mask: Bool[Array, " n"] | None = None,
) -> tuple[Float[Array, " d"], DPInfo]:
    """Gaussian mechanism on the sum of per-patient rows: one DP-SGD release.

    ``noisy_sum = sum_i clip(g_i) + N(0, (z·C)² I_d)`` over the rows with
    ``mask`` True. The L2 sensitivity of the clipped sum to adding or removing
    one patient is C, so one call is one composition of the Gaussian mechanism
    with noise multiplier z for the unit "patient" (ε: :func:`epsilon` with
    ``steps=1``; every call counts). With z = 0 nothing is added, exactly, and ε
    is infinite; with C = inf and z = 0 the result is the plain masked sum.

    Threat model: honest-but-curious server and other sites; run at the site,
    which is trusted with its own data, before anything leaves it.

    .. warning::
       The subsampling amplification assumed by ``cfg.sampling_rate < 1`` holds
       only if ``mask`` includes a fresh :func:`poisson_mask` for this step (or use
       :func:`privatise_mean`, which draws it). ``info`` is not private.

    Parameters
    ----------
    key : PRNG key
        Fresh key for this step's noise.
    grads : (n, d) array
        Per-patient gradient rows.
    cfg : DPConfig
        Validated at trace time when its fields are Python numbers.
    mask : (n,) bool array, optional
        Real (and sampled) rows; default all.

    Returns
    -------
    noisy_sum : (d,) array
    info : DPInfo

    References
    ----------
    Abadi et al., ACM CCS 2016 (DP-SGD); Balle & Wang, ICML 2018.

    Examples
    --------
    >>> g = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    >>> s, info = privatise_sum(jax.random.key(0), g, DPConfig(1.0, 0.0))
    >>> print(s.round(6), int(info.n_clipped))
    [0.9 1.2] 1
    """
    validate_config(cfg)
    clipped, n_clipped = clip_rows(grads, cfg.clip, mask)
    total = jnp.sum(clipped, axis=0)
    std = _noise_std(cfg.clip, cfg.noise_multiplier, total.dtype)
    rows = jnp.ones(grads.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
    info = DPInfo(n_clipped=n_clipped, batch_size=jnp.sum(rows), noise_std=std)
    return _gaussian_sum(key, total, std), info


def poisson_mask(key: Key, n: int, q: float | Float[Array, ""]) -> Bool[Array, " n"]:
    """Poisson subsampling: each of ``n`` rows is kept independently with
    probability ``q`` (q = 1 keeps all, exactly). The batch size is random; this
    is the sampling that the ``sampling_rate`` accounting assumes."""
    return jax.random.bernoulli(key, q, (n,))


def privatise_mean(
    key: Key,
    grads: Float[Array, "n d"],
    cfg: DPConfig,
    mask: Bool[Array, " n"] | None = None,
) -> tuple[Float[Array, " d"], DPInfo]:
    """One DP-SGD gradient: Poisson-sample, clip, sum, add noise, divide by q·N.

    ``mask`` marks the site's N real patients; each is sampled with probability
    q = ``cfg.sampling_rate`` (none dropped when q = 1), the sum is privatised by
    :func:`privatise_sum`, and the result is divided by the *expected* batch
    size q·N, a fixed denominator (N is treated as public), so the noise on the
    mean has SD z·C/(q·N) per coordinate. Privacy: one composition of the
    Poisson-subsampled Gaussian mechanism with noise multiplier z, unit
    "patient" at this site (:func:`epsilon` counts each call as one step);
    threat model as in :func:`privatise_sum`.

    Examples
    --------
    >>> g = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    >>> m, _ = privatise_mean(jax.random.key(0), g, DPConfig(1.0, 0.0))
    >>> print(m.round(6))
    [0.45 0.6 ]
    """
    k_sample, k_noise = jax.random.split(key)
    n = grads.shape[0]
    real = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    batch = real & poisson_mask(k_sample, n, cfg.sampling_rate)
    noisy_sum, info = privatise_sum(k_noise, grads, cfg, batch)
    denom = cfg.sampling_rate * jnp.maximum(jnp.sum(real), 1).astype(noisy_sum.dtype)
    return noisy_sum / denom, info


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate` (the key lives in state, as in optax)."""

    rng_key: Key
    # noisy releases so far = steps for the ledger; named as optax's states name
    # their step counters, which shadows tuple.count (hence the ignore)
    count: Int[Array, ""]  # type: ignore[assignment]


def dp_aggregate(cfg: DPConfig, key: Key) -> optax.GradientTransformationExtraArgs:
    """Optax transformation: per-patient rows (n, d) -> DP-SGD mean gradient (d,).

    The optax ``differentially_private_aggregate`` pattern with a real-patient
    mask, Poisson subsampling and a fixed denominator: ``update(grads, state,
    params=None, *, mask=None)`` returns :func:`privatise_mean` of ``grads`` with
    a fresh split of ``state.rng_key``. Each update is one composition of the
    (subsampled) Gaussian mechanism, unit "patient"; ``state.count`` is the
    number of steps to charge to the site's :class:`PrivacyLedger`.

    .. warning::
       Expects per-patient rows on axis 0, so it must be first in an
       ``optax.chain``; ``optax.MultiSteps``/``apply_every`` break the accounting.

    Examples
    --------
    >>> tx = optax.chain(dp_aggregate(DPConfig(1.0, 1.0), jax.random.key(0)),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> step, state = tx.update(jnp.ones((5, 2)), state, mask=jnp.arange(5) < 4)
    >>> step.shape, int(state[0].count)
    ((2,), 1)
    """
    validate_config(cfg)

    def init(params: Any) -> DPAggregateState:
        del params  # The state does not depend on the parameters.
        return DPAggregateState(rng_key=key, count=jnp.zeros((), jnp.int32))

    def update(
        updates: Float[Array, "n d"],
        state: DPAggregateState,
        params: Any = None,
        *,
        mask: Bool[Array, " n"] | None = None,
        **extra_args: Any,
    ) -> tuple[Float[Array, " d"], DPAggregateState]:
        del params, extra_args  # Only the per-patient rows and the mask matter.
        new_key, step_key = jax.random.split(state.rng_key)
        mean, _ = privatise_mean(step_key, updates, cfg, mask)
        return mean, DPAggregateState(rng_key=new_key, count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def clip_vector(
    v: Float[Array, " d"], clip: float | Float[Array, ""]
) -> Float[Array, " d"]:
    """Clip one site's update to L2 norm ``clip`` (S in DP-FedAvg); vectors with
    norm <= S are returned bit-for-bit. Run at the site before sending.

    Examples
    --------
    >>> print(clip_vector(jnp.array([3.0, 4.0]), 1.0).round(6))
    [0.6 0.8]
    """
    return clip_rows(jnp.asarray(v)[None, :], clip)[0][0]


def clip_and_noise_aggregate(
    key: Key,
    site_updates_sum: Float[Array, " d"],
    n_sites: int,
    cfg: SiteDPConfig,
) -> Float[Array, " d"]:
    """DP-FedAvg server step: ``(sum_k clip_S(Δ_k) + N(0, (z·S)² I)) / (q·K)``.

    Each site clips its own update with :func:`clip_vector` (so the sum can come
    from secure aggregation and the server never sees one update); this adds the
    noise to the sum and divides by the fixed denominator q·K (uniform weights,
    K = ``n_sites``). One call is one composition of the Gaussian mechanism with
    noise multiplier z and sensitivity S for the unit "hospital" (add/remove one
    site's update); ε over T rounds is ``epsilon(cfg, n_sites, T)``. Threat
    model: honest-but-curious parties other than the noise-adding server; the
    server must be trusted to add the noise (or the noise be split across
    sites under SecAgg). With z = 0 no noise is added, exactly.

    References
    ----------
    McMahan, Ramage, Talwar & Zhang, ICLR 2018.

    Examples
    --------
    >>> s = clip_vector(jnp.array([3.0, 4.0]), 1.0) + jnp.array([0.1, 0.0])
    >>> print(clip_and_noise_aggregate(jax.random.key(0), s, 2,
    ...                                SiteDPConfig(1.0, 0.0)).round(6))
    [0.35 0.4 ]
    """
    validate_config(cfg)
    total = jnp.asarray(site_updates_sum)
    std = _noise_std(cfg.clip, cfg.noise_multiplier, total.dtype)
    return _gaussian_sum(key, total, std) / (cfg.sampling_rate * n_sites)


# ---------------------------------------------------------------- accounting


def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    return int(steps)


def _event(z: float, steps: int, q: float) -> dpa.DpEvent:
    # dp_accounting (with scipy.signal) is imported where it is used: a site only
    # adds noise, and importing it cost about a third of a ClientApp's start-up
    import dp_accounting as dpa

    event = dpa.GaussianDpEvent(z)
    if q < 1:
        event = dpa.PoissonSampledDpEvent(q, event)
    return dpa.SelfComposedDpEvent(event, steps)


def _accountant(name: str) -> dpa.PrivacyAccountant:
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    if name == "pld":
        return pld.PLDAccountant(rel, value_discretization_interval=_PLD_DISCRETISATION)
    return rdp.RdpAccountant(neighboring_relation=rel)


@functools.lru_cache(maxsize=4096)
def _epsilon(z: float, steps: int, q: float, delta: float, accountant: str) -> float:
    if steps == 0:
        return 0.0
    if z == 0:
        return math.inf
    acc = _accountant(accountant).compose(_event(z, steps, q))
    return float(acc.get_epsilon(delta))


def epsilon(cfg: AnyDPConfig, n_patients: int, steps: int) -> float:
    """ε after ``steps`` noisy releases of one site's data, at δ = resolved delta.

    ``steps`` compositions of the Gaussian mechanism with noise multiplier z
    (sensitivity C on the sum), Poisson-subsampled with rate q when q < 1,
    add/remove-one-patient adjacency, via ``dp_accounting`` (``RdpAccountant`` or
    ``PLDAccountant`` on ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(z)), steps)``). Count every local step of every round. z = 0
    gives ``math.inf``; ``steps=0`` gives 0. For :class:`SiteDPConfig` pass the
    number of sites and rounds (unit "hospital").

    Examples
    --------
    >>> cfg = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5,
    ...                sampling_rate=0.032)
    >>> round(epsilon(cfg, 2000, 625), 2)  # 20 epochs, ref. file section 5
    4.75
    """
    delta = resolve_delta(cfg, n_patients)
    return _epsilon(
        float(cfg.noise_multiplier),
        _check_steps(steps),
        float(cfg.sampling_rate),
        delta,
        cfg.accountant,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    steps: int,
    sampling_rate: float = 1.0,
    *,
    accountant: str = "rdp",
) -> float:
    """Smallest z whose ε after ``steps`` (subsampled) Gaussian releases is
    <= ``target_epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``,
    tolerance 1e-6 in z, on the safe side). Same accounting as :func:`epsilon`.

    Examples
    --------
    >>> z = calibrate_noise_multiplier(1.0, 1e-5, 1)
    >>> 4.0 < z < 5.0
    True
    """
    steps = _check_steps(steps)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if steps == 0 or math.isinf(target_epsilon):
        return 0.0

    def eps(z: float) -> float:
        return _epsilon(z, steps, sampling_rate, delta, accountant)

    # Bracket by doubling/halving from z = 1, so neither end is a degenerate
    # (z -> 0, huge-ε) mechanism that the PLD grid would struggle with.
    lo, hi = 1.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
    while eps(lo) <= target_epsilon:
        lo, hi = lo / 2, lo
        if lo < 1e-6:
            return hi
    import dp_accounting as dpa

    return float(
        dpa.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda z: _event(z, steps, sampling_rate),
            target_epsilon,
            delta,
            bracket_interval=dpa.ExplicitBracketInterval(lo, hi),
        )
    )


def _json_number(x: float) -> float | str:
    x = float(x)
    return ("inf" if x > 0 else "-inf") if math.isinf(x) else x


def privacy_report(cfg: AnyDPConfig, n_patients: int, steps: int) -> dict[str, Any]:
    """JSON-safe statement of the guarantee after ``steps`` releases at one site.

    Keys: ``epsilon``, ``delta``, ``unit``, ``accountant``, ``noise_multiplier``,
    ``clip``, ``steps``, ``sampling_rate``, ``epsilon_budget``, ``noise_source``
    (where the noise comes from, and that it is not reproducible from the run
    seed by design; see :func:`phems_clinical.federation.core.run_site_keys`).
    Infinite values
    (ε with z = 0, clip = inf) are the string ``"inf"``, as elsewhere in the suite.

    Examples
    --------
    >>> r = privacy_report(DPConfig(clip=math.inf, noise_multiplier=0.0), 30, 5)
    >>> r["epsilon"], r["delta"], r["unit"]
    ('inf', 0.0033333333333333335, 'patient')
    """
    b = cfg.epsilon_budget
    return {
        "epsilon": _json_number(epsilon(cfg, n_patients, steps)),
        "delta": resolve_delta(cfg, n_patients),
        "unit": cfg.unit,
        "accountant": cfg.accountant,
        "noise_multiplier": float(cfg.noise_multiplier),
        "clip": _json_number(cfg.clip),
        "steps": int(steps),
        "sampling_rate": float(cfg.sampling_rate),
        "epsilon_budget": None if b is None else _json_number(b),
        "noise_source": NOISE_SOURCE[_expected_unit(cfg)],
    }


def check_budget(
    cfg: AnyDPConfig, n_patients: int, steps_planned: int, *, site: str | int = "?"
) -> float:
    """Refuse a plan that would exceed ``cfg.epsilon_budget``; return its ε.

    ``steps_planned`` is the site's total after the plan (already spent plus
    planned, e.g. ``ledger.steps[k] + rounds * local_steps``). Raises
    :class:`PrivacyBudgetExceeded` stating ε, the budget, δ, the unit of privacy
    and the site; z = 0 (ε = inf) is refused under any finite budget. With no
    budget, nothing is refused.

    Examples
    --------
    >>> cfg = DPConfig(clip=1.0, noise_multiplier=1.0, epsilon_budget=10.0)
    >>> check_budget(cfg, 30, 200, site="A")
    Traceback (most recent call last):
    ...
    phems_clinical.federation.dp.PrivacyBudgetExceeded: site A: 200 noisy steps would reach epsilon = 145.8 > budget 10 at delta = 0.003333 (unit of privacy: one patient, add/remove of one patient's whole record at this site; rdp accountant, z = 1, q = 1, clip = 1)
    """  # noqa: E501
    eps = epsilon(cfg, n_patients, steps_planned)
    b = cfg.epsilon_budget
    if b is not None and not eps <= b:
        u = cfg.unit
        where = "this site" if u == "patient" else "the federation"
        raise PrivacyBudgetExceeded(
            f"site {site}: {int(steps_planned)} noisy steps would reach epsilon = "
            f"{eps:.4g} > budget {b:g} at delta = {resolve_delta(cfg, n_patients):.4g}"
            f" (unit of privacy: one {u}, add/remove of one {u}'s whole record at "
            f"{where}; {cfg.accountant} accountant, z = {cfg.noise_multiplier:g}, "
            f"q = {cfg.sampling_rate:g}, clip = {cfg.clip:g})"
        )
    return eps


class PrivacyLedger(NamedTuple):
    """Noisy releases charged to each site so far (host-side, immutable)."""

    sites: tuple[str, ...]  # site names, for messages
    steps: tuple[int, ...]  # compositions per site (every noisy local step)


def init_ledger(sites: int | Sequence[str]) -> PrivacyLedger:
    """Empty ledger for ``sites`` (a count, named "0", "1", ..., or names)."""
    names = tuple(str(s) for s in (range(sites) if isinstance(sites, int) else sites))
    return PrivacyLedger(sites=names, steps=(0,) * len(names))


def ledger_after(ledger: PrivacyLedger, site: int | str, steps: int) -> PrivacyLedger:
    """The ledger after ``site`` (index or name) made ``steps`` more releases.

    Examples
    --------
    >>> led = ledger_after(init_ledger(["A", "B"]), "B", 10)
    >>> ledger_after(led, 0, 5).steps
    (5, 10)
    """
    k = ledger.sites.index(site) if isinstance(site, str) else int(site)
    if not 0 <= k < len(ledger.steps):
        raise ValueError(f"site index must be in [0, {len(ledger.steps)}), got {site}")
    new = list(ledger.steps)
    new[k] += _check_steps(steps)
    return ledger._replace(steps=tuple(new))


def ledger_epsilons(
    ledger: PrivacyLedger, cfg: AnyDPConfig, n_patients: Sequence[int]
) -> tuple[float, ...]:
    """ε spent by each site (its own δ from its N). Sites hold disjoint patients,
    so the suite's patient-level ε is the max (parallel composition)."""
    if len(n_patients) != len(ledger.steps):
        raise ValueError(
            f"n_patients has {len(n_patients)} entries for {len(ledger.steps)} sites"
        )
    return tuple(
        epsilon(cfg, n, s) for n, s in zip(n_patients, ledger.steps, strict=True)
    )
