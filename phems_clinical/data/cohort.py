"""The array form of a PK cohort: padded NONMEM-style events as a JAX pytree.

Single-patient code takes one :class:`Cohort` row (no leading axis); a cohort is the
same NamedTuple with a leading ``n_subject`` axis, so ``jax.vmap`` maps over patients.

Padding conventions (so that padded entries contribute nothing):

* a padded dose has ``dose_amt == 0`` (a zero dose adds zero concentration);
* a padded observation has ``obs_mask == False`` and is excluded from likelihoods.

Units: time in h, amounts in IU, levels in IU/dL (= %), durations in h.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Bool, Float, Int


class Cohort(NamedTuple):
    """Padded dosing and observation arrays for one subject or a cohort.

    Attributes
    ----------
    dose_time : (..., n_dose) float, h since the subject's first record.
    dose_amt : (..., n_dose) float, IU; 0 marks padding.
    dose_dur : (..., n_dose) float, h; 0 is an IV bolus.
    dose_occ : (..., n_dose) int, occasion index of the dose (IOV).
    obs_time : (..., n_obs) float, h.
    obs_dv : (..., n_obs) float, IU/dL; for BLQ rows the value is ignored.
    obs_mask : (..., n_obs) bool, True for a real observation.
    obs_blq : (..., n_obs) bool, True when below the limit of quantification.
    obs_lloq : (..., n_obs) float, IU/dL, lower limit of quantification (M3).
    obs_occ : (..., n_obs) int, occasion index of the observation.
    covariates : (..., n_cov) float, in the order of the model's covariate names.
    """

    dose_time: Float[Array, "... n_dose"]
    dose_amt: Float[Array, "... n_dose"]
    dose_dur: Float[Array, "... n_dose"]
    dose_occ: Int[Array, "... n_dose"]
    obs_time: Float[Array, "... n_obs"]
    obs_dv: Float[Array, "... n_obs"]
    obs_mask: Bool[Array, "... n_obs"]
    obs_blq: Bool[Array, "... n_obs"]
    obs_lloq: Float[Array, "... n_obs"]
    obs_occ: Int[Array, "... n_obs"]
    covariates: Float[Array, "... n_cov"]

    @property
    def n_subjects(self) -> int:
        """Number of subjects (1 for an unbatched subject)."""
        return 1 if self.obs_time.ndim == 1 else int(self.obs_time.shape[0])


def stack_subjects(
    subjects: list[dict], *, n_dose: int | None = None, n_obs: int | None = None
) -> Cohort:
    """Pad and stack per-subject event dictionaries into a batched :class:`Cohort`.

    Parameters
    ----------
    subjects : list of dict
        Each dict has numpy arrays ``dose_time, dose_amt, dose_dur, dose_occ,
        obs_time, obs_dv, obs_blq, obs_lloq, obs_occ`` and ``covariates``.
    n_dose, n_obs : int, optional
        Padded sizes; default to the largest subject (at least 1).
    """
    n_dose = n_dose or max(1, max(len(s["dose_time"]) for s in subjects))
    n_obs = n_obs or max(1, max(len(s["obs_time"]) for s in subjects))

    def pad(x, n, fill, dtype):
        x = np.asarray(x, dtype=dtype)
        out = np.full(n, fill, dtype=dtype)
        out[: len(x)] = x
        return out

    def col(name, n, fill, dtype):
        return jnp.asarray(np.stack([pad(s[name], n, fill, dtype) for s in subjects]))

    last_obs = [
        float(np.max(s["obs_time"])) if len(s["obs_time"]) else 0.0 for s in subjects
    ]
    obs_time = np.stack(
        [
            pad(s["obs_time"], n_obs, t, np.float64)
            for s, t in zip(subjects, last_obs, strict=True)
        ]
    )
    mask = np.stack(
        [pad(np.ones(len(s["obs_time"]), bool), n_obs, False, bool) for s in subjects]
    )
    return Cohort(
        dose_time=col("dose_time", n_dose, 0.0, np.float64),
        dose_amt=col("dose_amt", n_dose, 0.0, np.float64),
        dose_dur=col("dose_dur", n_dose, 0.0, np.float64),
        dose_occ=col("dose_occ", n_dose, 0, np.int32),
        obs_time=jnp.asarray(obs_time),
        obs_dv=col("obs_dv", n_obs, 0.0, np.float64),
        obs_mask=jnp.asarray(mask),
        obs_blq=col("obs_blq", n_obs, False, bool),
        obs_lloq=col("obs_lloq", n_obs, 0.0, np.float64),
        obs_occ=col("obs_occ", n_obs, 0, np.int32),
        covariates=jnp.asarray(
            np.stack([np.asarray(s["covariates"], np.float64) for s in subjects])
        ),
    )
