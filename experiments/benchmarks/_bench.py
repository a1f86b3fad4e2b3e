"""What the benchmark scripts share: the device choice, JAX compile-time accounting,
timing of one call and a time-stamped log line.

Import it before JAX (``choose_device`` must run before ``import jax``)::

    import _bench
    _bench.choose_device()
    import jax
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


def choose_device() -> None:
    """Use the GPU where there is one; otherwise pin JAX's CPU backend (quietly).
    Only when the user has not chosen a platform with ``JAX_PLATFORMS``."""
    if "JAX_PLATFORMS" in os.environ:
        return
    has_gpu = (
        shutil.which("nvidia-smi") is not None
        or Path("/dev/nvidia0").exists()
        or Path("/dev/kfd").exists()
    )
    if not has_gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile = {"s": 0.0, "n": 0, "listening": False}


def _on_event(event: str, duration: float, **_kw) -> None:
    if event in _COMPILE_EVENTS:
        _compile["s"] += duration
        if event == _COMPILE_EVENTS[-1]:
            _compile["n"] += 1


def _listen() -> None:
    if not _compile["listening"]:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _compile["listening"] = True


class Timed:
    """Wall time of ``fn(*args, **kwargs)`` (results blocked on) and the JAX
    compilation (tracing, lowering, XLA) inside it."""

    def __init__(self, fn, *args, **kwargs):
        import jax

        _listen()
        s0, n0 = _compile["s"], _compile["n"]
        t0 = time.perf_counter()
        self.value = jax.block_until_ready(fn(*args, **kwargs))
        self.seconds = time.perf_counter() - t0
        self.compile_s = _compile["s"] - s0
        self.n_compiles = _compile["n"] - n0

    def note(self, label: str) -> str:
        return f"{label} compile {self.compile_s:.1f} s ({self.n_compiles} XLA)"


def log(msg: str) -> None:
    """A time-stamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def device_line() -> tuple[str, str]:
    """(description of the JAX device, 'gpu' or 'cpu') for a benchmark's header."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.platform}: {device.device_kind}", "gpu"
    import platform

    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return f"CPU, {os.cpu_count()} cores ({model}), no GPU", "cpu"
