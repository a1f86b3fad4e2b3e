"""Rerun every bad-input case (``cases_*.py``) and print the summary table.

    python experiments/bad_inputs/run.py [--details results/details.md]

Writes nothing unless ``--details`` is given; the committed figures are in this
folder's README. Exit status 1 when any case is a traceback, an unhelpful error or
silently accepted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import details, load_cases, run_cases, table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--details", default=None, help="write the per-case table here")
    p.add_argument("--only", default=None, help="run cases whose command contains this")
    args = p.parse_args()
    from phems_clinical.runtime import configure_jax

    configure_jax()
    cases = load_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.command]
    outcomes = run_cases(cases)
    print(table(outcomes))
    if args.details:
        Path(args.details).parent.mkdir(parents=True, exist_ok=True)
        Path(args.details).write_text(details(outcomes) + "\n")
    bad = [
        o
        for o in outcomes
        if o.column in ("traceback", "unhelpful error", "silently accepted")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
