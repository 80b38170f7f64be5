"""``python guard.py WORKER_PID CMD...``: run a trial's command so that it dies with its sweep worker.

The worker starts this file (stdlib only, no package import: it starts in milliseconds) as the leader of a new
process group; the trial's command runs as its child in that group, with whatever processes a launcher starts.
When the worker dies, even by SIGKILL, the kernel sends this process SIGTERM (``PR_SET_PDEATHSIG`` on Linux; a
once-a-second check of the parent pid elsewhere), and it kills the whole group: no orphaned training process
keeps a GPU busy. Its exit code is the command's (128 + N when signal N ended it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux only; elsewhere the poll below covers it)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def _end_group(signum=None, frame=None) -> None:  # noqa: ARG001 - signal handler signature
    os.killpg(os.getpgid(0), signal.SIGKILL)  # the trial, its launcher's workers, and this guard


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    signal.signal(signal.SIGTERM, _end_group)
    signal.signal(signal.SIGHUP, _end_group)
    _die_with_parent()
    if os.getppid() != parent:  # the worker died before the request above took effect
        _end_group()
    proc = subprocess.Popen(cmd)
    while True:
        try:
            rc = proc.wait(timeout=1.0)
            return 128 - rc if rc < 0 else rc  # -N: signal N
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                _end_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
