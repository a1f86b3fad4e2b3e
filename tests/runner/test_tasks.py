"""The PICU and cardiac tasks of the runner against the suite's own reference
implementations (evaluation.sepsis_eval.cross_site_evaluation and
evaluation.cardiac_eval), and the runner's training settings: DP calibrated to a
target epsilon (checked with dp-accounting) and secure aggregation."""

import jax
import numpy as np
import pytest

from phems_clinical import usecases
from phems_clinical.app.derive import load_use_case
from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.evaluation import sepsis_eval as se
from phems_clinical.evaluation.sources import SourceSpec, split_patients
from phems_clinical.federation import dp as dpm
from phems_clinical.models.scores import sepsis_onset
from phems_clinical.runner.experiment import simulate_sites
from phems_clinical.runner.pipeline import run_pipeline
from phems_clinical.runner.training import DPTarget, FederationSettings, train


def _sites(tmp_path_factory, use_case, n):
    folder = tmp_path_factory.mktemp(use_case)
    simulate_sites(use_case, jax.random.key(3), 3, n, None, folder)
    sites, _ = load_use_case(use_case, omop=str(folder))
    return sites


@pytest.fixture(scope="module")
def picu(tmp_path_factory):
    return _sites(tmp_path_factory, "picu", 60)


@pytest.fixture(scope="module")
def cardiac(tmp_path_factory):
    return _sites(tmp_path_factory, "cardiac", 80)


def _fit(task, frames, model, fed=None, key=0):
    fed = fed or FederationSettings()
    strategy = fed.strategy or task.strategy
    prob = task.problem(jax.random.key(key), frames, strategy, model)
    run, cal = train(jax.random.key(key), prob.build, prob.sites, fed)
    return prob.finish(run.result), run, cal


def test_picu_task_equals_cross_site_evaluation(picu):
    """Same sites, same FedAdam settings (logistic weights start at zero, no
    randomness without DP): the runner's scores on a held-out hospital equal the
    reference pipeline's to float precision."""
    task = usecases.get("picu").task
    model = task.model_from_config({"horizon_h": 6})
    names = list(picu)
    train_names, held = names[:2], names[2]
    fitted, run, _ = _fit(task, [picu[s] for s in train_names], model)
    ours = task.evaluate(fitted, picu[held], model)
    onsets = {s: sepsis_onset(h) for s, h in picu.items()}
    # the runner starts the output bias at the training hours' prevalence
    prep = se.prepare_sites(picu, onsets, held_out=[held])
    prev = sum(float(np.sum(e.data["y"] * e.data["w"])) for e in prep.train) / sum(
        float(np.sum(e.data["w"])) for e in prep.train
    )
    ref = se.cross_site_evaluation(
        jax.random.key(0),
        picu,
        onsets,
        held_out=[held],
        algorithm="fedadam",
        rounds=50,
        model_kw={"prior": prev},
    )
    for m in ("auroc", "auprc", "brier"):
        assert ours[m] == pytest.approx(ref["metrics"][held][m], rel=1e-6, abs=1e-9)
    assert ours["auroc"] > 0.6
    # the alarm threshold comes from summed per-candidate utility totals (what a
    # federation can send): the same choice as the pooled predictions give over
    # the same public candidates
    from phems_clinical.usecases.picu import THRESHOLDS

    ex = [prep.test[s] for s in train_names]
    probs = [np.asarray(fitted.model.predict(fitted.model.x, e)) for e in ex]
    thr, u = se.choose_threshold(probs, ex, thresholds=THRESHOLDS)
    assert fitted.estimates["threshold"] == thr
    assert fitted.estimates["train_utility"] == pytest.approx(u, rel=1e-12)


def test_cardiac_task_reaches_the_pooled_newton_fit(cardiac):
    """FedAdam over the sites vs Newton on the pooled episodes (the centralised
    penalised MLE, cardiac_eval.pooled_fit): same C-index on the held-out
    hospital."""
    task = usecases.get("cardiac").task
    model = task.model_from_config({})
    names = list(cardiac)
    frames = [cardiac[s] for s in names[:2]]
    fitted, run, _ = _fit(task, frames, model)
    assert run.rounds == 300
    ref = ce.pooled_fit({s: cardiac[s] for s in names[:2]})
    ours = task.evaluate(fitted, cardiac[names[2]], model)
    theirs = ce.evaluate(ref.params, cardiac[names[2]])
    assert ours["c_death"] == pytest.approx(theirs["c_death"], abs=0.01)
    np.testing.assert_allclose(
        np.asarray(fitted.model.beta), np.asarray(ref.params.beta), atol=0.05
    )


def test_dp_target_epsilon_is_met_and_stated(picu):
    """DP-SGD calibrated to epsilon = 2: every site's accounted epsilon (the
    engine's report, dp-accounting RDP) is at most 2 and within 2 % of it."""
    task = usecases.get("picu").task
    model = task.model_from_config({})
    frames = [picu[s] for s in list(picu)[:2]]
    fed = FederationSettings(options={"rounds": 5}, dp=DPTarget(epsilon=2.0, clip=1.0))
    _, run, cal = _fit(task, frames, model, fed)
    eps = [float(p["epsilon"]) for p in run.privacy]
    assert max(eps) <= 2.0 and min(eps) > 1.96
    assert cal["steps"] == 5 * 5  # rounds x local steps
    n_max = max(int(f["stay_id"].nunique()) for f in frames)
    assert cal["delta"] == pytest.approx(1 / (10 * n_max))
    again = dpm.epsilon(
        dpm.DPConfig(1.0, cal["noise_multiplier"], cal["delta"]), n_max, cal["steps"]
    )
    assert again == pytest.approx(max(eps), rel=1e-9)


def test_secure_aggregation_gives_the_plain_estimate(cardiac):
    task = usecases.get("cardiac").task
    model = task.model_from_config({})
    frames = [cardiac[s] for s in list(cardiac)[:2]]
    fed = FederationSettings(options={"rounds": 20})
    plain, _, _ = _fit(task, frames, model, fed)
    secure, _, _ = _fit(task, frames, model, fed._replace(secagg=True))
    np.testing.assert_allclose(
        np.asarray(secure.model.beta), np.asarray(plain.model.beta), atol=1e-6
    )


def test_picu_pipeline_sources_side_by_side(picu):
    task = usecases.get("picu").task
    model = task.model_from_config({})
    run = run_pipeline(
        jax.random.key(1),
        task,
        picu,
        model,
        [SourceSpec("real", "real"), SourceSpec("synthetic", "synthetic", "default")],
        holdout_site=list(picu)[2],
        n_attacks=20,
        progress=None,
        federation=FederationSettings(options={"rounds": 10}),
    )
    assert set(run.sources) == {"real", "synthetic"}
    held = run.sources["real"].utility[list(picu)[2]]
    assert (
        0 <= held["auroc"] <= 1
        and held["n_stays"] == picu[list(picu)[2]]["stay_id"].nunique()
    )
    # the split keeps each training site's held-out stays apart
    train, test = split_patients(
        jax.random.key(0), picu[list(picu)[0]], usecases.get("picu"), 0.5
    )
    assert not set(train.stay_id) & set(test.stay_id)
