"""A hospital's PK cohort as federated site data: padded to a shape shared by all
sites, so the in-process engine can ``vmap`` across hospitals.

Padding subjects are copies of the site's first subject with ``mask == False``; a
copy (rather than zeros) keeps every padded computation finite, so neither values
nor gradients of the masked-out subjects can turn into NaN (``where`` then discards
them exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pandas as pd

from phems_clinical._typing import Array, Bool
from phems_clinical.data.cohort import Cohort
from phems_clinical.data.nonmem import read_nonmem, to_cohort
from phems_clinical.pk.model import n_occasions
from phems_clinical.pk.spec import PopModel


class SiteCohort(NamedTuple):
    """One site's padded cohort and which rows are real patients."""

    cohort: Cohort
    mask: Bool[Array, " n_sub"]

    @property
    def n_patients(self) -> int:
        """Real (unpadded) patients at the site."""
        return int(np.sum(np.asarray(self.mask)))


def _pad_axis(x: np.ndarray, n: int, axis: int, fill) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return np.pad(x, widths, constant_values=fill)


def pad_cohort(cohort: Cohort, n_sub: int, n_dose: int, n_obs: int) -> SiteCohort:
    """Pad ``cohort`` to ``n_sub`` subjects, ``n_dose`` doses and ``n_obs`` samples.

    Extra doses have amount 0 and extra samples ``obs_mask == False`` (the
    :class:`Cohort` conventions); extra subjects copy subject 0 and are masked out.
    """
    if cohort.n_subjects > n_sub:
        raise ValueError(
            f"cohort has {cohort.n_subjects} subjects, more than n_sub={n_sub}"
        )
    fills = {
        "dose_time": 0.0,
        "dose_amt": 0.0,
        "dose_dur": 0.0,
        "dose_occ": 0,
        "obs_dv": 0.0,
        "obs_mask": False,
        "obs_blq": False,
        "obs_lloq": 0.0,
        "obs_occ": 0,
    }
    out = {}
    for name, x in cohort._asdict().items():
        x = np.asarray(x)
        if name.startswith("dose_"):
            x = _pad_axis(x, n_dose, 1, fills[name])
        elif name == "obs_time":
            x = np.concatenate([x, np.repeat(x[:, -1:], n_obs - x.shape[1], 1)], 1)
        elif name.startswith("obs_"):
            x = _pad_axis(x, n_obs, 1, fills[name])
        extra = n_sub - x.shape[0]
        x = np.concatenate([x, np.repeat(x[:1], extra, axis=0)], axis=0)
        out[name] = jnp.asarray(x)
    mask = np.arange(n_sub) < cohort.n_subjects
    return SiteCohort(Cohort(**out), jnp.asarray(mask))


def pad_sites(cohorts: Sequence[Cohort]) -> list[SiteCohort]:
    """Pad every site's cohort to the largest subject, dose and sample counts."""
    n_sub = max(c.n_subjects for c in cohorts)
    n_dose = max(c.dose_time.shape[-1] for c in cohorts)
    n_obs = max(c.obs_time.shape[-1] for c in cohorts)
    return [pad_cohort(c, n_sub, n_dose, n_obs) for c in cohorts]


def cohorts_by_site(
    events: pd.DataFrame, model: PopModel, *, site_column: str = "SITE"
) -> tuple[list[str], list[Cohort]]:
    """Split a NONMEM-style event table into one checked cohort per site.

    Each site's rows go through :func:`phems_clinical.data.nonmem.read_nonmem` on
    their own (as they would inside that hospital). Returns site names in order of
    appearance and their cohorts.
    """
    if site_column not in events.columns:
        raise ValueError(
            f"column {site_column!r}: expected a site identifier column "
            f"in the event table (have {', '.join(events.columns)})"
        )
    names = list(dict.fromkeys(events[site_column].astype(str)))
    cohorts = []
    for name in names:
        rows = events[events[site_column].astype(str) == name]
        data = read_nonmem(
            rows.drop(columns=[site_column]), required_covariates=model.covariate_names
        )
        cohorts.append(to_cohort(data, model.covariate_names)[0])
    return names, cohorts


def n_occasions_all(cohorts: Sequence[Cohort]) -> int:
    """Occasions the population model must allow for (largest over sites)."""
    return max(n_occasions(c) for c in cohorts)


def pooled(cohorts: Sequence[Cohort]) -> Cohort:
    """All sites' subjects in one cohort (the pooled reference analysis only)."""
    sites = pad_sites(cohorts)
    keep = [np.asarray(s.mask) for s in sites]
    return Cohort(
        *[
            jnp.concatenate(
                [np.asarray(f)[k] for f, k in zip(fields, keep, strict=True)]
            )
            for fields in zip(*[s.cohort for s in sites], strict=True)
        ]
    )


__all__ = [
    "SiteCohort",
    "cohorts_by_site",
    "n_occasions_all",
    "pad_cohort",
    "pad_sites",
    "pooled",
]
