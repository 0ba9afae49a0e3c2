"""The metadata every benchmark JSON carries under ``"meta"``: what ran, where, on which code.

``run_meta()`` -> dict with ``git_sha`` (``git rev-parse HEAD`` of this checkout, else the ``KEYE_GIT_SHA``
environment variable, for copies without ``.git``, else None), ``git_dirty`` (uncommitted changes; None when
unknown), ``argv``, ``date`` (UTC, ISO 8601), ``python``, ``torch``, ``triton``, ``transformers`` (None when not
installed), ``device`` (the CUDA device name, else the CPU model), ``cuda`` (torch's CUDA version) and ``cpus``.
No network, no writes.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _git(*args):
    try:
        r = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001  (missing or broken: recorded as None)
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(argv=None, device=None) -> dict:
    """Metadata of this run (see the module docstring); ``argv`` defaults to ``sys.argv``; ``device`` (``"cuda"`` /
    ``"cpu"``) is the one the run uses (default: CUDA when available)."""
    import torch

    sha = _git("rev-parse", "HEAD") or os.environ.get("KEYE_GIT_SHA")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": sha, "git_dirty": None if status is None else bool(status),
        "argv": list(sys.argv if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": torch.cuda.get_device_name() if (torch.cuda.is_available() if device is None else
                                                   str(device).startswith("cuda")) else _cpu_model(),
        "cuda": torch.version.cuda, "cpus": os.cpu_count(),
    }
