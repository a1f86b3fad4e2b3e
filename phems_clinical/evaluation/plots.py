"""Goodness-of-fit and visual-predictive-check figures (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _identity(ax, x, y):
    lo = float(np.nanmin([np.nanmin(x), np.nanmin(y), 0.0]))
    hi = float(np.nanmax([np.nanmax(x), np.nanmax(y)]))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)


def gof_figure(dv, pred, ipred, cwres, time, path: Path, *, unit: str = "IU/dL",
               title: str = "") -> Path:
    """Four-panel goodness of fit: DV vs PRED, DV vs IPRED, CWRES vs time and PRED.

    Inputs are flat arrays over quantified (non-BLQ) observations.
    """
    fig, axes = plt.subplots(2, 2, figsize=(9, 8))
    ax = axes[0, 0]
    ax.scatter(pred, dv, s=8, alpha=0.6)
    _identity(ax, pred, dv)
    ax.set(xlabel=f"PRED ({unit})", ylabel=f"DV ({unit})", title="DV vs PRED")
    ax = axes[0, 1]
    ax.scatter(ipred, dv, s=8, alpha=0.6, color="tab:green")
    _identity(ax, ipred, dv)
    ax.set(xlabel=f"IPRED ({unit})", ylabel=f"DV ({unit})", title="DV vs IPRED")
    for ax, x, lab in ((axes[1, 0], time, "Time (h)"), (axes[1, 1], pred,
                                                         f"PRED ({unit})")):
        ax.scatter(x, cwres, s=8, alpha=0.6, color="tab:purple")
        for y in (-2, 0, 2):
            ax.axhline(y, color="k", lw=0.8 if y == 0 else 0.5, ls="-" if y == 0
                       else "--")
        ax.set(xlabel=lab, ylabel="CWRES", title=f"CWRES vs {lab.split(' ')[0]}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def vpc_figure(time, dv, sims, path: Path, *, n_bins: int = 8, unit: str = "IU/dL",
               title: str = "Visual predictive check") -> Path:
    """Binned VPC: observed 5/50/95th percentiles over simulated 90% bands.

    ``time`` (time after dose) and ``dv`` are flat quantified observations,
    ``sims`` is ``(n_rep, n_obs)`` on the same records. Bins are quantiles of time.
    """
    edges = np.unique(np.quantile(time, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, time, side="right") - 1, 0, len(edges) - 2)
    centres, obs_q, sim_q = [], [], []
    for k in range(len(edges) - 1):
        sel = idx == k
        if sel.sum() < 3:
            continue
        centres.append(np.median(time[sel]))
        obs_q.append(np.percentile(dv[sel], [5, 50, 95]))
        per_rep = np.percentile(sims[:, sel], [5, 50, 95], axis=1)  # (3, n_rep)
        sim_q.append(np.percentile(per_rep, [5, 50, 95], axis=1))   # (3 pct, 3 ci)
    centres = np.array(centres)
    obs_q, sim_q = np.array(obs_q), np.array(sim_q)
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = ("tab:blue", "tab:red", "tab:blue")
    for j, (lab, col) in enumerate(zip(("5th", "50th", "95th"), colours,
                                                 strict=True)):
        ax.fill_between(centres, sim_q[:, j, 0], sim_q[:, j, 2], color=col, alpha=0.2,
                        label=f"simulated {lab} pct (90% CI)")
        ax.plot(centres, obs_q[:, j], color=col, lw=1.5, ls="-" if j == 1 else "--",
                label=f"observed {lab} pct")
    ax.scatter(time, dv, s=5, color="grey", alpha=0.4)
    ax.set_yscale("log")
    ax.set(xlabel="Time after dose (h)", ylabel=f"Level ({unit})", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def spread_figure(values, *, ylabel: str, title: str = "") -> bytes:
    """PNG: per group (e.g. data source) every unit's value as a dot (e.g. one per
    hospital and seed) and their mean with a 95 % t-interval.

    ``values``: mapping group -> 1-d array (NaN ignored). The interval is mean +-
    t(0.975, K-1) SD / sqrt(K) over the K finite values (none for K < 2).
    """
    from scipy.stats import t as student_t

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.4))
    for x, name in enumerate(names):
        v = np.asarray(values[name], float)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        jitter = np.linspace(-0.12, 0.12, v.size) if v.size > 1 else np.zeros(1)
        ax.scatter(x + jitter, v, s=14, color="grey", alpha=0.7, zorder=2)
        m = v.mean()
        h = (student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
             if v.size > 1 else 0.0)
        ax.errorbar(x + 0.28, m, yerr=h, fmt="o", color="k", capsize=4, zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def risk_utility_map(points, *, threshold: float, xlabel: str,
                     ylabel: str = "residual risk (worst attack)") -> bytes:
    """PNG: one marker per source at (utility loss, residual risk) with both
    intervals as error bars, and the risk threshold as a dashed line.

    ``points``: sequence of ``(name, loss, loss_half_width, risk, risk_low,
    risk_high)``; NaN half-widths draw no bar.
    """
    markers = "osD^vP*Xph"
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for k, (name, loss, h, risk, lo, hi) in enumerate(points):
        if not (np.isfinite(loss) and np.isfinite(risk)):
            continue
        xerr = None if not np.isfinite(h) else h
        yerr = (None if not (np.isfinite(lo) and np.isfinite(hi))
                else [[risk - lo], [hi - risk]])
        ax.errorbar(loss, risk, xerr=xerr, yerr=yerr, fmt=markers[k % len(markers)],
                    ms=7, capsize=3, label=str(name))
    ax.axhline(threshold, color="#9b1c10", ls="--", lw=1)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.03, 1.03))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
