"""Build any federated population-PK algorithm by name (for the command line, the
Flower apps and the experiment runner).

=============  ===========================================================
name           what it is
=============  ===========================================================
fed_focei      federated FOCEI: the pooled FOCEI estimate (exact sums)
fedavg         FedAvg on the per-patient FOCEI terms (local SGD)
fedprox        FedProx (FedAvg + proximal term ``mu``)
fedadam        FedAdam (local SGD, Adam on the server)
fedyogi        FedYogi (local SGD, Yogi on the server)
ep             expectation propagation: federated Bayesian posterior
consensus_mc   one-shot consensus Monte Carlo (the Bayesian baseline)
=============  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from phems_clinical.federation.bayes import NUTSSettings, consensus_mc, ep
from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.dp import DPConfig
from phems_clinical.federation.focei import fed_focei
from phems_clinical.federation.strategies import (
    Objective,
    fedadam,
    fedavg,
    fedprox,
    fedyogi,
    focei_loss,
)
from phems_clinical.pk.model import initial_params
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel

ALGORITHMS = (
    "fed_focei",
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "ep",
    "consensus_mc",
)


def build_algorithm(
    name: str,
    model: PopModel,
    *,
    n_sites: int,
    n_occ: int = 1,
    options: dict[str, Any] | None = None,
) -> Algorithm:
    """The algorithm ``name`` for ``model`` over ``n_sites`` sites.

    ``options`` (all optional): ``rounds``; FedOpt family: ``learning_rate``
    (local SGD, default 1e-3 on the per-patient -2LL), ``server_learning_rate``
    (FedAdam/FedYogi, default 0.02), ``local_steps`` (default 2), ``mu``
    (FedProx, default 0.1), ``dp`` (a dict of
    :class:`~phems_clinical.federation.dp.DPConfig` fields: patient-level DP-SGD);
    federated FOCEI: ``hessian`` (``exact``, the default Newton server; ``bhhh``;
    ``bfgs``); EP/consensus MC: ``num_warmup``, ``num_samples``, ``num_chains``,
    ``damping``.
    Unknown options are refused by name.
    """
    opts = dict(options or {})
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm: {name!r} is not one of {', '.join(ALGORITHMS)}")
    rounds = opts.pop("rounds", None)
    if name == "fed_focei":
        kw = {"hessian": opts.pop("hessian")} if "hessian" in opts else {}
        alg = fed_focei(
            model, n_occ, **kw, **({"max_rounds": rounds} if rounds else {})
        )
    elif name in ("ep", "consensus_mc"):
        nuts = {
            k: opts.pop(k)
            for k in ("num_warmup", "num_samples", "num_chains")
            if k in opts
        }
        kw = {"settings": NUTSSettings(**nuts)}
        if name == "ep":
            if "damping" in opts:
                kw["damping"] = opts.pop("damping")
            if rounds:
                kw["max_rounds"] = rounds
            alg = ep(model, n_sites, n_occ, **kw)
        else:
            alg = consensus_mc(model, n_sites, n_occ, **kw)
    else:
        x0 = build_packer(model).pack(initial_params(model))
        alg = build_fedopt(
            name, focei_loss(model, n_occ), x0, opts, default_rounds=rounds or 50
        )
    if opts:
        raise ValueError(f"options for {name}: unknown {', '.join(sorted(opts))}")
    return alg


FEDOPT = ("fedavg", "fedprox", "fedadam", "fedyogi")


def build_fedopt(
    name: str,
    objective: Objective,
    x0: Any,
    opts: dict[str, Any],
    *,
    default_rounds: int = 50,
    learning_rate: float = 1e-3,
    server_learning_rate: float = 0.02,
    local_steps: int = 2,
    **extra,
) -> Algorithm:
    """A FedOpt-family algorithm on any per-patient :class:`Objective` (the PK
    FOCEI terms, the sepsis and cardiac models), taking its options out of
    ``opts`` (``rounds``, ``learning_rate``, ``server_learning_rate``,
    ``local_steps``, ``mu``, ``dp``); the keyword defaults are the model's own.
    Options left in ``opts`` are the caller's to refuse; ``extra`` goes to
    :func:`~phems_clinical.federation.strategies.fedopt` (e.g. ``to_result``)."""
    if name not in FEDOPT:
        raise ValueError(f"algorithm: {name!r} is not one of {', '.join(FEDOPT)}")
    kw = {
        "learning_rate": opts.pop("learning_rate", learning_rate),
        "local_steps": opts.pop("local_steps", local_steps),
        "max_rounds": opts.pop("rounds", None) or default_rounds,
        **extra,
    }
    if "dp" in opts:
        kw["dp"] = DPConfig(**opts.pop("dp"))
    if name == "fedprox":
        kw["mu"] = opts.pop("mu", 0.1)
    if name in ("fedadam", "fedyogi"):
        kw["server_learning_rate"] = opts.pop(
            "server_learning_rate", server_learning_rate
        )
    builders: dict[str, Callable[..., Algorithm]] = {
        "fedavg": fedavg,
        "fedprox": fedprox,
        "fedadam": fedadam,
        "fedyogi": fedyogi,
    }
    return builders[name](objective, x0, **kw)


def estimates_table(model: PopModel, result: dict) -> dict[str, dict[str, float]]:
    """``{NONMEM name: {"estimate": ..., ["sd": ...], ["se": ...]}}`` from any
    algorithm's ``result`` (posterior mean and SD for the Bayesian ones; standard
    error where the fit gives one)."""
    packer = build_packer(model)
    if "natural_mean" in result:
        return {
            n: {"estimate": float(m), "sd": float(s)}
            for n, m, s in zip(
                result["natural_names"],
                result["natural_mean"],
                result["natural_sd"],
                strict=True,
            )
        }
    if "estimates" in result:
        values = result["estimates"]
    else:
        values = packer.to_natural(packer.unpack(result["x"]))
    out = {
        n: {"estimate": float(v)}
        for n, v in zip(packer.natural_names, values, strict=True)
    }
    for n, s in zip(packer.natural_names, result.get("se", ()), strict=False):
        if math.isfinite(float(s)):  # none before the Newton test stopped the fit
            out[n]["se"] = float(s)  # federated FOCEI's R-based standard errors
    return out


__all__ = ["ALGORITHMS", "FEDOPT", "build_algorithm", "build_fedopt", "estimates_table"]
