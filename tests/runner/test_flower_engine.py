"""The runner's Flower engine (``federation=flower``): real Flower processes on
this machine (one SuperLink, one SuperNode per training hospital).

* slow: a tiny haemophilia experiment interrupted after its first round resumes
  from the runner's checkpoint folder (server checkpoint + the sites' job state)
  to the result of the uninterrupted in-process run;
* slow: the PICU experiment on Flower equals the in-process one for the same seed
  (estimates, alarm threshold, every held-out score);
* slow: DP over Flower is applied (noise drawn at each site) and stated like the
  in-process engine's (same calibration and accountant's ε).
"""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower adapter needs flwr>=1.41,<1.42")

from phems_clinical import usecases  # noqa: E402
from phems_clinical.app.derive import load_use_case  # noqa: E402
from phems_clinical.evaluation.sources import SourceSpec  # noqa: E402
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals  # noqa: E402
from phems_clinical.runner import pipeline  # noqa: E402
from phems_clinical.runner.experiment import simulate_sites  # noqa: E402
from phems_clinical.runner.training import (  # noqa: E402
    DPTarget,
    FederationSettings,
    train,
    train_flower,
)

REAL = [SourceSpec("real", "real")]


class _Stop(Exception):
    pass


def _pipeline(task, sites, model, fed, holdout, **kw):
    return pipeline.run_pipeline(
        jax.random.key(7),
        task,
        sites,
        model,
        REAL,
        holdout_site=holdout,
        federation=fed,
        n_attacks=20,
        progress=None,
        **kw,
    )


@pytest.fixture(scope="module")
def picu(tmp_path_factory):
    folder = tmp_path_factory.mktemp("picu")
    simulate_sites("picu", jax.random.key(3), 3, 24, None, folder)
    sites, _ = load_use_case("picu", omop=str(folder))
    return {s: d.drop(columns="SITE", errors="ignore") for s, d in sites.items()}


@pytest.mark.slow
def test_interrupted_flower_run_resumes_through_the_runner(tmp_path, monkeypatch):
    """Killed after its first round's checkpoint, the rerun with the same
    checkpoint folder continues from it (``resumed_after`` 1, the sites' kept
    state) and ends where the uninterrupted in-process run ends."""
    model = load_product("advate")
    ev, _ = simulate_hospitals(
        jax.random.key(1), model, [HospitalSpec(f"H{i}", 24) for i in (1, 2, 3)]
    )
    sites = {
        s: d.drop(columns="SITE").reset_index(drop=True) for s, d in ev.groupby("SITE")
    }
    task = usecases.get("haemophilia").task
    fed = FederationSettings("flower", "fedadam", {"rounds": 2})
    ref = _pipeline(task, sites, model, fed._replace(engine="inprocess"), "H3")
    real = pipeline.train_flower

    def killed_after_round_one(*args, **kw):
        real(*args, stop_after=1, **kw)
        raise _Stop  # as if the machine went down after the checkpoint

    monkeypatch.setattr(pipeline, "train_flower", killed_after_round_one)
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(_Stop):
        _pipeline(task, sites, model, fed, "H3", checkpoint_dir=ckpt)
    first = json.loads((ckpt / "real" / "flower" / "result.json").read_text())
    assert first["rounds"] == 1 and not (ckpt / "real" / "done.json").exists()
    monkeypatch.undo()
    run = _pipeline(task, sites, model, fed, "H3", checkpoint_dir=ckpt)
    final = json.loads((ckpt / "real" / "flower" / "result.json").read_text())
    assert final["resumed_after"] == 1 and final["rounds"] == 2
    ours, theirs = run.sources["real"], ref.sources["real"]
    assert ours.rounds == theirs.rounds == 2
    for k, v in theirs.estimates.items():
        assert ours.estimates[k] == pytest.approx(v, rel=1e-10, abs=1e-12)
    # the forecast scores re-fit every held-out patient's MAP (an optimiser with
    # its own tolerance), which magnifies the last digits of the estimates
    for site, scores in theirs.utility.items():
        for m, v in scores.items():
            assert ours.utility[site][m] == pytest.approx(v, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_picu_experiment_on_flower_equals_in_process(picu):
    """``experiment=picu_sepsis federation=flower``: the same estimates, alarm
    threshold and held-out scores as in process, for the same seed."""
    task = usecases.get("picu").task
    model = task.model_from_config({})
    holdout = list(picu)[2]
    fed = FederationSettings("flower", options={"rounds": 2})
    ours = _pipeline(task, picu, model, fed, holdout).sources["real"]
    ref = _pipeline(
        task, picu, model, fed._replace(engine="inprocess"), holdout
    ).sources["real"]
    assert ours.estimates == ref.estimates  # weights' intercept, threshold
    assert ours.utility.keys() == ref.utility.keys()
    for site, scores in ref.utility.items():  # NaN where a site has no case
        assert ours.utility[site] == pytest.approx(
            scores, rel=1e-12, abs=1e-15, nan_ok=True
        )
    assert (ours.rounds, ours.converged) == (ref.rounds, ref.converged)


@pytest.mark.slow
def test_dp_over_flower_is_applied_and_stated_as_in_process(picu, tmp_path):
    """``federation.dp`` on Flower: the noise multiplier calibrated to the target
    ε exactly as in process, each site's accountant ε recorded by the server equal
    to the engine's, and the noise applied (the weights differ from the noiseless
    run; drawn from the sites' OS CSPRNG, not the seed)."""
    task = usecases.get("picu").task
    model = task.model_from_config({})
    frames = [picu[s] for s in list(picu)[:2]]
    fed = FederationSettings(
        "flower", options={"rounds": 2}, dp=DPTarget(epsilon=2.0, clip=1.0)
    )
    key = jax.random.key(5)
    fitted, calibration, res = train_flower(
        task, key, 5, frames, task.strategy, model, fed, tmp_path
    )
    prob = task.problem(key, frames, task.strategy, model)
    run, cal = train(key, prob.build, prob.sites, fed._replace(engine="inprocess"))
    assert calibration == cal
    assert [p["epsilon"] for p in res["privacy"]] == pytest.approx(
        [p["epsilon"] for p in run.privacy], rel=1e-12
    )
    assert max(p["epsilon"] for p in res["privacy"]) <= 2.0
    assert [p["n_patients"] for p in res["privacy"]] == [
        p["n_patients"] for p in run.privacy
    ]
    plain = task.problem(key, frames, task.strategy, model)
    noiseless, _ = train(
        key, plain.build, plain.sites, FederationSettings(options={"rounds": 2})
    )
    assert not np.allclose(
        np.asarray(fitted.model.x), np.asarray(noiseless.result["x"]), atol=1e-8
    )
