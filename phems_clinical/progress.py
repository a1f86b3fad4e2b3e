"""Progress of long work as events: a silent default, bars and a log.

Long functions (deriving and scoring sources, federated rounds, the experiment
pipeline) take a ``progress`` callback, :data:`ProgressFn`, and call it with
:class:`ProgressEvent` s; the default :func:`silent` does nothing, so the
functions stay pure and their results never depend on who listens. A caller
combines listeners with :func:`fan_out`:

* :func:`bars`: tqdm progress bars on stderr (off when stderr is not a terminal),
  with an ETA where the number of steps is known in advance (sources x sites,
  sources); federated rounds have no ETA, since a fit stops at convergence,
  usually long before its largest number of rounds ("at most N");
* :func:`log_events`: Python logging (the run log): each stage's start and end
  with its duration, notes, every ``every``-th round with its objective.

A list's ``append`` is a listener too (tests record the events).

This module imports nothing heavy (tqdm only when bars are drawn).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TextIO

__all__ = [
    "ProgressEvent",
    "ProgressFn",
    "bars",
    "bars_wanted",
    "begin",
    "end",
    "fan_out",
    "labelled",
    "log_events",
    "note",
    "silent",
    "step",
    "within",
]


class ProgressEvent(NamedTuple):
    """One thing that happened in long work.

    kind : ``"start"``, ``"step"``, ``"end"`` or ``"note"``.
    task : the stage (``"derive"``, ``"score"``, ``"train"``, ``"rounds"``...);
        ``""`` for a note.
    done : steps finished so far (``step``, ``end``).
    total : steps planned, or None when unknown in advance (rounds that stop at
        convergence; ``info["at_most"]`` then gives the largest number).
    label : what the step was (``"synthetic at hospital_2"``), or a note's text.
    info : numbers worth showing (``ofv``, ``sites``, ``seconds``, ``at_most``,
        ``converged``); never a patient-level value.
    """

    kind: str
    task: str = ""
    done: int = 0
    total: int | None = None
    label: str = ""
    info: Mapping[str, Any] = {}


ProgressFn = Callable[[ProgressEvent], None]


def silent(event: ProgressEvent) -> None:
    """The default listener: ignores every event."""
    del event


def begin(
    progress: ProgressFn, task: str, total: int | None, label: str = "", **info: Any
) -> None:
    """Announce that ``task`` starts, with ``total`` steps (None: unknown)."""
    progress(ProgressEvent("start", task, 0, total, label, info))


def step(
    progress: ProgressFn,
    task: str,
    done: int,
    total: int | None,
    label: str = "",
    **info: Any,
) -> None:
    """Announce that ``done`` steps of ``task`` are finished."""
    progress(ProgressEvent("step", task, done, total, label, info))


def end(
    progress: ProgressFn,
    task: str,
    done: int,
    total: int | None = None,
    label: str = "",
    **info: Any,
) -> None:
    """Announce that ``task`` ended after ``done`` steps."""
    progress(ProgressEvent("end", task, done, total, label, info))


def note(progress: ProgressFn, text: str) -> None:
    """A line of what happened (e.g. a source's training result)."""
    progress(ProgressEvent("note", "", 0, None, text, {}))


def fan_out(*listeners: ProgressFn | None) -> ProgressFn:
    """One listener that passes every event to each of ``listeners`` (None
    skipped), in order."""
    chosen = [f for f in listeners if f is not None]

    def listener(event: ProgressEvent) -> None:
        for f in chosen:
            f(event)

    return listener


def _info_text(event: ProgressEvent) -> str:
    """``at most 2000, ofv 1234.5, sites 4/4, 0.81 s`` from an event's info."""
    parts = []
    info = event.info
    if "at_most" in info and event.total is None:
        parts.append(f"at most {info['at_most']}")
    if "ofv" in info:
        parts.append(f"ofv {info['ofv']:.6g}")
    if "sites" in info:
        parts.append(f"sites {info['sites']}")
    if info.get("dropped"):
        parts.append(f"dropped sites {list(info['dropped'])}")
    if "seconds" in info:
        parts.append(f"{info['seconds']:.2f} s")
    if "converged" in info:
        parts.append("converged" if info["converged"] else "not converged")
    return ", ".join(parts)


def log_events(
    logger: logging.Logger, *, step_level: int = logging.INFO, every: int = 10
) -> ProgressFn:
    """A listener that writes events to ``logger``.

    Starts, ends (with the stage's duration) and notes at INFO; steps at
    ``step_level`` (DEBUG when bars already show them on the terminal), of the
    ``rounds`` task only the first and every ``every``-th round.
    """
    started: dict[str, float] = {}

    def listener(event: ProgressEvent) -> None:
        extra = _info_text(event)
        if event.kind == "note":
            logger.info("%s", event.label)
        elif event.kind == "start":
            started[event.task] = time.perf_counter()
            size = (
                ""
                if event.total is None
                else f" ({event.total} step{'s' * (event.total != 1)})"
            )
            logger.info(
                "%s: started%s%s%s",
                event.task,
                f" {event.label}" if event.label else "",
                size,
                f"; {extra}" if extra else "",
            )
        elif event.kind == "end":
            took = time.perf_counter() - started.pop(event.task, time.perf_counter())
            unit = "round" if event.task == "rounds" else "step"
            logger.info(
                "%s: finished%s after %d %s%s in %.1f s%s",
                event.task,
                f" {event.label}" if event.label else "",
                event.done,
                unit,
                "s" * (event.done != 1),
                took,
                f"; {extra}" if extra else "",
            )
        elif event.task != "rounds" or event.done == 1 or event.done % every == 0:
            of = "" if event.total is None else f"/{event.total}"
            logger.log(
                step_level,
                "%s: %d%s %s%s",
                event.task,
                event.done,
                of,
                event.label,
                f" ({extra})" if extra else "",
            )

    return listener


def bars_wanted(enabled: bool = True, stream: TextIO | None = None) -> bool:
    """Whether bars are drawn: ``enabled`` (``progress: false`` or ``--quiet``
    turns them off) and ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(enabled and isatty is not None and isatty())


def bars(
    *, enabled: bool = True, stream: TextIO | None = None
) -> tuple[ProgressFn, Callable[[], None]]:
    """tqdm bars on ``stream`` (default stderr), one per running task.

    Returns ``(listener, close)``; ``close`` removes bars left open (an
    interrupted run). When :func:`bars_wanted` is false the listener is
    :func:`silent`. Tasks with a total show an ETA; ``rounds`` shows the round,
    its objective and "at most N", without an ETA.
    """
    if not bars_wanted(enabled, stream):
        return silent, lambda: None
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    open_bars: dict[str, Any] = {}

    def listener(event: ProgressEvent) -> None:
        if event.kind == "note":
            return
        bar = open_bars.get(event.task)
        if event.kind == "start" or bar is None:
            if bar is not None:
                bar.close()
            bar = open_bars[event.task] = tqdm(
                total=event.total,
                desc=event.task,
                file=stream,
                dynamic_ncols=True,
                leave=event.task != "rounds",
                unit="round" if event.task == "rounds" else "step",
                mininterval=0.2,
            )
        if event.kind in ("step", "end"):
            bar.update(event.done - bar.n)
            bar.set_postfix_str(
                " ".join(x for x in (event.label, _info_text(event)) if x),
                refresh=False,
            )
            bar.refresh()
        if event.kind == "end":
            bar.close()
            del open_bars[event.task]

    def close() -> None:
        for bar in open_bars.values():
            bar.close()
        open_bars.clear()

    return listener, close


def labelled(progress: ProgressFn, label: str) -> ProgressFn:
    """``progress`` with ``label`` given to the events that have none (e.g. a
    federated run's rounds, named after the source being trained)."""
    if progress is silent:
        return silent

    def listener(event: ProgressEvent) -> None:
        progress(
            event
            if event.label or event.kind == "note"
            else event._replace(label=label)
        )

    return listener


def within(
    progress: ProgressFn, offset: int, total: int, suffix: str = ""
) -> ProgressFn:
    """``progress`` seen from a part of a larger task: a part's steps count from
    ``offset`` out of the task's ``total``, its labels end in ``suffix``; its
    start and end are dropped (the caller starts and ends the whole task)."""
    if progress is silent:
        return silent

    def listener(event: ProgressEvent) -> None:
        if event.kind == "step":
            progress(
                event._replace(
                    done=offset + event.done, total=total, label=event.label + suffix
                )
            )
        elif event.kind == "note":
            progress(event)

    return listener
