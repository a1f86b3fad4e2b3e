"""The run log of ``phems run`` (configs/hydra/job_logging/phems.yaml): a tiny
PICU experiment, run as a user runs it (stderr not a terminal), writes
``runner.log`` in its run directory with the settings, each stage's start and
end with its duration, the federated rounds, the files written; the terminal
gets the same lines and no progress bar."""

import io
import logging
import re
import subprocess
import sys

import pytest

TINY = [
    "experiment=picu_sepsis",
    "data.n_sites=3",
    "data.n_per_site=30",
    "~source@sources.anonymised",
    "~source@sources.synthetic",
    "evaluation.n_attacks=10",
    "+inference.options.rounds=3",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "-m", "phems_clinical", "run", *TINY, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_runner_log_records_the_stages(tiny_run):
    out, _ = tiny_run
    log = (out / "runner.log").read_text()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.search(
        stamp + r"INFO phems_clinical.runner: experiment picu_sepsis, "
        r"seed 0",
        log,
    )
    assert "use case picu; data 3 simulated sites x 30; sources real (real" in log
    for stage, steps in (("derive", 2), ("score", 2), ("train", 1)):
        assert f"{stage}: started ({steps} step" in log, stage
        assert re.search(rf"{stage}: finished after {steps} steps? in [\d.]+ s", log), (
            stage
        )
    # rounds: the first (every 10th would follow) and the end, with convergence
    assert re.search(
        r"rounds: 1 real \(inprocess, fedadam\) \(at most 3, sites "
        r"2/2, [\d.]+ s\)",
        log,
    )
    # FedAdam's stopping rule is its number of rounds
    assert re.search(
        r"rounds: finished real \(inprocess, fedadam\) after 3 "
        r"rounds in [\d.]+ s; converged",
        log,
    )
    assert "real: 3 rounds (stopping rule)" in log
    assert "train: 1/1 real (converged)" in log
    assert re.search(r"wrote .*report\.html.*result\.json.*results\.nc", log)
    assert re.search(r"run finished in [\d.]+ s; run log .*runner\.log", log)


def test_terminal_shows_the_lines_and_no_bars_when_not_a_terminal(tiny_run):
    _, proc = tiny_run
    assert "[phems run] derive: started" in proc.stdout
    assert "[phems run] done in" in proc.stdout
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_with_bars_the_steps_stay_out_of_the_terminal_lines(monkeypatch):
    """On a terminal the bars show the steps; the console's log lines keep
    their INFO level under tqdm's redirection, the run log gets every step."""
    from phems_clinical import progress as pg
    from phems_clinical.runner import LOG, run_logging

    term, console, file = _Terminal(), io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", term)
    shown = logging.StreamHandler(console)
    shown.setLevel(logging.INFO)
    kept = logging.StreamHandler(file)
    kept.setLevel(logging.DEBUG)
    root, level = logging.getLogger(), LOG.level
    monkeypatch.setattr(root, "handlers", [shown, kept])
    LOG.setLevel(logging.DEBUG)
    try:
        with run_logging(True) as progress:
            pg.begin(progress, "derive", 2)
            pg.step(progress, "derive", 1, 2, "real at H1")
            pg.end(progress, "derive", 2, 2)
        with run_logging(False) as progress:  # progress=false: no bars
            pg.step(progress, "derive", 1, 2, "real at H2")
    finally:
        LOG.setLevel(level)
    assert "derive: 1/2 real at H1" in file.getvalue()
    # tqdm writes the redirected lines to the console handler's own stream
    assert "derive: started" in console.getvalue()
    assert "real at H1" not in console.getvalue()
    assert "derive: 1/2 real at H2" in console.getvalue()
    assert "real at H1" in term.getvalue() and "real at H2" not in term.getvalue()
