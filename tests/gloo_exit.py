"""How a multi-process test job leaves: gloo ranks abort at interpreter exit in about a third of runs on torch 2.13
("terminate called without an active exception", exit code 1), so a job ends with :func:`leave` once its files are
written, as the recipes do (``recipes/common.py``'s ``end_run``)."""

from __future__ import annotations

import atexit
import os
import sys


def leave(code: int = 0) -> None:
    """Barrier (when a process group runs), the interpreter's exit handlers, flushed streams, then ``os._exit``.

    Example:
        >>> # at the end of a torchrun job: leave()  # never returns
    """
    import torch.distributed as dist

    if code == 0 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has written its files
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
