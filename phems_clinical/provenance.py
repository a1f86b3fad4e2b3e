"""Where a result came from: package versions, git revision, device and machine load.

One place for the provenance that the runner, the dosing tool and the experiment
scripts write next to their figures.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = (
    "phems_clinical",
    "jax",
    "jaxlib",
    "numpyro",
    "optax",
    "numpy",
    "scipy",
    "pandas",
    "xarray",
    "hydra-core",
)


def versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Python and installed package versions (packages not installed are left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=_REPO, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def git_revision() -> str:
    """Full git SHA of the checkout the package runs from, or ``"unknown"``."""
    return _git("rev-parse", "HEAD").strip() or "unknown"


def code_state(folder: str = "phems_clinical/pk") -> str:
    """Short revision, uncommitted package changes and a hash of ``folder``'s
    sources, so that a benchmark table names the exact code it timed."""
    head = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [
        ln[3:].strip()
        for ln in _git("status", "--porcelain", "--", "phems_clinical").splitlines()
        if ln.strip()
    ]
    digest = hashlib.sha256()
    for f in sorted((_REPO / folder).glob("*.py")):
        digest.update(f.read_bytes())
    return (
        f"git {head}"
        + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (clean)")
        + f"; sha256({folder}/*.py) {digest.hexdigest()[:12]}"
    )


def device_info() -> dict[str, str | int]:
    """JAX's default device and the CPU model and usable cores of this machine."""
    import jax

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    kind = getattr(dev, "device_kind", str(dev))
    return {
        "platform": dev.platform,
        "device": dev.platform if dev.platform == "cpu" else f"{dev.platform}: {kind}",
        "device_kind": kind,
        "n_devices": len(jax.devices()),
        "cpu": cpu,
        "usable_cores": usable,
        "cores": f"{usable} usable of {os.cpu_count()}",
    }


def load_average() -> str:
    """1/5/15-minute load average, ``"a / b / c"`` (``"n/a"`` where unknown)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
