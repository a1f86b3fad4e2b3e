"""The run log of ``phems run`` (configs/hydra/job_logging/phems.yaml): a tiny
PICU experiment, run as a user runs it (stderr not a terminal), writes
``runner.log`` in its run directory with the settings, each stage's start and
end with its duration, the federated rounds, the files written; the terminal
gets the same lines and no progress bar."""

import re
import subprocess
import sys

import pytest

TINY = ["experiment=picu_sepsis", "data.n_sites=3", "data.n_per_site=30",
        "~source@sources.anonymised", "~source@sources.synthetic",
        "evaluation.n_attacks=10", "+inference.options.rounds=3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "-m", "phems_clinical", "run", *TINY,
                           f"hydra.run.dir={out}"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_runner_log_records_the_stages(tiny_run):
    out, _ = tiny_run
    log = (out / "runner.log").read_text()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.search(stamp + r"INFO phems_clinical.runner: experiment picu_sepsis, "
                     r"seed 0", log)
    assert "use case picu; data 3 simulated sites x 30; sources real (real" in log
    for stage, steps in (("derive", 2), ("score", 2), ("train", 1)):
        assert f"{stage}: started ({steps} step" in log, stage
        assert re.search(rf"{stage}: finished after {steps} steps? in [\d.]+ s",
                         log), stage
    # rounds: the first (every 10th would follow) and the end, with convergence
    assert re.search(r"rounds: 1 real \(inprocess, fedadam\) \(at most 3, sites "
                     r"2/2, [\d.]+ s\)", log)
    # FedAdam's stopping rule is its number of rounds
    assert re.search(r"rounds: finished real \(inprocess, fedadam\) after 3 "
                     r"rounds in [\d.]+ s; converged", log)
    assert "real: 3 rounds (stopping rule)" in log
    assert "train: 1/1 real (converged)" in log
    assert re.search(r"wrote .*report\.html.*result\.json.*results\.nc", log)
    assert re.search(r"run finished in [\d.]+ s; run log .*runner\.log", log)


def test_terminal_shows_the_lines_and_no_bars_when_not_a_terminal(tiny_run):
    _, proc = tiny_run
    assert "[phems run] derive: started" in proc.stdout
    assert "[phems run] done in" in proc.stdout
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr
